"""`dfjax bench strategies`: per-step time, communication and stale memory of each strategy.

For every patch count, runs single and every registered strategy that splits rows over `patch`
(exact, displaced, naive, …) on the same inputs in one process, reads each compiled program's
per-step collectives (sharding/accounting/comm.py) and its stale buffers, and prints them beside
the strategy's analytic figures (`expected_traffic`, `stale_bytes`).
On a CPU the devices are virtual and share the cores: times are CPU numbers, not speedups.
"""

import dataclasses

import jax
import numpy as np
from flax import nnx

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


HEADER = (f"{'strategy':<10} {'patch':>5} {'compile s':>9} {'ms/step':>9} {'vs single':>9} "
          f"{'comm MiB/step':>13} {'analytic':>9} {'stale MiB':>9} {'analytic':>9}")


def _row(run: StrategyRun, single_s: float) -> str:
  return (f"{run.strategy:<10} {run.patch:>5} {run.compile_s:9.2f} {run.step_s * 1e3:9.1f} "
          f"{single_s / run.step_s:8.2f}× {run.comm_bytes / MIB:13.3f} {run.analytic_bytes / MIB:9.3f} "
          f"{run.stale_bytes / MIB:9.3f} {run.analytic_stale_bytes / MIB:9.3f}")


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
  jdtype = DTYPES[dtype]
  model = nnx.jit(lambda: UNet2DConditionModel(unet_config, rngs=nnx.Rngs(0), dtype=jdtype, param_dtype=jdtype))()
  rng = np.random.default_rng(0)
  noise = rng.standard_normal((1, side, side, unet_config.in_channels), np.float32)
  cond, uncond = (standin_conditioning(unet_config, 1, (resolution, resolution), seed=seed) for seed in (1, 2))
  dtype_bytes = np.dtype(jdtype).itemsize
  print(f"strategies, UNet {config} at {resolution}² ({side}² latent), {steps} DDIM steps with CFG, "
        f"{dtype}, displaced warm-up {warmup_steps}, on {device_name()}")
  print(HEADER)
  single = _measure(model, noise, cond, uncond, make_mesh(1, cfg, 1), Strategy.single(), steps, iters, dtype_bytes)
  print(_row(single, single.step_s))
  runs = [single]
  row_strategies = [with_shared_options(name, {"warmup_steps": warmup_steps})
                    for name in strategy_names() if PATCH in strategy_class(name).axes]
  for patch in patches:
    mesh = make_mesh(1, cfg, patch)
    for strategy in row_strategies:
      runs.append(_measure(model, noise, cond, uncond, mesh, strategy, steps, iters, dtype_bytes))
      print(_row(runs[-1], single.step_s))
  print("comm: bytes one interior device receives per step in the last phase (displaced: the stale "
        "phase), read from the compiled HLO; stale: the displaced carry per device.")
  return runs
