"""Every test sees 8 virtual CPU devices; set before jax is first used."""

import json
import os
import time

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One OpenMP thread per process (torch's intra-op threads, BLAS), set before torch is first imported: with an
# xdist worker per core, torch's thread per core in every worker oversubscribed the cores, and the threads'
# spin-waiting made a tiny UNet's 10-step diffusers reference loop (test_sampling) take 10 s of CPU, not 0.7.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Backend optimisation level 0 halves XLA:CPU compile times; the tiny test programs run fast anyway.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
# Each flag once: pytest-xdist's workers inherit the XLA_FLAGS this file already extended in the controller.
_flags = os.environ.get("XLA_FLAGS", "").split()
os.environ["XLA_FLAGS"] = " ".join(
    _flags + [flag for flag in ("--xla_force_host_platform_device_count=8", TEST_XLA_FLAGS) if flag not in _flags])

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

GIB_PER_WORKER = 4  # a worker's peak: its modules' fixtures and compiled programs on 8 virtual devices


def pytest_xdist_auto_num_workers(config):
  """`-n auto` (pyproject's addopts): a worker per core, but no more than the memory holds."""
  memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  return max(1, min(len(os.sched_getaffinity(0)), int(memory_gib // GIB_PER_WORKER)))


# The files with the slowest tests, slowest first (from --durations on the 2-core VM), run first, the others
# after them in collection order: with --dist loadfile a worker takes a whole file, and a slow file started
# last keeps the run going while the other workers sit idle.
SLOWEST_FILES = ("test_notebook.py", "test_generate.py", "test_pipeline_train.py", "test_multihost.py",
                 "test_training.py", "test_asyncdiff.py", "test_pipefusion.py", "test_sampling.py",
                 "test_strategies.py", "test_tensor.py")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  """With DFJAX_TEST_TIMELINE=FILE, each test (setup included) appends one JSON line to FILE: its worker,
  file, id, start and stop times and the CPU seconds its process (and waited-for children) used. It tells
  idle cores from CPU-bound work in a slow run."""
  timeline = os.environ.get("DFJAX_TEST_TIMELINE")
  start, before = time.time(), os.times()
  yield
  if timeline:
    after = os.times()
    cpu = sum(getattr(after, k) - getattr(before, k) for k in ("user", "system", "children_user", "children_system"))
    with open(timeline, "a") as f:
      f.write(json.dumps({"worker": os.environ.get("PYTEST_XDIST_WORKER", "main"), "file": item.path.name,
                          "test": item.nodeid, "start": start, "stop": time.time(), "cpu": cpu}) + "\n")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(SLOWEST_FILES)))  # stable: the rest keep their order


@pytest.fixture
def returned(monkeypatch):
  """returned(module, "run") → a list each later call of module.run appends its return value to: the rows a
  command printed its table from, for tests to read as data."""
  def spy(module, name: str) -> list:
    values, original = [], getattr(module, name)

    def recording(*args, **kwargs):
      values.append(original(*args, **kwargs))
      return values[-1]

    monkeypatch.setattr(module, name, recording)
    return values
  return spy
