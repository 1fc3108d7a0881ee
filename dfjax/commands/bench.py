"""`dfjax bench unet | strategies | fidelity | quality | simulate | vae | train`: the flags of each measurement.

The measurements themselves live in dfjax/bench/; this module only parses flags and calls them.
"""

from __future__ import annotations

from dfjax.bench import fidelity, quality, simulate, simulate_stages, strategies, train, unet, vae
from dfjax.commands.options import (Flag, add_config_arguments, add_flag, config_from_args, groupnorm_flag,
                                   strategies_over, strategy_flag)
from dfjax.training import EMBEDDED_MODELS
from dfjax.training.captions import FROZEN_TEXT
from dfjax.training.pipeline_frozen import FROZEN_ENCODERS
from models.presets import FAMILIES, PRESETS
from models.vae_config import VAE_PRESETS
from sharding.axes import PATCH
from sharding.mesh import parse_degrees

_DTYPES = list(unet.DTYPES)
_PRESET_HELP = f"preset ({', '.join(PRESETS)}) or config.json"


def register(commands) -> None:
  """Adds `bench` and its measurements to the `dfjax` parser's subcommands."""
  bench = commands.add_parser("bench", help="measurements, side by side, machine named")
  benches = bench.add_subparsers(dest="bench", required=True)
  _add_unet(benches)
  _add_strategies(benches)
  _add_fidelity(benches)
  _add_quality(benches)
  _add_simulate(benches)
  _add_vae(benches)
  _add_train(benches)


def _add_unet(benches) -> None:
  parser = benches.add_parser(
      "unet", help="UNet step (CFG batch) latency, compile time, memory, TFLOP/s vs diffusers")
  parser.add_argument("--config", default="tiny-sdxl", help=_PRESET_HELP)
  parser.add_argument("--resolution", type=int, nargs="+", default=[256], help="image side(s) in pixels")
  parser.add_argument("--batch", type=int, default=2, help="UNet batch (2 = one image with CFG)")
  parser.add_argument("--dtype", choices=_DTYPES, default="fp32")
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--no-torch", action="store_true", help="skip diffusers' PyTorch UNet")
  parser.add_argument("--torch-compile", action="store_true", help="also time torch.compile'd diffusers")
  parser.add_argument("--torch-threads", type=int, default=None,
                      help="PyTorch CPU threads (default: one per core other processes leave idle)")
  parser.set_defaults(run=lambda args: unet.run(args.config, args.resolution, args.batch, args.dtype,
                                                args.iters, not args.no_torch, args.torch_compile,
                                                args.torch_threads))


def _add_strategies(benches) -> None:
  parser = benches.add_parser(
      "strategies", help=f"single and {strategies_over(PATCH)}: step time, traffic, stale memory")
  _add_model(parser, "every strategy that runs it is compared")
  parser.add_argument("--resolution", type=int, default=256, help="image side in pixels (latent = /8)")
  parser.add_argument("--patch", type=int, nargs="+", default=[2, 4, 8],
                      help="devices per image to compare (usp: every ring × Ulysses split of them)")
  parser.add_argument("--cfg", type=int, choices=[1, 2], default=1,
                      help="split guidance over 2 device groups")
  parser.add_argument("--mesh", type=parse_degrees, metavar="AXIS=N,…",
                      help="a hybrid mesh, e.g. data=1,cfg=2,patch=2,tensor=2 (instead of --patch/--cfg): every "
                      "strategy over its axes, beside the pure strategies on as many devices per image")
  parser.add_argument("--paper-table", action="store_true",
                      help="only print the analytic communication of tensor and patch parallelism on 8 devices "
                      "beside DistriFusion's Table 2 (use with --model unet --config sdxl), running nothing")
  parser.add_argument("--num-steps", "--steps", type=int, default=10, help="DDIM steps (default 10)")
  parser.add_argument("--warmup-steps", type=int, default=4)
  parser.add_argument("--dtype", choices=_DTYPES, default="fp32")
  parser.add_argument("--iters", type=int, default=3)
  parser.set_defaults(run=lambda args: strategies.paper_table(args.config, model=args.model) if args.paper_table
                      else strategies.run(args.config, args.resolution, args.patch, args.cfg, args.num_steps,
                                          args.warmup_steps, args.dtype, args.iters, args.model, args.mesh))


def _add_model(parser, what: str) -> None:
  """--model (a family) and --config (one of its presets, or a UNet config.json)."""
  parser.add_argument("--model", choices=list(FAMILIES), default="unet", help=f"model family: {what}")
  presets = "; ".join(f"{family}: {', '.join(names)} (default {default})" for family, (names, default) in FAMILIES.items())
  parser.add_argument("--config", default=None, help=f"preset of the --model family ({presets}), or a UNet "
                      "config.json")


def _add_fidelity(benches) -> None:
  parser = benches.add_parser(
      "fidelity", help="PSNR/SSIM, class accuracy and Fréchet distance of displaced, naive, asyncdiff and "
      "pipefusion vs single (DistriFusion Table 1's shape)",
      description="For each patch count and GroupNorm mode, PSNR and SSIM of displaced and naive "
      "images against single over --seeds seeds (one batched sample call per configuration), then "
      "a warm-up ablation with 10-step DPM-Solver++(2M), then AsyncDiff (N components, stride S, "
      "warm-up) and, on a DiT, PipeFusion (N stages, M patches, warm-up) with the main table's sampler; "
      "every run's class accuracy and Fréchet classifier distance. The default run takes about an hour "
      "on a 2-core CPU.")
  add_config_arguments(parser, fidelity.FidelityConfig, {
      "seeds": Flag("images per configuration"),
      "steps": Flag("DDIM steps of the main table", name="num_steps", aliases=("--steps",)),
      "patch": Flag("patch counts"),
      "groupnorm": groupnorm_flag(several=True),
      "warmup_steps": Flag("displaced warm-up of the main table"),
      "ablation_patch": Flag("patch count of the warm-up ablation (default: the largest --patch; 0: none)"),
      "asyncdiff_components": Flag("AsyncDiff components N of the pipeline table"),
      "asyncdiff_strides": Flag("AsyncDiff strides S (stage devices = N + S − 1)"),
      "asyncdiff_warmup": Flag("AsyncDiff warm-up steps (each ≥ 1)"),
      "pipefusion_stages": Flag("PipeFusion stages N (DiT, PixArt; at most the model's blocks)"),
      "pipefusion_patches_per_stage": Flag("PipeFusion patches M per stage (M = this × N)"),
      "pipefusion_warmup": Flag("PipeFusion warm-up steps after its first synchronous one"),
      "tables": Flag("tables to run", choices=list(fidelity.TABLES)),
      "guidance_scale": Flag("classifier-free guidance scale", aliases=("--guidance",)),
      "model": Flag("the embedded model run when no checkpoint is given", choices=list(EMBEDDED_MODELS)),
      "checkpoint": Flag("a `dfjax train` model folder instead of the embedded model", metavar="DIR")})
  parser.add_argument("--json", metavar="OUT", help="also write every per-seed value to this JSON file")
  parser.set_defaults(run=lambda args: fidelity.run(config_from_args(fidelity.FidelityConfig, args),
                                                    args.json, command=args.command_line))


def _add_quality(benches) -> None:
  parser = benches.add_parser(
      "quality", help="class accuracy (overall, per class) and Fréchet distance of a class-conditional model's "
      "single-device samples", description="Samples --samples images (classes in turn) on one device with DDIM "
      "and judges them with the shipped shapes classifier: the figures the model cards quote. 100 samples of "
      "the embedded DiT take about 4 minutes on a 2-core CPU.")
  add_config_arguments(parser, quality.QualityConfig, {
      "samples": Flag("images (sample i draws class i mod K)"),
      "steps": Flag("DDIM steps", aliases=("--num-steps",)),
      "guidance_scale": Flag("classifier-free guidance scale", aliases=("--guidance",)),
      "model": Flag("the embedded model run when no checkpoint is given", choices=list(EMBEDDED_MODELS)),
      "checkpoint": Flag("a `dfjax train` model folder instead of the embedded model", metavar="DIR")})
  parser.add_argument("--json", metavar="OUT", help="also write the figures (and each sample's verdict) to this JSON file")
  parser.add_argument("--record", action="store_true",
                      help="also write them as the model folder's quality.json and rewrite its MODEL_CARD.md, which "
                      "quotes them (the checkpoint's folder, or the embedded model's in the package)")
  parser.set_defaults(run=lambda args: quality.run(config_from_args(quality.QualityConfig, args), args.json,
                                                   command=args.command_line, record=args.record))


def _add_simulate(benches) -> None:
  parser = benches.add_parser(
      "simulate", help="per-device cost of patch and sequence parallelism on one device, projected over NVLink",
      description="Runs, on one device, exactly the program one device of an N-device patch mesh runs "
      "(its rows, the halo/K/V/moment/all-to-all/ring shapes of N devices, collectives replaced by local "
      "stand-ins), times it, and projects the step time and speedup over A100 and H100 NVLink (max(compute, "
      "the communication the strategy overlaps) + the communication it waits for), beside published "
      "measurements (DistriFusion's SDXL speedups; PixArt-α's 8-A100 seconds). "
      "Configurations that do not fit are skipped. With asyncdiff or pipefusion among --strategies (their "
      "devices run different code) every row is instead projected from FLOP counts at a GPU rate calibrated on "
      "the published single-GPU time (dfjax/bench/simulate_stages.py), beside AsyncDiff's and PipeFusion's "
      "published figures.")
  _add_model(parser, "a UNet, DiT or PixArt (e.g. --model pixart --config pixart-alpha-1024)")
  parser.add_argument("--resolution", type=int, nargs="+", default=[512],
                      help="image side(s) in pixels (latent = /8)")
  parser.add_argument("--patch", type=int, nargs="+", default=[2, 4, 8], help="patch counts N to simulate")
  parser.add_argument("--dtype", choices=_DTYPES, default="fp32")
  parser.add_argument("--iters", type=int, default=5, help="timed steps per configuration (median)")
  add_flag(parser, "strategies", tuple[str, ...],
           strategy_flag("strategies to simulate",
                         (*simulate.simulated_strategies(), *simulate_stages.STAGE_STRATEGIES)),
           ("exact", "displaced"))
  add_flag(parser, "groupnorm", str, groupnorm_flag(), "corrected_async")
  parser.add_argument("--stages", type=int, nargs="+", default=None,
                      help="asyncdiff: components N (default 2 3 4); pipefusion: stages N (default the --patch "
                      "counts)")
  parser.add_argument("--stride", type=int, nargs="+", default=[1, 2],
                      help="asyncdiff strides S (1 2): N + S − 1 GPUs (default 1 2)")
  parser.add_argument("--patches-per-stage", type=int, nargs="+", default=[1],
                      help="pipefusion row patches M = k × N for each k (default 1: M = N)")
  parser.add_argument("--steps", type=int, default=None,
                      help="stage projection: diffusion steps (default the published run's: SD2.1 and SDXL 50, "
                      "PixArt-α 20)")
  parser.add_argument("--warmup-steps", type=int, default=9,
                      help="asyncdiff synchronous steps (default 9, the authors' SD2.1 and SDXL runs)")
  parser.add_argument("--tflops", type=float, default=None,
                      help="stage projection: the GPU's achieved TFLOP/s (default calibrated on the published "
                      "single-GPU time of sd21, sdxl, pixart-alpha-1024)")
  parser.add_argument("--hlo-comm", action="store_true",
                      help="also compile the real N-device sampling program and read its per-step traffic "
                      "(needs N devices: on a CPU the virtual ones; for tiny configs)")
  parser.add_argument("--latency-us", type=float, default=0.0,
                      help="fixed cost per collective added to the communication time "
                      "(default 0: bandwidth only)")
  parser.set_defaults(run=_simulate)


def _simulate(args):
  """Stage strategies among --strategies: every row projected from FLOPs; else one device's program timed."""
  if set(args.strategies) & set(simulate_stages.STAGE_STRATEGIES):
    return simulate_stages.run(args.model, args.config, args.resolution, args.strategies, stages=args.stages,
                               strides=args.stride, patches_per_stage=args.patches_per_stage, patch=args.patch,
                               steps=args.steps, warmup_steps=args.warmup_steps, tflops=args.tflops,
                               dtype=args.dtype, latency_us=args.latency_us)
  return simulate.run(args.config, args.resolution, args.patch, args.dtype, args.iters, args.strategies,
                      args.groupnorm, args.hlo_comm, args.latency_us, args.model)


def _add_vae(benches) -> None:
  parser = benches.add_parser(
      "vae", help="patch-parallel VAE decode vs one device: time and memory per device",
      description="Decodes one square image per --resolution on 1 device and on each --patch count of "
      "devices (the latent rows split over `patch`, exact: the same image), and prints compile and decode "
      "time and each device's memory from the compiled program's memory analysis. Programs whose devices "
      "would need more than the free memory are compiled but not run.")
  add_config_arguments(parser, vae.VAEBenchConfig, {
      "config": Flag(f"VAE preset ({', '.join(VAE_PRESETS)}) or AutoencoderKL config.json"),
      "resolution": Flag(f"image sides in pixels (default {' '.join(map(str, vae.DEFAULT_RESOLUTIONS['cpu']))} on a "
                         f"CPU, {' '.join(map(str, vae.DEFAULT_RESOLUTIONS['accelerator']))} on a GPU or TPU)"),
      "patch": Flag("patch counts to compare with one device"),
      "dtype": Flag("weights and activations", choices=_DTYPES),
      "iters": Flag("timed decodes per configuration (median)"),
      "compile_only": Flag("only compile and read each program's memory analysis (full-size VAEs on a CPU)")})
  parser.set_defaults(run=lambda args: vae.run(config_from_args(vae.VAEBenchConfig, args)))


def _add_train(benches) -> None:
  parser = benches.add_parser(
      "train", help="data parallel, GPipe, 1F1B, DiffusionPipe training: steps/s, idle per device, projection",
      description=train.__doc__.split("\n\n")[1])
  parser.add_argument("--model", default="tiny", help="a `dfjax train --model` variant")
  parser.add_argument("--batch", type=int, default=8, help="global batch, the same for every method")
  parser.add_argument("--image-size", type=int, default=32, help="image side in pixels")
  parser.add_argument("--devices", type=int, default=4, help="pipeline stages, and data-parallel replicas")
  parser.add_argument("--micro-batches", type=int, default=4)
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--calibrate", action="store_true",
                      help="plan every method with each segment's forward and backward timed once on this device "
                           "(printed beside the analytic FLOPs) instead of the analytic FLOPs")
  parser.add_argument("--frozen-encoder", default="none", choices=["none", *FROZEN_ENCODERS],
                      help="every method trains on a frozen VAE encoder's latents (DiffusionPipe runs its layers "
                           "in the bubbles, the others after the pipeline)")
  parser.add_argument("--frozen-text", default="none", choices=["none", *FROZEN_TEXT],
                      help="the UNet reads a frozen text encoder's class captions (DiffusionPipe runs its layers in "
                           "the bubbles, the others after the pipeline)")
  parser.set_defaults(run=lambda args: train.run(args.model, args.batch, args.image_size, args.devices,
                                                 args.micro_batches, args.iters, args.calibrate,
                                                 args.frozen_encoder, args.frozen_text))
