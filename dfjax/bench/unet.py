"""`dfjax bench unet`: one UNet step with classifier-free guidance, dfjax against diffusers.

Both sides run the same config with random weights (no checkpoint), the same batch (2: one image
and its unconditional twin) and the same dtype, in one process on one device. Per resolution:
compile time, median step latency after compilation, peak device memory, achieved TFLOP/s and
the speed ratio to diffusers' PyTorch UNet, eager and `torch.compile`d.

TFLOP/s use the analytic FLOP count of the forward (dfjax/bench/flops.py), the same for every
row; the XLA column checks it against the cost analysis of the compiled program (XLA counts only
the conv taps inside the image, and elementwise work too; on GPUs it does not see inside cuDNN's
fused attention, so there it falls short by the attention share).
"""

import dataclasses
import itertools
import math
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert.format import read_unet_config
from dfjax.bench import table
from dfjax.bench.flops import analytic_unet_flops
from dfjax.bench.table import Column
from dfjax.bench.timing import compile_and_time, device_name, median_seconds
from dfjax.inputs import standin_conditioning
from models.config import UNetConfig
from models.build import abstract_model
from models.presets import PRESETS, unet_preset
from models.unet import UNet2DConditionModel

DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}
GIB = 2**30
_POOL = 1 << 20  # random values every weight is cut from


@dataclasses.dataclass(frozen=True)
class UNetTiming:
  """One implementation at one resolution. Bytes and FLOPs are None where not measurable."""

  impl: str
  resolution: int
  compile_s: float | None
  step_s: float
  peak_bytes: int | None  # device memory high-water mark (JAX: since the process started)
  flops: int              # analytic, one forward of the whole batch
  xla_flops: float | None = None


def columns(timings: list[UNetTiming], matmul_rate: float) -> tuple[Column, ...]:
  """The printed table's columns: diffusers' step time at the row's resolution is the reference of
  ×eager and ×compile, `matmul_rate` (the device's FLOP/s) that of "of mm"."""
  step_s = {(t.impl, t.resolution): t.step_s for t in timings}

  def speedup(impl: str):
    reference = lambda t: step_s.get((impl, t.resolution))
    return lambda t: reference(t) and f"{reference(t) / t.step_s:.2f}×"

  rate = lambda t: t.flops / t.step_s
  return (Column("impl", "impl", width=18, align="<"), Column("res", "resolution", width=5),
          Column("compile s", "compile_s", ".1f", 9), Column("step ms", "step_s", ".1f", 10, 1e3),
          Column("peak GiB", "peak_bytes", ".2f", 8, 1 / GIB, missing="n/a"),
          Column("TFLOP/s", rate, ".2f", 8, 1e-12),
          Column("of mm", lambda t: f"{100 * rate(t) / matmul_rate:.0f}%", width=6),
          Column("XLA/anl", lambda t: t.xla_flops and t.xla_flops / t.flops, ".3f", 8),
          Column("×eager", speedup("diffusers eager"), width=8),
          Column("×compile", speedup("diffusers compile"), width=8))


def load_config(name_or_path: str) -> dict:
  """A preset name (see models/presets.py) or a diffusers UNet config.json path, checked to be a UNet's."""
  if name_or_path in PRESETS:
    return unet_preset(name_or_path)
  if not os.path.isfile(name_or_path):
    raise ValueError(f"--config {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json file.")
  return read_unet_config(Path(name_or_path))


def latent_size(config: UNetConfig, resolution: int, patches: int = 1) -> int:
  """Latent side for an image side (the VAE downsamples by 8), checked against the UNet and patches.

  The fit itself is the model's one check (`config.check_latent_size`); the advice it gets here
  is in image pixels, the unit of --resolution.
  """
  if not isinstance(resolution, int) or resolution < 8 or resolution % 8:
    valid = sorted({max(8, resolution // 8 * 8), resolution // 8 * 8 + 8})
    raise ValueError(f"resolution {resolution} is not a positive multiple of 8 (the VAE's downsampling); "
                     f"nearest valid: {valid}.")
  side = resolution // 8
  try:
    config.check_latent_size(side, side, row_splits=patches)
  except ValueError as error:
    smallest = next(s for s in itertools.count(1) if _fits(config, s, patches))
    near = [next(s for s in range(side - 1, 0, -1) if _fits(config, s, patches))] if side > smallest else []
    near.append(next(s for s in itertools.count(side + 1) if _fits(config, s, patches)))
    raise ValueError(f"resolution {resolution} (latent {side}) does not fit: {error}. "
                     f"Image sides that fit{f' {patches} patches' if patches > 1 else ''}: multiples "
                     f"of {8 * smallest}, e.g. {[8 * s for s in near]}.") from None
  return side


def _fits(config: UNetConfig, side: int, patches: int) -> bool:
  try:
    config.check_latent_size(side, side, row_splits=patches)
  except ValueError:
    return False
  return True


def random_unet(config, dtype, seed: int = 0) -> nnx.Module:
  """The UNet (or any model `models.build.abstract_model` builds: DiT, PixArt, the VAE) of `config` with
  random weights, in seconds even at SDXL size, compiling nothing.

  The module is built abstractly (`nnx.eval_shape`); each weight is then cut on the host from
  one pool of 2^20 Gaussian values (at a per-weight offset, scaled by 1/√fan_in like the model's
  initialiser), norm scales are ones and biases zeros. Step times do not depend on the values.
  """
  abstract = abstract_model(config, dtype=dtype, param_dtype=dtype)
  graphdef, state = nnx.split(abstract)
  pool = np.random.default_rng(seed).standard_normal(_POOL, dtype=np.float32)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(state)

  def fill(index: int, path, leaf: jax.ShapeDtypeStruct) -> np.ndarray:
    names = [str(getattr(p, "key", getattr(p, "name", ""))) for p in path]
    if len(leaf.shape) == 1:
      return (np.ones if "scale" in names else np.zeros)(leaf.shape, leaf.dtype)
    fan_in = math.prod(leaf.shape[:-1])
    values = np.roll(pool, -(index * 7919) % _POOL) / np.float32(math.sqrt(fan_in))
    return np.resize(values.astype(leaf.dtype), leaf.shape)

  host = [fill(i, path, leaf) for i, (path, leaf) in enumerate(leaves)]
  return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, jax.device_put(host)))


def parameter_count(model: nnx.Module) -> int:
  return sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def unet_inputs(config: UNetConfig, batch: int, height: int, width: int) -> tuple:
  """(x NHWC, timesteps, encoder_hidden_states, other conditioning kwargs) as fp32 numpy, 77 text tokens."""
  x = np.random.default_rng(0).standard_normal((batch, height, width, config.in_channels), np.float32)
  cond = standin_conditioning(config, batch, (8 * height, 8 * width)).as_kwargs()  # image pixels: VAE ×8
  t = np.full((batch,), 500.0, np.float32)
  return x, t, cond.pop("encoder_hidden_states"), cond


def peak_device_bytes(device=None) -> int | None:
  """The device allocator's high-water mark, or None where there is none (CPU)."""
  stats = (device or jax.devices()[0]).memory_stats()
  return (stats or {}).get("peak_bytes_in_use")


def compiled_flops(compiled: jax.stages.Compiled) -> float | None:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return (cost or {}).get("flops")


def matmul_rate(dtype, size: int | None = None, iters: int = 5) -> tuple[float, int]:
  """(FLOP/s, size) of square `size`² matmuls in `dtype` on the default device: the rate to compare with."""
  size = size or (1024 if jax.devices()[0].platform == "cpu" else 8192)
  a = jax.device_put(np.random.default_rng(0).standard_normal((size, size), np.float32).astype(dtype))
  return 2 * size**3 / compile_and_time(jax.jit(lambda a: a @ a).lower(a), (a,), iters, warmup=1).run_s, size


def time_jax(model: UNet2DConditionModel, resolution: int, batch: int, iters: int) -> UNetTiming:
  config = model.config
  side = latent_size(config, resolution)
  graphdef, params = nnx.split(model)
  x, t, context, extra = jax.device_put(unet_inputs(config, batch, side, side))

  @jax.jit
  def forward(params, x, t, context, extra):
    return nnx.merge(graphdef, params)(x, t, context, **extra)

  args = (params, x, t, context, extra)
  timed = compile_and_time(forward.lower(*args), args, iters, warmup=1)
  return UNetTiming("dfjax (jax)", resolution, timed.compile_s, timed.run_s, peak_device_bytes(),
                    analytic_unet_flops(config, side, side, batch), compiled_flops(timed.compiled))


def idle_cores(seconds: float = 0.5) -> float | None:
  """Cores left idle by every other process over `seconds` (Linux /proc/stat), None where unknown."""
  def sample():
    with open("/proc/stat") as f:
      ticks = [int(v) for v in f.readline().split()[1:]]
    return ticks[3] + ticks[4], sum(ticks)  # idle + iowait, all
  try:
    idle0, total0 = sample()
    time.sleep(seconds)
    idle1, total1 = sample()
  except (OSError, ValueError, IndexError):
    return None
  return os.cpu_count() * (idle1 - idle0) / max(total1 - total0, 1)


def torch_threads(requested: int | None) -> str:
  """Sets PyTorch's CPU threads and says why: as asked, else one per core other processes leave idle.

  More OpenMP threads than idle cores make every barrier wait on a descheduled thread: on a
  2-core machine with one core busy, 2 threads run a small UNet ~40× slower than 1.
  """
  import torch
  cores = len(os.sched_getaffinity(0))
  if requested:
    torch.set_num_threads(requested)
    return f"{torch.get_num_threads()} threads (--torch-threads; {cores} cores)"
  idle = idle_cores()
  torch.set_num_threads(max(1, min(cores, round(idle))) if idle is not None else cores)
  count = torch.get_num_threads()
  busy = "" if idle is None else f", {idle:.1f} of them idle: other processes use the rest"
  return f"{count} thread{'s' * (count > 1)} (one per idle core; this process may use {cores} cores{busy})"


def time_torch(config_dict: dict, resolutions: list[int], batch: int, dtype: str, iters: int,
               compile: bool) -> list[UNetTiming]:
  """diffusers' UNet at each resolution: eager, then (with `compile`) torch.compile'd."""
  import torch
  from diffusers import UNet2DConditionModel as TorchUNet

  config = UNetConfig.from_diffusers_config(config_dict)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
  with torch.device(device):
    model = TorchUNet.from_config(config_dict).eval()
  if tdtype != torch.float32:
    model = model.to(dtype=tdtype)
  compiled = torch.compile(model) if compile else None
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  timings = []
  for resolution in resolutions:
    side = latent_size(config, resolution)
    x, t, context, extra = unet_inputs(config, batch, side, side)
    as_torch = lambda a: torch.from_numpy(np.asarray(a)).to(device)
    x = as_torch(x).permute(0, 3, 1, 2).to(tdtype).contiguous()
    kwargs = {"added_cond_kwargs": {k: as_torch(v).to(tdtype) for k, v in extra.items() if k != "class_labels"}}
    if "class_labels" in extra:
      kwargs["class_labels"] = as_torch(extra["class_labels"])
    t, context = as_torch(t), as_torch(context).to(tdtype)
    flops = analytic_unet_flops(config, side, side, batch)
    for impl, forward in (("diffusers eager", model), ("diffusers compile", compiled)):
      if forward is None:
        continue

      def run(forward=forward):
        with torch.inference_mode():
          forward(x, t, context, **kwargs)
        sync()

      if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
      start = time.perf_counter()
      run()  # eager: warm-up; compiled: compilation (and recompilation for a new shape)
      compile_s = time.perf_counter() - start if forward is compiled else None
      step_s = median_seconds(run, iters, warmup=0)
      peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
      timings.append(UNetTiming(impl, resolution, compile_s, step_s, peak, flops))
  return timings


def run(config: str, resolutions: list[int], batch: int, dtype: str, iters: int, torch_ref: bool,
        torch_compile: bool, threads: int | None = None) -> list[UNetTiming]:
  """Measures and prints; returns the timings."""
  config_dict = load_config(config)
  unet_config = UNetConfig.from_diffusers_config(config_dict)
  for resolution in resolutions:  # bad sizes fail before anything is built
    latent_size(unet_config, resolution)
  if batch < 1:
    raise ValueError(f"--batch {batch} must be at least 1 (2 = one image with classifier-free guidance).")
  if torch_ref:  # JAX must not take the GPU's memory up front: diffusers runs after it in this process
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  model = random_unet(unet_config, DTYPES[dtype])
  reference = (f", {analytic_unet_flops(unet_config, 128, 128) / 1e12:.2f} TFLOPs per 1024² forward per image"
               if 128 % unet_config.downsample_factor == 0 else "")
  print(f"UNet {config} ({parameter_count(model) / 1e9:.3f} B parameters{reference}) on {device_name()}, "
        f"batch {batch} (one image with CFG = 2), {dtype}, random weights, median of {iters} steps after compilation")
  peak_rate, size = matmul_rate(DTYPES[dtype])
  print(f"measured {dtype} matmul rate of this device: {peak_rate / 1e12:.2f} TFLOP/s ({size}² × {size}²)")
  jax_timings = [time_jax(model, resolution, batch, iters) for resolution in resolutions]
  del model
  torch_timings = []
  if torch_ref:
    print(f"diffusers: PyTorch {_torch_version()} on {_torch_device()}"
          + ("" if _torch_device() != "cpu" else f", {torch_threads(threads)}"))
    torch_timings = time_torch(config_dict, resolutions, batch, dtype, iters, torch_compile)
  by_resolution = sorted(jax_timings + torch_timings, key=lambda t: resolutions.index(t.resolution))
  print(table.render(columns(by_resolution, peak_rate), by_resolution))
  print("TFLOP/s: analytic FLOPs of the forward (convs, linears, attention matmuls) / step time; of mm: that over "
        "the measured matmul rate; XLA/anl: XLA's "
        "cost-analysis FLOPs over the analytic count; ×eager/×compile: diffusers' step time over this row's; peak: "
        "device allocator high-water mark (JAX: since start-up; n/a on CPU).")
  return jax_timings + torch_timings


def _torch_version() -> str:
  import torch
  return torch.__version__


def _torch_device() -> str:
  import torch
  return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
