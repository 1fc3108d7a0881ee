"""Shared measurement helpers: median wall time after warm-up, and the machine's name."""

import platform
import statistics
import time
from typing import Callable

import jax


def median_seconds(run: Callable[[], object], iters: int, warmup: int = 1) -> float:
  """Median wall time of `run()` (which must block until its work is done) over `iters` runs."""
  for _ in range(warmup):
    run()
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def block(tree):
  return jax.block_until_ready(tree)


def device_name() -> str:
  """E.g. 'cpu × 8 (x86_64, 2 cores)' or 'NVIDIA H100 80GB HBM3 × 1'."""
  devices = jax.devices()
  first = devices[0]
  if first.platform == "cpu":
    import os
    return f"cpu × {len(devices)} ({platform.machine()}, {os.cpu_count()} cores)"
  return f"{first.device_kind} × {len(devices)}"
