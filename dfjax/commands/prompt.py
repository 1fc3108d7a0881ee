"""`dfjax generate --prompt "…"`: a converted diffusers pipeline, prompt → images, with each strategy.

The flags `generate` shares (checkpoint, strategies, patch, cfg, steps, scheduler, guidance, warm-up,
GroupNorm mode, seed, out) come from `GenerateConfig`; this module adds the prompt path's own
(--prompt, --negative-prompt, --height, --width, --vae-patch). Every strategy runs the same prompts and
noise through `dfjax.load_pipeline`'s pipeline twice: the first call compiles, the second is timed per
stage (encode, sample, decode). Each strategy's images go to OUT/STRATEGY/IMAGE.png, and the table
gives the stage times and the PSNR against `single`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import numpy as np

from dfjax import images, metrics
from dfjax.bench import table
from dfjax.bench.table import Column
from dfjax.bench.timing import device_name
from dfjax.generation import REFERENCE, GenerateConfig, check_output_path, strategy_meshes
from dfjax.pipelines import load_pipeline
from sharding.mesh import describe


@dataclasses.dataclass(frozen=True)
class PromptRun:
  """One strategy's prompt-to-image run: where, how long each stage took, and how close it is to single."""

  name: str
  mesh: str
  first_call_s: float
  encode_s: float
  sample_s: float
  decode_s: float
  images: np.ndarray  # (B, H, W, 3) in [0, 1]
  psnr_db: float | None


def add_arguments(parser) -> None:
  """The prompt path's flags on `dfjax generate`'s parser."""
  group = parser.add_argument_group("text to image (a converted diffusers pipeline as --checkpoint)")
  group.add_argument("--prompt", nargs="+", default=None, metavar="TEXT",
                     help="prompts, one image each: runs the checkpoint's text-to-image pipeline")
  group.add_argument("--negative-prompt", default=None, metavar="TEXT",
                     help="negative prompt for every image (default: none, as diffusers)")
  group.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
  group.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
  group.add_argument("--vae-patch", type=int, default=None, metavar="N",
                     help="decode with the latent rows split over N devices (exact; default: one device)")


def run(args, config: GenerateConfig) -> list[PromptRun]:
  """Runs every strategy of `config` on `args.prompt`, writes the PNGs, prints the table."""
  if config.checkpoint is None:
    raise ValueError("--prompt needs --checkpoint: a dfjax checkpoint converted from a diffusers pipeline folder "
                     "(`dfjax convert PIPELINE DIR`)")
  out = Path(config.out)
  check_output_path(out, folder=True)
  start = time.perf_counter()
  pipe = load_pipeline(config.checkpoint)
  height, width = pipe.check_size(args.height, args.width)
  latent_rows = height // pipe.vae_scale_factor
  runs, reference = [], None
  strategies = config.for_model([config.strategy(name) for name in config.strategy_names()],
                                pipe.denoiser.config)
  meshes, skipped = strategy_meshes(strategies, pipe.denoiser.config, latent_rows, config, jax.device_count())
  for name, why in skipped.items():
    print(f"skipped {name} (does not fit this model and mesh): {why}")
  for strategy in (s for s in strategies if s.name in meshes):
    name, mesh = strategy.name, meshes[strategy.name]
    call = lambda: pipe(args.prompt, args.negative_prompt, height=height, width=width, num_steps=config.steps,
                        guidance_scale=config.guidance_scale, seed=config.seed, mesh=mesh, strategy=strategy,
                        vae_patch=args.vae_patch, scheduler=config.scheduler)
    first = time.perf_counter()
    call()  # compiles every stage
    first_s = time.perf_counter() - first
    pictures = call()
    times = pipe.last_times
    reference = pictures if name == REFERENCE else reference
    psnr = None if reference is None else float(np.mean(metrics.psnr(pictures, reference)))
    runs.append(PromptRun(name, describe(mesh), first_s, times.encode_s, times.sample_s, times.decode_s,
                          pictures, psnr))
  files = write_images(out, runs)
  print(f"pipeline: {pipe.pipeline_class} from {config.checkpoint}, {height}×{width}, {config.steps} steps, "
        f"VAE decode on {args.vae_patch or 1} device(s)")
  print(f"machine: {device_name()}; command: {args.command_line}; wall time {time.perf_counter() - start:.0f} s")
  print(table.render(COLUMNS, runs))
  print(f"wrote {len(files)} images under {out}")
  return runs


def write_images(out: Path, runs: list[PromptRun]) -> list[Path]:
  """OUT/STRATEGY/I.png for every image of every run."""
  return [images.save_png(images.to_uint8(image * 2 - 1), out / run.name / f"{i}.png")
          for run in runs for i, image in enumerate(run.images)]


def _psnr(run: PromptRun):
  return "ref" if run.name == REFERENCE else run.psnr_db


COLUMNS = (Column("strategy", "name", width=10, align="<"), Column("mesh", "mesh", width=42, align="<"),
           Column("1st call s", "first_call_s", ".1f", 10), Column("encode s", "encode_s", ".2f", 8),
           Column("sample s", "sample_s", ".2f", 8), Column("decode s", "decode_s", ".2f", 8),
           Column("PSNR dB", _psnr, ".2f", 8))
