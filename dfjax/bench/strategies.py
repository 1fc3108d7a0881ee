"""`dfjax bench strategies`: per-step time, communication and stale memory of each strategy.

For a UNet, DiT or PixArt (`--model`, `--config`) and every device count, runs single and every
registered strategy that splits an image and runs that model (`strategy.supports`: exact,
displaced, naive, ulysses, ring, usp, …), in each of its ways of splitting the image over those
devices (`strategy.image_splits`: usp's ring × Ulysses degrees), on the same inputs in one process.
It reads each compiled program's per-step collectives (sharding/accounting/comm.py) and its stale
buffers, and prints them beside the strategy's analytic figures (`expected_traffic`, `stale_bytes`,
and the guidance gather). A strategy that does not fit a device count (Ulysses' heads) is skipped
with its reason, once every device count fits some strategy (the pure `tensor` strategy runs
with `--mesh`). With a hybrid mesh (`--mesh data=1,cfg=2,patch=2,tensor=2`), runs instead every strategy (of those
that run the model) that splits an image over that mesh's axes, beside the pure strategies on as
many devices per image (every patch and sequence strategy over `patch` alone, `tensor` over
`tensor` alone); each row also shows the traffic by mesh axis (read from the collectives' device
groups) and the param bytes per device.
`paper_table` prints the analytic volumes beside DistriFusion's Table 2 without running anything.
On a CPU the devices are virtual and share the cores: times are CPU numbers, not speedups.
"""

import dataclasses
import math
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from dfjax.bench import table
from dfjax.bench.models import config_name, model_config
from dfjax.bench.table import Column
from dfjax.bench.timing import compile_and_time, device_name
from dfjax.bench.unet import DTYPES, latent_size, random_unet
from dfjax.inputs import standin_conditioning
from dfjax.sampling import prepare_sample, stale_buffer_shapes
from sharding.accounting import analytic, comm
from sharding.axes import CFG, DATA, PATCH, STAGE, TENSOR, ULYSSES
from sharding.mesh import axis_sizes, describe, make_mesh
from sharding.partitioning import local_param_bytes, param_specs
from sharding.strategies import Guidance, Strategy, strategy_class, strategy_names, with_shared_options

MIB = 2**20
IMAGE_AXES = (STAGE, PATCH, ULYSSES, TENSOR)  # the axes that split one image (data and cfg split the batch)


@dataclasses.dataclass(frozen=True)
class StrategyRun:
  strategy: str
  patch: int             # devices one image is split over
  compile_s: float
  step_s: float
  comm_bytes: int        # measured from the compiled program, last phase, per device per step
  analytic_bytes: int    # the strategy's and the guidance gather's
  stale_bytes: int       # measured from the model's exchanges
  analytic_stale_bytes: int
  mesh: str = ""         # the whole mesh (`describe`), e.g. "cfg=1×patch=2×ulysses=4", "cfg=2×patch=2×tensor=2"
  comm_by_axis: Mapping[str, int] = dataclasses.field(default_factory=dict)  # measured, {mesh axes: bytes}
  param_bytes: int = 0   # params one device holds


def columns(single_s: float) -> tuple[Column, ...]:
  """The printed table's columns; `single_s` (single's step time) is the reference of "vs single"."""
  by_axis = lambda run: ", ".join(f"{axis} {size / MIB:.3f}" for axis, size in run.comm_by_axis.items()) or "—"
  return (Column("strategy", "strategy", width=10, align="<"), Column("devices", "patch", width=7),
          Column("mesh", "mesh", width=24, align="<"),
          Column("compile s", "compile_s", ".2f", 9), Column("ms/step", "step_s", ".1f", 9, 1e3),
          Column("vs single", lambda run: f"{single_s / run.step_s:.2f}×", width=9),
          Column("comm MiB/step", "comm_bytes", ".3f", 13, 1 / MIB),
          Column("analytic", "analytic_bytes", ".3f", 9, 1 / MIB),
          Column("by axis, MiB", by_axis, width=36, align="<"),
          Column("params MiB/dev", "param_bytes", ".2f", 14, 1 / MIB),
          Column("stale MiB", "stale_bytes", ".3f", 9, 1 / MIB),
          Column("analytic", "analytic_stale_bytes", ".3f", 9, 1 / MIB))


def _row_splits(strategy: Strategy, sizes: Mapping[str, int]) -> int:
  """How many devices split the latent's rows (its latent_spec's row entry: patch, usp's patch × ulysses)."""
  spec = strategy.latent_spec()
  rows = spec[1] if len(spec) > 1 else None  # pipefusion's P(DATA): every device holds whole latents
  return math.prod(sizes[axis] for axis in ((rows,) if isinstance(rows, str) else rows or ()))


def _measure(model, noise, cond, uncond, mesh, strategy, steps, iters, dtype_bytes) -> StrategyRun:
  kwargs = dict(uncond=uncond, num_steps=steps, mesh=mesh, strategy=strategy,
                scheduler_config={"clip_sample": False})
  program = prepare_sample(model, noise, cond, **kwargs)
  timed = compile_and_time(program.lowered, program.inputs, iters, warmup=1)
  compile_s, run_s, compiled = timed.compile_s, timed.run_s, timed.compiled
  traffic = comm.traffic_per_step(compiled.as_text())
  sizes = axis_sizes(mesh)
  by_axis = comm.traffic_by_axis(compiled.as_text(), sizes)
  stale = stale_buffer_shapes(model, noise, cond, **kwargs)
  config, (batch, height, width, channels) = model.config, noise.shape
  images = batch // sizes[DATA]  # this device's images
  local_batch = 2 * images // sizes[CFG]  # its share of their guidance pairs
  expected = strategy.expected_traffic(config, height, width, sizes, local_batch, dtype_bytes)
  prediction_values = images * height // _row_splits(strategy, sizes) * width * channels
  expected |= Guidance.for_mesh(True, sizes).expected_traffic(prediction_values, dtype_bytes)
  text = cond.as_kwargs().get("encoder_hidden_states")
  expected_stale = strategy.stale_bytes(config, height, width, sizes, local_batch, dtype_bytes,
                                        text_tokens=0 if text is None else text.shape[1])
  params = nnx.state(model)
  param_bytes = (local_param_bytes(params, param_specs(params, strategy.param_rules(), sizes), sizes)
                 if program.plan.staged is None else program.plan.staged.bytes_per_device())
  devices = mesh.size // (sizes[CFG] * sizes[DATA])
  return StrategyRun(strategy.name, devices, compile_s, run_s / steps,
                     traffic[-1].total_bytes if traffic else 0, sum(expected.values()),
                     _stale_bytes(stale, expected_stale), sum(expected_stale.values()),
                     describe(mesh), by_axis[-1] if by_axis else {}, param_bytes)


def _stale_bytes(stale, expected_stale: Mapping[str, int]) -> int:
  """Bytes of the stale carry the analytic figure describes: the entries it names when the carry has them
  all (PipeFusion's "kv": its K/V buffers, not the latents and ring it also carries), else all of it."""
  if isinstance(stale, Mapping) and expected_stale and set(expected_stale) <= set(stale):
    stale = {name: stale[name] for name in expected_stale}
  return sum(s.size * s.dtype.itemsize for s in jax.tree.leaves(stale))


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


def _hybrid_plans(strategies: list[Strategy], degrees: Mapping[str, int], config, side: int
                  ) -> list[tuple[Strategy, Mesh]]:
  """The pure strategies on as many devices per image as the hybrid mesh `degrees` has (those that
  fit the model), then every strategy that splits an image over the hybrid's axes, on it."""
  split = [axis for axis in IMAGE_AXES if degrees[axis] > 1]
  per_image = math.prod(degrees[axis] for axis in IMAGE_AXES)
  pure = []
  for axis in (PATCH, TENSOR):  # a pure split: all of an image's devices on the method's own axis
    mesh = make_mesh(degrees[DATA], degrees[CFG], **{PATCH: 1, axis: per_image})
    pure += [(strategy, mesh) for strategy in strategies
             if strategy.method_axis == axis and split != [axis]
             and {axis: per_image} in strategy.image_splits(per_image)  # not usp: its splits are hybrids
             and _fits(strategy, config, side, mesh)]
  hybrid_mesh = make_mesh(**degrees)
  hybrid = [(strategy, hybrid_mesh) for strategy in strategies
            if set(split) <= strategy.axes and split and strategy.method_axis == split[0]]
  if not hybrid:
    raise ValueError(f"no strategy splits an image over {' × '.join(sorted(split))}; strategies and the axes "
                     f"they split: {', '.join(f'{s.name} {sorted(s.axes)}' for s in strategies)}.")
  for strategy, mesh in hybrid:  # a hybrid that does not fit is the user's to fix: say so before running
    strategy.validate(config, side, side, axis_sizes(mesh))
  return pure + hybrid


def _fits(strategy: Strategy, config, side: int, mesh: Mesh) -> bool:
  try:
    strategy.validate(config, side, side, axis_sizes(mesh))
  except ValueError as e:
    print(f"  (skipped {strategy.name} on {describe(mesh)}: {e})")
    return False
  return True


def run(config: str | None, resolution: int, patches: list[int], cfg: int, steps: int, warmup_steps: int,
        dtype: str, iters: int, model: str = "unet", mesh: Mapping[str, int] | None = None) -> list[StrategyRun]:
  """Measures single and the strategies that run `model` (a family; `config` its preset or a UNet
  config.json). `mesh` None: over each device count of `patches` (every image split of each, tensor
  parallelism aside); `mesh` ({axis: degree}): a hybrid mesh and the pure strategies beside it instead
  of `patches`/`cfg`."""
  model_config_ = model_config(model, config)
  side = latent_size(model_config_, resolution)
  every = [with_shared_options(name, {"warmup_steps": warmup_steps}) for name in strategy_names()
           if strategy_class(name).axes and strategy_class(name).supports(model_config_)]
  if mesh is None:  # the pure `tensor` strategy runs on a --mesh (beside its hybrids)
    plans = runs_that_fit(model_config_, side, patches, cfg, [s for s in every if s.method_axis != TENSOR])
  else:
    plans = _hybrid_plans(every, mesh, model_config_, side)
    cfg = mesh[CFG]
  data = 1 if mesh is None else mesh[DATA]
  jdtype = DTYPES[dtype]
  denoiser = random_unet(model_config_, jdtype)
  noise = np.random.default_rng(0).standard_normal((data, side, side, model_config_.in_channels), np.float32)
  cond, uncond = (standin_conditioning(model_config_, data, (resolution, resolution), seed=seed, zeros=zeros)
                  for seed, zeros in ((1, False), (2, True)))
  dtype_bytes = np.dtype(jdtype).itemsize
  print(f"strategies, {config_name(model, config)} at "
        f"{resolution}² ({side}² latent), {steps} DDIM steps with CFG, {dtype}, displaced warm-up "
        f"{warmup_steps}, on {device_name()}")
  for strategy, plan_mesh in plans:
    detail = strategy.detail(model_config_, side, side, axis_sizes(plan_mesh))
    if detail:
      print(f"  {strategy.name} on {describe(plan_mesh)}: {detail}")
  single = _measure(denoiser, noise, cond, uncond, make_mesh(data, cfg, 1), Strategy.single(), steps, iters,
                    dtype_bytes)
  printed = columns(single.step_s)
  print(table.header(printed))
  print(table.line(printed, single))
  runs = [single]
  for strategy, plan_mesh in plans:
    runs.append(_measure(denoiser, noise, cond, uncond, plan_mesh, strategy, steps, iters, dtype_bytes))
    print(table.line(printed, runs[-1]))
  print("comm: bytes one interior device receives per step in the last phase (displaced: the stale "
        "phase; pipefusion: its steady phase, every micro-step of the step counted), read from the compiled "
        "HLO (by axis: each collective under the mesh axes its device groups span; an all-reduce counts its "
        "payload); stale: the displaced carry per device (pipefusion: its K/V buffers). asyncdiff: its "
        "asynchronous phase's point-to-point sends summed over the devices that receive them and the model "
        "output's broadcast; every device carries one buffer of each; params: its component's and the "
        "conditioning embeddings.")
  return runs


# ---------------------------------------------------------------------------------- DistriFusion's Table 2

# DistriFusion (Li et al., CVPR 2024) Table 2: communication per step of SDXL on 8 devices, GB.
PAPER_TABLE_2 = {"tensor": {1024: 1.33, 2048: 5.33, 3840: 18.7}, "patch": {1024: 0.42, 2048: 1.48, 3840: 5.38}}


@dataclasses.dataclass(frozen=True)
class PaperRow:
  resolution: int
  tensor_payload: int   # analytic all-reduce payload per device (what the HLO reader counts)
  tensor_ring: int      # what a ring all-reduce of that payload sends per device
  patch_received: int   # exact patch parallelism: bytes an interior device receives
  patch_kv: int         # the image's whole K/V (DistriFusion's stale buffers)
  paper_tensor: float
  paper_patch: float


def paper_table(config: str | None, devices: int = 8, dtype: str = "fp16", model: str = "unet") -> list[PaperRow]:
  """The analytic volumes per step of one image without guidance batch (batch 1) on `devices` devices,
  beside DistriFusion's Table 2 (GB, 10⁹ bytes), for a UNet (`config`: a preset or config.json; None: the
  tiny preset). Nothing runs: the figures come from the model's layout."""
  if model != "unet":
    raise ValueError(f"--paper-table compares a UNet with DistriFusion's Table 2 (SDXL), not a {model}: use "
                     "--model unet --config sdxl.")
  unet_config = model_config(model, config)
  size = np.dtype(DTYPES[dtype]).itemsize
  rows = []
  for resolution in PAPER_TABLE_2["tensor"]:
    side = resolution // 8
    payload = analytic.tensor_bytes(unet_config, side, side, 1, 1, size, devices)["partial_sums"]
    patch = analytic.bytes_per_step(unet_config, side, side, devices, 1, size)
    kv = analytic.stale_bytes(unet_config, side, side, devices, 1, size)["kv"]
    rows.append(PaperRow(resolution, payload, analytic.ring_allreduce_bytes(payload, devices), sum(patch.values()),
                         kv, PAPER_TABLE_2["tensor"][resolution], PAPER_TABLE_2["patch"][resolution]))
  gb = lambda name: Column(name.replace("_", " "), name, ".2f", 8, 1e-9)
  print(f"analytic communication per step, {config_name(model, config)}, one image, {dtype}, {devices} devices, "
        "GB (10⁹ B), beside DistriFusion's Table 2")
  print(table.render((Column("resolution", lambda row: f"{row.resolution}²", width=10, align="<"),
                      gb("tensor_payload"), gb("tensor_ring"), Column("paper", "paper_tensor", ".2f", 6),
                      gb("patch_received"), gb("patch_kv"), Column("paper", "paper_patch", ".2f", 6)), rows))
  print("tensor payload: every row-parallel layer's all-reduced output (one per resnet, three per transformer "
        "block); ring: 2·(n−1)/n of it, what a ring all-reduce sends per device. patch received: halos, the "
        "other patches' K/V and GroupNorm moments; kv: the whole image's K/V, which DistriFusion's devices keep.")
  return rows
