"""`dfjax generate`: its flags, and the report of a `dfjax.generation` run (times, PSNR/SSIM, files)."""

from __future__ import annotations

import time

import numpy as np

from dfjax.bench.timing import device_name
from dfjax.commands.options import (add_groupnorm_argument, add_strategy_argument, strategies_over,
                                   strategies_taking)
from dfjax.generation import REFERENCE, GenerateConfig, GenerateResult, StrategyRun, generate
from sharding.axes import PATCH


def register(commands) -> None:
  """Adds `generate` to the `dfjax` parser's subcommands, its defaults from GenerateConfig."""
  d = GenerateConfig()
  parser = commands.add_parser(
      "generate", help=f"sample with {'/'.join(d.strategies)}, write PNGs, print times and PSNR",
      description="Samples one batch with each strategy on the same noise, writes each strategy's "
      f"images and a side-by-side sheet with the amplified difference from `{REFERENCE}` to --out, and "
      f"prints compile and sampling time and PSNR/SSIM against `{REFERENCE}`. With no checkpoint it runs "
      "the embedded model (class-conditional, 64×64 RGB, one image per class). On a CPU the devices "
      "are virtual and share the cores: times show cost, not speed-up.")
  parser.add_argument("--checkpoint", metavar="DIR",
                      help="a `dfjax train` model folder, or a `dfjax convert`ed diffusers UNet. dfjax has "
                      "no text encoder or VAE yet: a text-to-image UNet runs text-free (seeded random "
                      "prompt embeddings of its cross-attention width, zeros for the unconditional half), "
                      "and its latents are drawn as pictures of their first 3 channels, not decoded")
  parser.add_argument("--devices", type=int, default=None,
                      help="virtual CPU devices (same as the global --cpu-devices; ignored on accelerators)")
  parser.add_argument("--patch", type=int, default=None,
                      help=f"row patches of {strategies_over(PATCH)} (default: all devices the cfg axis "
                      "leaves, at most 8 for 64 rows)")
  parser.add_argument("--cfg", type=int, default=d.cfg,
                      help="2 runs the guidance halves on two device groups (mesh cfg × patch)")
  add_strategy_argument(parser, d.strategies, f"strategies to run, in order ({REFERENCE} is the reference)")
  parser.add_argument("--steps", type=int, default=d.steps, help=f"denoising steps (default {d.steps})")
  parser.add_argument("--scheduler", default=d.scheduler,
                      help=f"ddim, euler or dpmpp_2m (default {d.scheduler})")
  parser.add_argument("--guidance", type=float, default=d.guidance_scale,
                      help=f"classifier-free guidance scale (default {d.guidance_scale:g})")
  parser.add_argument("--warmup-steps", type=int, default=d.warmup_steps,
                      help=f"{strategies_taking('warmup_steps')}: synchronous steps after the first "
                      f"(default {d.warmup_steps})")
  add_groupnorm_argument(parser, d.groupnorm)
  parser.add_argument("--seed", type=int, default=d.seed, help=f"noise seed (default {d.seed})")
  parser.add_argument("--images", type=int, default=None, help="batch size (default: one image per class)")
  parser.add_argument("--size", type=int, default=None,
                      help="sample side in rows (default: the model's sample_size)")
  parser.add_argument("--out", default=d.out, help=f"output folder (default ./{d.out})")
  parser.set_defaults(run=_run_args)


def _run_args(args) -> None:
  run(GenerateConfig(
      checkpoint=args.checkpoint, strategies=tuple(args.strategy), patch=args.patch, cfg=args.cfg,
      steps=args.steps, scheduler=args.scheduler, guidance_scale=args.guidance,
      warmup_steps=args.warmup_steps, groupnorm=args.groupnorm, seed=args.seed, images=args.images,
      size=args.size, out=args.out),
      command=args.command_line)


def run(config: GenerateConfig, command: str = "dfjax generate") -> GenerateResult:
  """`dfjax generate`: samples, writes the images and prints the table with machine and command."""
  start = time.perf_counter()
  result = generate(config)
  print(f"model: {result.description}")
  print(f"machine: {device_name()}; command: {command}; wall time {time.perf_counter() - start:.0f} s")
  print(format_table(result.runs))
  print(f"wrote {', '.join(str(f) for f in result.files)}")
  return result


def format_table(runs: list[StrategyRun]) -> str:
  """Per strategy: mesh, compile and sampling seconds, mean PSNR / SSIM against the reference."""
  rows = [f"{'strategy':<10} {'mesh':<42} {'compile s':>9} {'sample s':>9} {'PSNR dB':>8} {'SSIM':>6}"]
  for run in runs:
    if run.psnr_db is None:
      psnr, ssim = "—", "—"
    elif run.name == REFERENCE:
      psnr, ssim = "ref", "ref"
    else:
      psnr, ssim = f"{np.mean(run.psnr_db):.2f}", f"{np.mean(run.ssim):.3f}"
    rows.append(f"{run.name:<10} {run.mesh:<42} {run.compile_s:9.1f} {run.sample_s:9.1f} {psnr:>8} {ssim:>6}")
  return "\n".join(rows)
