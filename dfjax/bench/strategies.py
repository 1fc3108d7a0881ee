"""`dfjax bench strategies`: per-step time, communication and stale memory of each strategy.

For a UNet, DiT or PixArt (`--model`, `--config`) and every device count, runs single and every
registered strategy that splits an image and runs that model (`strategy.supports`: exact,
displaced, naive, ulysses, ring, usp, …), in each of its ways of splitting the image over those
devices (`strategy.image_splits`: usp's ring × Ulysses degrees), on the same inputs in one process.
It reads each compiled program's per-step collectives (sharding/accounting/comm.py) and its stale
buffers, and prints them beside the strategy's analytic figures (`expected_traffic`, `stale_bytes`).
A strategy that does not fit a device count (Ulysses' heads) is skipped with its reason, once every
device count fits some strategy. On a CPU the devices are virtual and share the cores: times are
CPU numbers, not speedups.
"""

import dataclasses

import jax
import numpy as np

from dfjax.bench import table
from dfjax.bench.table import Column
from dfjax.bench.timing import compile_and_time, device_name
from dfjax.bench.models import config_name, model_config
from dfjax.bench.unet import DTYPES, latent_size, random_unet
from dfjax.inputs import standin_conditioning
from dfjax.sampling import prepare_sample, stale_buffer_shapes
from sharding.accounting import comm
from sharding.axes import CFG, DATA, MESH_AXES, PATCH
from sharding.mesh import axis_sizes, describe, make_mesh
from sharding.strategies import Strategy, strategy_class, strategy_names, with_shared_options

MIB = 2**20


@dataclasses.dataclass(frozen=True)
class StrategyRun:
  strategy: str
  patch: int             # devices one image is split over
  compile_s: float
  step_s: float
  comm_bytes: int        # measured from the compiled program, last phase, per device per step
  analytic_bytes: int
  stale_bytes: int       # measured from the model's exchanges
  analytic_stale_bytes: int
  mesh: str = ""         # the split over the strategy's axes, e.g. "patch=2×ulysses=4" ('' for single)


def columns(single_s: float) -> tuple[Column, ...]:
  """The printed table's columns; `single_s` (single's step time) is the reference of "vs single"."""
  return (Column("strategy", "strategy", width=10, align="<"), Column("devices", "patch", width=7),
          Column("mesh", "mesh", width=17, align="<"),
          Column("compile s", "compile_s", ".2f", 9), Column("ms/step", "step_s", ".1f", 9, 1e3),
          Column("vs single", lambda run: f"{single_s / run.step_s:.2f}×", width=9),
          Column("comm MiB/step", "comm_bytes", ".3f", 13, 1 / MIB),
          Column("analytic", "analytic_bytes", ".3f", 9, 1 / MIB),
          Column("stale MiB", "stale_bytes", ".3f", 9, 1 / MIB),
          Column("analytic", "analytic_stale_bytes", ".3f", 9, 1 / MIB))


def _measure(model, noise, cond, uncond, mesh, strategy, steps, iters, dtype_bytes) -> StrategyRun:
  kwargs = dict(uncond=uncond, num_steps=steps, mesh=mesh, strategy=strategy,
                scheduler_config={"clip_sample": False})
  program = prepare_sample(model, noise, cond, **kwargs)
  timed = compile_and_time(program.lowered, program.inputs, iters, warmup=1)
  compile_s, run_s, compiled = timed.compile_s, timed.run_s, timed.compiled
  traffic = comm.traffic_per_step(compiled.as_text())
  stale = stale_buffer_shapes(model, noise, cond, **kwargs)
  config, (batch, height, width, _) = model.config, noise.shape
  sizes = axis_sizes(mesh)
  local_batch = 2 * batch // (sizes[CFG] * sizes[DATA])  # the guidance pair of this device's images
  expected = strategy.expected_traffic(config, height, width, sizes, local_batch, dtype_bytes)
  expected_stale = strategy.stale_bytes(config, height, width, sizes, local_batch, dtype_bytes)
  devices = mesh.size // (sizes[CFG] * sizes[DATA])
  return StrategyRun(strategy.name, devices, compile_s, run_s / steps,
                     traffic[-1].total_bytes if traffic else 0, sum(expected.values()),
                     sum(s.size * s.dtype.itemsize for s in jax.tree.leaves(stale)), sum(expected_stale.values()),
                     "×".join(f"{axis}={sizes[axis]}" for axis in MESH_AXES if axis in strategy.axes))


def runs_that_fit(config, side: int, device_counts: list[int], cfg: int, strategies: list[Strategy]):
  """[(strategy, mesh)] of every strategy's every split of each device count that fits the model.

  Raises the first misfit's ValueError when some device count fits no strategy (before anything runs);
  prints why each other misfit is skipped.
  """
  fitting = []
  for count in device_counts:
    misfits, before = [], len(fitting)
    for strategy in strategies:
      for split in strategy.image_splits(count):
        mesh = make_mesh(1, cfg, **{PATCH: 1, **split})  # too few devices fail here
        try:
          strategy.validate(config, side, side, axis_sizes(mesh))
        except ValueError as error:
          misfits.append((f"{strategy.name} on {describe(mesh)}", error))
          continue
        fitting.append((strategy, mesh))
    if len(fitting) == before and misfits:
      raise misfits[0][1]
    for where, error in misfits:
      print(f"{where} skipped: {error}")
  return fitting


def run(config: str | None, resolution: int, patches: list[int], cfg: int, steps: int, warmup_steps: int,
        dtype: str, iters: int, model: str = "unet") -> list[StrategyRun]:
  model_config_ = model_config(model, config)
  side = latent_size(model_config_, resolution)
  chosen = [with_shared_options(name, {"warmup_steps": warmup_steps}) for name in strategy_names()
            if strategy_class(name).axes and strategy_class(name).supports(model_config_)]
  fitting = runs_that_fit(model_config_, side, patches, cfg, chosen)
  jdtype = DTYPES[dtype]
  denoiser = random_unet(model_config_, jdtype)
  noise = np.random.default_rng(0).standard_normal((1, side, side, model_config_.in_channels), np.float32)
  cond, uncond = (standin_conditioning(model_config_, 1, (resolution, resolution), seed=seed, zeros=zeros)
                  for seed, zeros in ((1, False), (2, True)))
  dtype_bytes = np.dtype(jdtype).itemsize
  print(f"strategies, {config_name(model, config)} at "
        f"{resolution}² ({side}² latent), {steps} DDIM steps with CFG, {dtype}, displaced warm-up "
        f"{warmup_steps}, on {device_name()}")
  single = _measure(denoiser, noise, cond, uncond, make_mesh(1, cfg, 1), Strategy.single(), steps, iters,
                    dtype_bytes)
  printed = columns(single.step_s)
  print(table.header(printed))
  print(table.line(printed, single))
  runs = [single]
  for strategy, mesh in fitting:
    runs.append(_measure(denoiser, noise, cond, uncond, mesh, strategy, steps, iters, dtype_bytes))
    print(table.line(printed, runs[-1]))
  print("comm: bytes one interior device receives per step in the last phase (displaced: the stale "
        "phase), read from the compiled HLO; stale: the displaced carry per device.")
  return runs
