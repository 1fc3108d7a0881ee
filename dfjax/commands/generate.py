"""`dfjax generate`: its flags, and the report of a `dfjax.generation` run (times, PSNR/SSIM, class
accuracy, files)."""

from __future__ import annotations

import time

import numpy as np

from dfjax.bench import table
from dfjax.commands import prompt
from dfjax.bench.table import Column
from dfjax.bench.timing import device_name
from dfjax.commands.options import (Flag, add_config_arguments, config_from_args, groupnorm_flag,
                                   strategies_over, strategies_taking, strategy_flag)
from dfjax.generation import (DEFAULT_STAGES, DEFAULT_STRATEGIES, REFERENCE, GenerateConfig, GenerateResult,
                              StrategyRun, generate)
from dfjax.training import EMBEDDED_MODELS
from sharding.axes import PATCH, STAGE


def register(commands) -> None:
  """Adds `generate` to the `dfjax` parser's subcommands, one flag per GenerateConfig field."""
  parser = commands.add_parser(
      "generate", help=f"sample with {'/'.join(DEFAULT_STRATEGIES)}, write PNGs, print times and PSNR",
      description="Samples one batch with each strategy on the same noise, writes each strategy's "
      f"images and a side-by-side sheet with the amplified difference from `{REFERENCE}` to --out, and "
      f"prints compile and sampling time, PSNR/SSIM against `{REFERENCE}` and the class accuracy the shipped "
      "shapes classifier gives each strategy's images. With no checkpoint it runs an embedded model "
      "(--model: a class-conditional UNet or DiT, 64×64 RGB, one image per class). On a CPU the devices "
      "are virtual and share the cores: times show cost, not speed-up.")
  add_config_arguments(parser, GenerateConfig, {
      "model": Flag("the embedded model run when no checkpoint is given", choices=list(EMBEDDED_MODELS)),
      "checkpoint": Flag(
          "a `dfjax train` model folder, or a `dfjax convert`ed diffusers UNet. dfjax has no text encoder "
          "or VAE yet: a text-to-image UNet runs text-free (seeded random prompt embeddings of its "
          "cross-attention width, zeros for the unconditional half), and its latents are drawn as pictures "
          "of their first 3 channels, not decoded", metavar="DIR"),
      "strategies": strategy_flag(f"strategies to run, in order ({REFERENCE} is the reference; default: those "
                                  f"of {' '.join(DEFAULT_STRATEGIES)} that run the model and fit the devices)"),
      "patch": Flag(f"devices per image of {strategies_over(PATCH)} (row patches), usp (ring × ulysses) and "
                    "tensor (its degree); default: all devices the cfg axis leaves, each strategy on the most of "
                    "them it fits (row patches: at most 8 for 64 rows)"),
      "stage": Flag(f"stage devices of {strategies_over(STAGE)} (pipefusion's stages, asyncdiff's components "
                    f"+ stride − 1); default: {DEFAULT_STAGES} or the devices per image if fewer, each strategy on "
                    "the most of them it fits"),
      "cfg": Flag("2 runs the guidance halves on two device groups (mesh cfg × patch)"),
      "steps": Flag("denoising steps", name="num_steps", aliases=("--steps",)),
      "scheduler": Flag("ddim, euler or dpmpp_2m"),
      "guidance_scale": Flag("classifier-free guidance scale", aliases=("--guidance",)),
      "warmup_steps": Flag(f"{strategies_taking('warmup_steps')}: synchronous steps after the first"),
      "groupnorm": groupnorm_flag(),
      "seed": Flag("noise seed"),
      "images": Flag("batch size (default: one image per class)"),
      "size": Flag("sample side in rows (default: the model's sample_size)"),
      "out": Flag("output folder")})
  parser.add_argument("--devices", type=int, default=None,
                      help="virtual CPU devices (same as the global --cpu-devices; ignored on accelerators)")
  prompt.add_arguments(parser)
  parser.set_defaults(run=_run_args)


def _run_args(args):
  config = config_from_args(GenerateConfig, args)
  if args.prompt is not None:
    return prompt.run(args, config)
  return run(config, command=args.command_line)


def run(config: GenerateConfig, command: str = "dfjax generate") -> GenerateResult:
  """`dfjax generate`: samples, writes the images and prints the table with machine and command."""
  start = time.perf_counter()
  result = generate(config)
  print(f"model: {result.description}")
  print(f"machine: {device_name()}; command: {command}; wall time {time.perf_counter() - start:.0f} s")
  for name, reason in result.skipped.items():
    print(f"skipped {name} (does not fit this model and mesh): {reason}")
  print(table.render(COLUMNS, result.runs))
  print(f"wrote {', '.join(str(f) for f in result.files)}")
  return result


def _against_reference(metric: str):
  """The column value of `metric` (psnr_db or ssim): its batch mean, "ref" for the reference itself."""
  def value(run: StrategyRun):
    values = getattr(run, metric)
    return None if values is None else "ref" if run.name == REFERENCE else float(np.mean(values))
  return value


COLUMNS = (Column("strategy", "name", width=10, align="<"), Column("mesh", "mesh", width=42, align="<"),
           Column("compile s", "compile_s", ".1f", 9), Column("sample s", "sample_s", ".1f", 9),
           Column("PSNR dB", _against_reference("psnr_db"), ".2f", 8),
           Column("SSIM", _against_reference("ssim"), ".3f", 6),
           Column("class acc", "accuracy", ".0%", 9))
