"""`dfjax bench vae`: patch-parallel VAE decode against single-device decode, time and memory per device.

For each image side and patch count N (1 = one device), compiles `decode_latents` on a mesh of N
devices (the latent rows split over `patch`) and reads the compiled program's memory analysis: the
activations (XLA's temporary buffers), the replicated weights and the output rows one device holds.
A program whose devices together need more memory than the machine has is not run (on a CPU the
virtual devices share the host's memory, so N of them need N times one device's); the others are
timed (median after a warm-up). The anchor is xDiT's DistVAE: patch-parallel decode reaches 10240²
images where one GPU runs out of memory at 8192².
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import jax
import numpy as np

from dfjax.bench import table
from dfjax.bench.table import Column
from dfjax.bench.timing import block, device_name, median_seconds
from dfjax.bench.unet import DTYPES, GIB, parameter_count, peak_device_bytes, random_unet
from dfjax.vae_decode import prepare_decode
from models.layers import Workload
from models.vae import AutoencoderKL
from models.vae_config import VAE_PRESETS, VAEConfig, vae_preset
from sharding.mesh import make_mesh

_HEADROOM = 0.8  # the share of free memory a run may plan to use
DEFAULT_RESOLUTIONS = {"cpu": (256, 512, 1024), "accelerator": (1024, 2048, 4096)}


@dataclasses.dataclass(frozen=True)
class VAEBenchConfig:
  """Settings of one `dfjax bench vae` run.

  Attributes:
    config: a VAE preset (models/vae_config.py) or a diffusers AutoencoderKL config.json.
    resolution: image sides in pixels (square images; the latent side is this over the VAE's factor);
      None: `DEFAULT_RESOLUTIONS` of the platform (a CPU decodes 4096² in minutes, not seconds).
    patch: patch counts to compare with one device (each ≥ 2).
    dtype: weights and activations ("fp32", "bf16", "fp16"; GroupNorm statistics and softmax in fp32).
    iters: timed decodes per configuration (median).
    compile_only: compile and read the memory analysis, run nothing (e.g. full-size VAEs on a CPU).
  """

  config: str = "tiny-sd"
  resolution: tuple[int, ...] | None = None
  patch: tuple[int, ...] = (2, 4, 8)
  dtype: str = "fp32"
  iters: int = 3
  compile_only: bool = False

  def __post_init__(self):
    if not self.patch or any(p < 2 for p in self.patch):
      raise ValueError(f"patch counts {list(self.patch)} must be 2 or more (1, one device, is always measured)")
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype {self.dtype!r}; valid: {', '.join(DTYPES)}")
    if not isinstance(self.iters, int) or self.iters < 1:
      raise ValueError(f"iters={self.iters!r} must be a positive integer")


@dataclasses.dataclass(frozen=True)
class DecodeRun:
  """One image side on N devices. Memory is per device, from the compiled program; `decode_s` is None for
  a program that was not run (`fits` False, or compile only)."""

  resolution: int
  patch: int
  compile_s: float
  decode_s: float | None
  activation_bytes: int  # XLA's temporary buffers: the activations
  weight_bytes: int      # the program's arguments: replicated weights and this device's latent rows
  output_bytes: int      # this device's image rows
  peak_bytes: int | None  # the device allocator's high-water mark (GPU; None on CPU)
  fits: bool
  flops: int  # analytic, the whole decode (every device's share)

  @property
  def device_bytes(self) -> int:
    return self.activation_bytes + self.weight_bytes + self.output_bytes


def columns(runs: list[DecodeRun]) -> tuple[Column, ...]:
  """The printed table's columns; each side's one-device run is the reference of the "vs 1" columns."""
  single = {run.resolution: run for run in runs if run.patch == 1}

  def versus(value):
    def ratio(run):
      reference = single.get(run.resolution)
      mine, theirs = value(run), reference and value(reference)
      return f"{mine / theirs:.2f}" if mine and theirs else None
    return ratio

  return (Column("image", lambda r: f"{r.resolution}²", width=6), Column("patch", "patch", width=5),
          Column("compile s", "compile_s", ".1f", 9),
          Column("decode s", lambda r: r.decode_s if r.decode_s is not None else "not run" if r.fits else "no fit",
                 ".3f", 9),
          Column("×speed", versus(lambda r: r.decode_s and 1 / r.decode_s), width=6),
          Column("TFLOP/s", lambda r: r.decode_s and r.flops / r.decode_s, ".3f", 7, 1e-12),
          Column("act GiB", "activation_bytes", ".3f", 8, 1 / GIB, group="per device (compiled)"),
          Column("×1 dev", versus(lambda r: r.activation_bytes), width=6, group="per device (compiled)"),
          Column("total GiB", "device_bytes", ".3f", 9, 1 / GIB, group="per device (compiled)"),
          Column("peak GiB", "peak_bytes", ".3f", 8, 1 / GIB, missing="n/a"))


def load_config(name_or_path: str) -> VAEConfig:
  """A VAE preset name or a diffusers AutoencoderKL config.json path."""
  if name_or_path in VAE_PRESETS:
    return VAEConfig.from_diffusers_config(vae_preset(name_or_path))
  if not os.path.isfile(name_or_path):
    raise ValueError(f"--config {name_or_path!r} is neither a VAE preset ({', '.join(VAE_PRESETS)}) nor a "
                     "config.json file.")
  return VAEConfig.from_diffusers_config(json.loads(Path(name_or_path).read_text()))


def latent_side(config: VAEConfig, resolution: int) -> int:
  """The latent side of an image side, which must be a positive multiple of the VAE's factor."""
  f = config.downsample_factor
  if not isinstance(resolution, int) or resolution < f or resolution % f:
    raise ValueError(f"resolution {resolution} is not a positive multiple of {f} (the VAE's {config.num_levels} "
                     f"levels); nearest valid: {sorted({max(f, resolution // f * f), resolution // f * f + f})}.")
  return resolution // f


def free_memory_bytes(device=None) -> int:
  """Memory one more program may use: the device's free memory, or on a CPU the host's available memory."""
  device = device or jax.devices()[0]
  stats = device.memory_stats() or {}
  if "bytes_limit" in stats:
    return stats["bytes_limit"] - stats.get("bytes_in_use", 0)
  return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _measure(vae: AutoencoderKL, resolution: int, patch: int, iters: int, compile_only: bool) -> DecodeRun:
  side = latent_side(vae.config, resolution)
  latents = np.random.default_rng(0).standard_normal((1, side, side, vae.config.latent_channels), np.float32)
  devices = jax.devices()[:patch]
  program = prepare_decode(vae, latents, mesh=make_mesh(1, 1, patch, devices=devices))
  start = time.perf_counter()
  compiled = program.lowered.compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  # Virtual CPU devices share the host's memory; separate devices each have their own.
  sharing = len(devices) if devices[0].platform == "cpu" else 1
  device_bytes = memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes
  run = DecodeRun(resolution, patch, compile_s, None, memory.temp_size_in_bytes, memory.argument_size_in_bytes,
                  memory.output_size_in_bytes, None,
                  fits=device_bytes * sharing <= _HEADROOM * free_memory_bytes(devices[0]),
                  flops=sum(vae.decode_cost(Workload(side, side, 0)).flops.values()))
  if compile_only or not run.fits:
    return run
  decode_s = median_seconds(lambda: block(compiled(*program.inputs)), iters, warmup=1)
  return dataclasses.replace(run, decode_s=decode_s, peak_bytes=peak_device_bytes(devices[0]))


def run(settings: VAEBenchConfig) -> list[DecodeRun]:
  """Measures and prints, row by row; returns the rows."""
  config = load_config(settings.config)
  platform = "cpu" if jax.devices()[0].platform == "cpu" else "accelerator"
  resolutions = settings.resolution or DEFAULT_RESOLUTIONS[platform]
  for resolution in resolutions:  # bad sizes and patch counts fail before anything is built
    side = latent_side(config, resolution)
    for patch in settings.patch:
      config.check_latent_size(side, side, row_splits=patch)
  make_mesh(1, 1, max(settings.patch))  # too few devices fail here
  dtype = DTYPES[settings.dtype]
  vae = random_unet(config, dtype)  # weights cut on the host: no compile (minutes for the SD VAE's init)
  print(f"VAE decode, {settings.config} ({parameter_count(vae.decoder) / 1e6:.1f} M decoder parameters, "
        f"×{config.downsample_factor}), batch 1, {settings.dtype}, random weights, on {device_name()}; "
        f"median of {settings.iters} decodes")
  rows = [(resolution, patch) for resolution in resolutions for patch in (1, *settings.patch)]
  runs: list[DecodeRun] = []
  for resolution, patch in rows:
    runs.append(_measure(vae, resolution, patch, settings.iters, settings.compile_only))
    printed = columns(runs)
    if len(runs) == 1:
      print(table.header(printed))
    print(table.line(printed, runs[-1]))
  print("TFLOP/s: the decode's analytic FLOPs (convs, linears, attention matmuls) / its time; "
        "act: XLA's temporary buffers of one device's program (its activations); total: + weights, latent and image "
        "rows; ×1 dev: over one device's decode of the same image; no fit: the devices would need more than "
        f"{_HEADROOM:.0%} of the free memory, so it was compiled, not run. Anchor: xDiT's DistVAE decodes 10240² "
        "where one GPU runs out of memory at 8192².")
  return runs
