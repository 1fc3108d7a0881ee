"""Multi-process runs: 2 processes × 4 CPU devices over loopback equal 1 process × 8 devices."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from conftest import TEST_XLA_FLAGS

WORKER = Path(__file__).with_name("multihost_worker.py")
ROOT = WORKER.parent.parent


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith("DFJAX_")}
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {TEST_XLA_FLAGS}"
  env["PYTHONPATH"] = str(ROOT)
  env["JAX_PLATFORMS"] = "cpu"
  return {**env, **{k: str(v) for k, v in extra.items()}}


def _worker(out: Path, devices: int, **env) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, str(WORKER), str(out)], env=_env(devices, **env),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen, timeout: float) -> str:
  output, _ = process.communicate(timeout=timeout)
  assert process.returncode == 0, output
  return output


def test_two_processes_equal_one_process(tmp_path):
  sys.path.insert(0, str(WORKER.parent))
  from multihost_worker import exact_latents

  multi = tmp_path / "multi.npy"
  coordinator = f"127.0.0.1:{_free_port()}"
  workers = [_worker(multi, 4, DFJAX_COORDINATOR=coordinator, DFJAX_NUM_PROCESSES=2, DFJAX_PROCESS_ID=i)
             for i in range(2)]
  expected = exact_latents()  # this process: 1 × 8 devices, computed while the workers run
  for worker in workers:
    _finish(worker, timeout=600)
  got = np.load(multi)
  assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_unreachable_coordinator_fails_fast_with_a_clear_error(tmp_path):
  start = time.monotonic()
  worker = _worker(tmp_path / "never.npy", 4, DFJAX_COORDINATOR=f"127.0.0.1:{_free_port()}",
                   DFJAX_NUM_PROCESSES=2, DFJAX_PROCESS_ID=1, DFJAX_TIMEOUT_S=5)
  output, _ = worker.communicate(timeout=120)
  assert worker.returncode != 0
  assert "could not join the coordinator" in output and "check that process 0 runs" in output
  assert time.monotonic() - start < 90
