"""Measurement helpers: compile-then-time, median wall time after warm-up, and the machine's name."""

import dataclasses
import os
import platform
import statistics
import time
from typing import Any, Callable

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


@dataclasses.dataclass(frozen=True)
class Timed:
  """A program compiled and run: its compiled form, compile seconds, run seconds, last output."""

  compiled: jax.stages.Compiled
  compile_s: float
  run_s: float
  output: Any


def compile_and_time(lowered: jax.stages.Lowered, args: tuple, iters: int = 1, warmup: int = 0,
                     on_compiled: Callable[[], None] | None = None) -> Timed:
  """Compiles `lowered`, then runs it on `args` (`warmup` untimed runs, median of `iters` timed ones).

  `on_compiled()`, if given, is called between the two (e.g. to advance a progress bar).
  """
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  if on_compiled is not None:
    on_compiled()
  last = []  # only the latest output stays alive, freed before the next run allocates its own

  def run():
    last.clear()
    last.append(block(compiled(*args)))

  run_s = median_seconds(run, iters, warmup)
  return Timed(compiled, compile_s, run_s, last[0])


def device_name() -> str:
  """E.g. 'cpu × 8 (x86_64, 2 cores)' or 'NVIDIA H100 80GB HBM3 × 1'."""
  devices = jax.devices()
  first = devices[0]
  if first.platform == "cpu":
    return f"cpu × {len(devices)} ({platform.machine()}, {os.cpu_count()} cores)"
  return f"{first.device_kind} × {len(devices)}"
