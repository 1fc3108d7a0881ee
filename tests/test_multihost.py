"""Multi-process runs: 2 processes × 4 CPU devices over loopback equal one device."""

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TEST_XLA_FLAGS

from sharding import distributed
from sharding.distributed import ProcessGroup

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


def test_two_processes_equal_one_device(tmp_path):
  """exact over cfg=2 × patch=4 (guidance halves in different processes), and the hybrid
  cfg=2 × patch=2 × tensor=2 with every pair of patch neighbours in different processes, each equal to
  single on one device (as exact is in one process, test_strategies and test_tensor: a lost or misrouted
  halo, K/V or partial sum moves the latents by far more than 1e-5)."""
  sys.path.insert(0, str(WORKER.parent))
  from multihost_worker import RUNS, single_latents

  multi = tmp_path / "multi.npz"
  coordinator = f"127.0.0.1:{_free_port()}"
  workers = [_worker(multi, 4, DFJAX_COORDINATOR=coordinator, DFJAX_NUM_PROCESSES=2, DFJAX_PROCESS_ID=i)
             for i in range(2)]
  expected = single_latents()  # in this process, while the workers run
  for worker in workers:
    _finish(worker, timeout=600)
  got = np.load(multi)
  assert set(got.files) == set(RUNS)
  for name in RUNS:
    assert np.abs(got[name] - expected).max() <= 1e-5 * np.abs(expected).max(), name


# Start-up failures: a process that only joins (imports jax, not the model), a short timeout each.
JOIN = ("import os; from sharding.distributed import ProcessGroup, initialize; "
        "initialize(ProcessGroup.from_env(), timeout_s=float(os.environ['DFJAX_TIMEOUT_S'])); "
        "print('joined')")
TIMEOUT_S = 3
SLACK_S = 20  # starting python and importing jax on a busy 2-core machine, plus JAX's own few seconds
# Processes that must fail at once get a long timeout and must all have failed before it: none waited for it,
# however long a loaded machine takes to start them (a 20 s bound on a 3 s timeout flaked under load).
AT_ONCE_TIMEOUT_S = 60


def _joiners(coordinator: str, *groups: tuple[int, int], timeout_s: float = TIMEOUT_S) -> list[subprocess.Popen]:
  """One joining process per (num_processes, process_id), all started at once."""
  return [subprocess.Popen([sys.executable, "-c", JOIN], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, env=_env(1, DFJAX_COORDINATOR=coordinator, DFJAX_NUM_PROCESSES=count,
                                               DFJAX_PROCESS_ID=index, DFJAX_TIMEOUT_S=timeout_s))
          for count, index in groups]


def _failures(processes: list[subprocess.Popen], limit_s: float) -> list[str]:
  """Each process's output; every one must have failed, all within `limit_s` of now."""
  start = time.monotonic()
  outputs = [process.communicate(timeout=120)[0] for process in processes]
  assert time.monotonic() - start < limit_s, outputs
  for process, output in zip(processes, outputs):
    assert process.returncode != 0 and "joined" not in output.splitlines(), output
  return outputs


def test_unreachable_coordinator_fails_fast_with_a_clear_error():
  (output,) = _failures(_joiners(f"127.0.0.1:{_free_port()}", (2, 1)), TIMEOUT_S + SLACK_S)
  assert "could not reach the coordinator" in output and "check that process 0 runs" in output


def test_process_0_that_nobody_joins_names_the_missing_processes():
  (output,) = _failures(_joiners(f"127.0.0.1:{_free_port()}", (3, 0)), TIMEOUT_S + SLACK_S)
  assert "ConnectionError: process 0 waited 3 s" in output
  assert "process(es) [1, 2] of 3 did not join" in output


def test_two_processes_with_the_same_id_all_fail_at_once():
  outputs = _failures(_joiners(f"127.0.0.1:{_free_port()}", (3, 0), (3, 1), (3, 1), timeout_s=AT_ONCE_TIMEOUT_S),
                      AT_ONCE_TIMEOUT_S)
  for output in outputs:
    assert "ValueError" in output and "two processes were started with process id 1" in output, output


def test_processes_that_disagree_on_the_count_all_fail_at_once():
  # JAX itself starts this pair without a word: process 1 would believe in a third process.
  outputs = _failures(_joiners(f"127.0.0.1:{_free_port()}", (2, 0), (3, 1), timeout_s=AT_ONCE_TIMEOUT_S),
                      AT_ONCE_TIMEOUT_S)
  for output in outputs:
    assert "process 1 was started with num_processes=3 but process 0 with 2" in output, output


def test_process_0_on_a_taken_port_says_so():
  with socket.create_server(("127.0.0.1", 0)) as taken:  # another program, or a second process 0
    port = taken.getsockname()[1]
    (output,) = _failures(_joiners(f"127.0.0.1:{port}", (2, 0), timeout_s=AT_ONCE_TIMEOUT_S), AT_ONCE_TIMEOUT_S)
  assert f"process 0 cannot listen on port {port} (Address already in use)" in output


@pytest.mark.parametrize("reply", [b"HTTP/1.1 400 Bad Request\r\n\r\n", b"", None],
                         ids=["http", "hang-up", "silent"])
def test_a_coordinator_port_answered_by_another_program_is_named(reply):
  """A stranger on the port: it replies junk, hangs up at once, or says nothing until the timeout."""
  stranger = socket.create_server(("127.0.0.1", 0))
  peers = []

  def answer():
    peer, _ = stranger.accept()
    peers.append(peer)
    if reply is not None:
      peer.sendall(reply)
      peer.close()

  thread = threading.Thread(target=answer, daemon=True)
  thread.start()
  with stranger:
    (output,) = _failures(_joiners(f"127.0.0.1:{stranger.getsockname()[1]}", (2, 1)), TIMEOUT_S + SLACK_S)
  assert "answered, but not as a dfjax process 0" in output and "another program listens there" in output
  assert ("HTTP/1.1 400" if reply else "it sent nothing") in output
  for peer in peers:
    peer.close()


@pytest.mark.slow  # 9 s: waits out JAX's own abort
def test_jax_abort_after_check_in_is_explained_first():
  """Process 1 checks in (here, in this test process) and then never starts JAX: JAX aborts process 0."""
  coordinator = f"127.0.0.1:{_free_port()}"
  (process_0,) = _joiners(coordinator, (2, 0))
  distributed._join(ProcessGroup(coordinator, 2, 1), timeout_s=60)
  (output,) = _failures([process_0], TIMEOUT_S + SLACK_S)
  explanation = "all 2 processes checked in at"
  assert explanation in output and "JAX's runtime has not connected within 3 s" in output, output
  assert output.index(explanation) < output.index("Terminating process"), output  # JAX's fatal log


@pytest.mark.parametrize("env, message", [
    ({"DFJAX_NUM_PROCESSES": "abc", "DFJAX_PROCESS_ID": "0"}, "DFJAX_NUM_PROCESSES='abc' must be an integer"),
    ({"DFJAX_NUM_PROCESSES": "2", "DFJAX_PROCESS_ID": "1.5"}, "DFJAX_PROCESS_ID='1.5' must be an integer"),
    ({"DFJAX_NUM_PROCESSES": "0", "DFJAX_PROCESS_ID": "0"}, "num_processes=0 must be at least 1"),
    ({"DFJAX_NUM_PROCESSES": "2", "DFJAX_PROCESS_ID": "2"}, r"process id 2 must lie in \[0, 2\)"),
    ({"DFJAX_NUM_PROCESSES": "2"}, r"missing \['process_id'\]"),
    ({"DFJAX_COORDINATOR": "127.0.0.1:99999", "DFJAX_NUM_PROCESSES": "2", "DFJAX_PROCESS_ID": "0"},
     "port in 1 … 65535"),
])
def test_bad_process_settings_name_the_variable(monkeypatch, env, message):
  monkeypatch.setenv("DFJAX_COORDINATOR", "127.0.0.1:1234")
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  with pytest.raises(ValueError, match=message):
    ProcessGroup.from_env()


def test_a_flag_wins_over_the_variable_and_is_named_in_errors(monkeypatch):
  monkeypatch.setenv("DFJAX_COORDINATOR", "127.0.0.1:1234")
  monkeypatch.setenv("DFJAX_NUM_PROCESSES", "abc")
  monkeypatch.setenv("DFJAX_PROCESS_ID", "0")
  assert ProcessGroup.from_env(num_processes=2) == ProcessGroup("127.0.0.1:1234", 2, 0)
  with pytest.raises(ValueError, match="num_processes='x' must be an integer"):
    ProcessGroup.from_env(num_processes="x")
