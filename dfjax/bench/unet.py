"""`dfjax bench unet`: UNet forward latency and compile time, beside diffusers' PyTorch UNet.

Both run the same config with random weights, batch (CFG doubles it) and dtype. The JAX side
reports compile time, median forward latency, XLA's FLOP count and the achieved rate.
"""

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dfjax.bench.timing import block, device_name, median_seconds
from models.config import UNetConfig
from models.presets import PRESETS, unet_preset
from models.unet import UNet2DConditionModel

DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class UNetTiming:
  impl: str
  resolution: int
  batch: int
  dtype: str
  compile_s: float | None
  step_s: float
  tflop: float | None  # per forward, from XLA's cost analysis

  def row(self, reference_s: float | None) -> str:
    compile_s = "-" if self.compile_s is None else f"{self.compile_s:8.2f}"
    rate = "-" if self.tflop is None else f"{self.tflop / self.step_s:8.3f}"
    ratio = "-" if reference_s is None else f"{reference_s / self.step_s:6.2f}×"
    return (f"{self.impl:<18} {self.resolution:>6} {self.batch:>5} {self.dtype:>5} {compile_s:>9} "
            f"{self.step_s * 1e3:10.1f} {rate:>9} {ratio:>8}")


HEADER = f"{'impl':<18} {'res':>6} {'batch':>5} {'dtype':>5} {'compile s':>9} {'step ms':>10} {'TFLOP/s':>9} {'vs torch':>8}"


def load_config(name_or_path: str) -> dict:
  """A preset name (see models/presets.py) or a diffusers config.json path."""
  if name_or_path in PRESETS:
    return unet_preset(name_or_path)
  if not os.path.isfile(name_or_path):
    raise ValueError(f"--config {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json file.")
  with open(name_or_path) as f:
    return json.load(f)


def latent_size(config: UNetConfig, resolution: int) -> int:
  """Latent side for an image side: the VAE downsamples by 8."""
  if resolution % 8:
    raise ValueError(f"resolution {resolution} is not a multiple of 8 (the VAE's downsampling).")
  side = resolution // 8
  config.check_latent_size(side, side)
  return side


def _inputs(config: UNetConfig, batch: int, side: int, dtype):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, side, side, config.in_channels), np.float32)
  context = rng.standard_normal((batch, 77, config.encoder_dim), np.float32)
  extra = {}
  if config.addition_embed_type == "text_time":
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    extra = {"text_embeds": rng.standard_normal((batch, pooled), np.float32),
             "time_ids": np.tile(np.array([[side * 8, side * 8, 0, 0, side * 8, side * 8]], np.float32), (batch, 1))}
  if config.class_embedding_kind is not None:
    extra["class_labels"] = np.zeros((batch,), np.int32)
  t = np.full((batch,), 500.0, np.float32)
  return x, t, context, extra


def time_jax(config_dict: dict, resolution: int, batch: int, dtype: str, iters: int) -> UNetTiming:
  config = UNetConfig.from_diffusers_config(config_dict)
  side = latent_size(config, resolution)
  jdtype = DTYPES[dtype]
  model = nnx.jit(lambda: UNet2DConditionModel(config, rngs=nnx.Rngs(0), dtype=jdtype, param_dtype=jdtype))()
  graphdef, params = nnx.split(model)
  x, t, context, extra = jax.tree.map(jnp.asarray, _inputs(config, batch, side, jdtype))

  @jax.jit
  def forward(params, x, t, context, extra):
    return nnx.merge(graphdef, params)(x.astype(jdtype), t, context.astype(jdtype), **extra)

  start = time.perf_counter()
  compiled = forward.lower(params, x, t, context, extra).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = (cost or {}).get("flops")
  step_s = median_seconds(lambda: block(compiled(params, x, t, context, extra)), iters)
  return UNetTiming("dfjax (jax)", resolution, batch, dtype, compile_s, step_s, flops / 1e12 if flops else None)


def time_torch(config_dict: dict, resolution: int, batch: int, dtype: str, iters: int, compile: bool = False) -> UNetTiming:
  import torch
  from diffusers import UNet2DConditionModel as TorchUNet

  config = UNetConfig.from_diffusers_config(config_dict)
  side = latent_size(config, resolution)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
  model = TorchUNet.from_config(config_dict).to(device=device, dtype=tdtype).eval()
  x, t, context, extra = _inputs(config, batch, side, None)
  as_torch = lambda a: torch.from_numpy(np.asarray(a)).to(device)
  x = as_torch(x).permute(0, 3, 1, 2).to(tdtype)
  kwargs = {"added_cond_kwargs": {k: as_torch(v).to(tdtype) for k, v in extra.items() if k != "class_labels"}}
  if "class_labels" in extra:
    kwargs["class_labels"] = as_torch(extra["class_labels"])
  t, context = as_torch(t), as_torch(context).to(tdtype)
  forward = torch.compile(model) if compile else model
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def run():
    with torch.no_grad():
      forward(x, t, context, **kwargs)
    sync()

  compile_s = None
  if compile:
    start = time.perf_counter()
    run()
    compile_s = time.perf_counter() - start
  impl = "diffusers compile" if compile else "diffusers eager"
  return UNetTiming(impl, resolution, batch, dtype, compile_s, median_seconds(run, iters), None)


def run(config: str, resolutions: list[int], batch: int, dtype: str, iters: int, torch_ref: bool,
        torch_compile: bool) -> list[UNetTiming]:
  """Measures and prints; returns the timings."""
  config_dict = load_config(config)
  print(f"UNet {config} on {device_name()}, batch {batch}, {dtype}, median of {iters}")
  print(HEADER)
  timings = []
  for resolution in resolutions:
    ours = time_jax(config_dict, resolution, batch, dtype, iters)
    refs = []
    if torch_ref:
      refs.append(time_torch(config_dict, resolution, batch, dtype, iters))
      if torch_compile:
        refs.append(time_torch(config_dict, resolution, batch, dtype, iters, compile=True))
    reference_s = refs[0].step_s if refs else None
    for timing in [ours, *refs]:
      print(timing.row(reference_s))
    timings += [ours, *refs]
  return timings
