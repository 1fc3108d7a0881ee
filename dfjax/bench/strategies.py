"""`dfjax bench strategies`: per-step time, communication and stale memory of each strategy.

For every patch count, runs single and every registered strategy that splits rows over `patch`
(exact, displaced, naive, …) on the same inputs in one process, reads each compiled program's
per-step collectives (sharding/accounting/comm.py) and its stale buffers, and prints them beside
the strategy's analytic figures (`expected_traffic`, `stale_bytes`).
On a CPU the devices are virtual and share the cores: times are CPU numbers, not speedups.
"""

import dataclasses
import itertools

import jax
import numpy as np
from flax import nnx

from dfjax.bench import table
from dfjax.bench.table import Column
from dfjax.bench.timing import compile_and_time, device_name
from dfjax.bench.unet import DTYPES, latent_size, load_config
from dfjax.inputs import standin_conditioning
from dfjax.sampling import prepare_sample, stale_buffer_shapes
from models.config import UNetConfig
from models.unet import UNet2DConditionModel
from sharding.accounting import comm
from sharding.axes import CFG, DATA, PATCH
from sharding.mesh import axis_sizes, make_mesh
from sharding.strategies import Strategy, strategy_class, strategy_names, with_shared_options

MIB = 2**20


@dataclasses.dataclass(frozen=True)
class StrategyRun:
  strategy: str
  patch: int
  compile_s: float
  step_s: float
  comm_bytes: int        # measured from the compiled program, last phase, per device per step
  analytic_bytes: int
  stale_bytes: int       # measured from the model's exchanges
  analytic_stale_bytes: int


def columns(single_s: float) -> tuple[Column, ...]:
  """The printed table's columns; `single_s` (single's step time) is the reference of "vs single"."""
  return (Column("strategy", "strategy", width=10, align="<"), Column("patch", "patch", width=5),
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
  patch = sizes[PATCH]
  return StrategyRun(strategy.name, patch, compile_s, run_s / steps, traffic[-1].total_bytes if traffic else 0,
                     sum(expected.values()), sum(s.size * s.dtype.itemsize for s in jax.tree.leaves(stale)),
                     sum(expected_stale.values()))


def run(config: str, resolution: int, patches: list[int], cfg: int, steps: int, warmup_steps: int,
        dtype: str, iters: int) -> list[StrategyRun]:
  unet_config = UNetConfig.from_diffusers_config(load_config(config))
  side = latent_size(unet_config, resolution)
  row_strategies = [with_shared_options(name, {"warmup_steps": warmup_steps})
                    for name in strategy_names() if PATCH in strategy_class(name).axes]
  meshes = {patch: make_mesh(1, cfg, patch) for patch in patches}  # too few devices fail here
  for strategy, mesh in itertools.product(row_strategies, meshes.values()):  # bad patch counts, before `single`
    strategy.validate(unet_config, side, side, axis_sizes(mesh))
  jdtype = DTYPES[dtype]
  model = nnx.jit(lambda: UNet2DConditionModel(unet_config, rngs=nnx.Rngs(0), dtype=jdtype, param_dtype=jdtype))()
  rng = np.random.default_rng(0)
  noise = rng.standard_normal((1, side, side, unet_config.in_channels), np.float32)
  cond, uncond = (standin_conditioning(unet_config, 1, (resolution, resolution), seed=seed) for seed in (1, 2))
  dtype_bytes = np.dtype(jdtype).itemsize
  print(f"strategies, UNet {config} at {resolution}² ({side}² latent), {steps} DDIM steps with CFG, "
        f"{dtype}, displaced warm-up {warmup_steps}, on {device_name()}")
  single = _measure(model, noise, cond, uncond, make_mesh(1, cfg, 1), Strategy.single(), steps, iters, dtype_bytes)
  printed = columns(single.step_s)
  print(table.header(printed))
  print(table.line(printed, single))
  runs = [single]
  for mesh in meshes.values():
    for strategy in row_strategies:
      runs.append(_measure(model, noise, cond, uncond, mesh, strategy, steps, iters, dtype_bytes))
      print(table.line(printed, runs[-1]))
  print("comm: bytes one interior device receives per step in the last phase (displaced: the stale "
        "phase), read from the compiled HLO; stale: the displaced carry per device.")
  return runs
