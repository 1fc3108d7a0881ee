"""The `dfjax` command: convert | generate | bench. Each subcommand is a thin wrapper."""

import argparse
import shlex
import sys


def _use_cpu_devices(count: int) -> None:
  """Splits the host CPU into `count` virtual devices; only the CPU backend reads it."""
  import jax
  if count < 1:
    raise SystemExit(f"dfjax: --cpu-devices={count} must be at least 1")
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:  # jax already started in this process (main() called from Python): keep its devices
    pass


def _convert(args) -> None:
  from convert import convert_checkpoint
  dst = convert_checkpoint(args.src, args.dst, variant=args.variant, dtype=args.dtype, overwrite=args.overwrite)
  print(f"wrote dfjax checkpoint {dst}")


def _bench_unet(args) -> None:
  from dfjax.bench import unet
  unet.run(args.config, args.resolution, args.batch, args.dtype, args.iters, not args.no_torch, args.torch_compile,
           args.torch_threads)


def _bench_simulate(args) -> None:
  from dfjax.bench import simulate
  simulate.run(args.config, args.resolution, args.patch, args.dtype, args.iters, args.strategy, args.groupnorm,
               args.hlo_comm, args.latency_us)


def _add_groupnorm_argument(parser, default, *, several: bool = False) -> None:
  """--groupnorm, its modes named from GroupNormMode (checked, with the fix, by GroupNormMode.parse)."""
  from sharding.exchange.groupnorm import GroupNormMode
  modes = ", ".join(m.value for m in GroupNormMode)
  shown = " ".join(default) if several else default
  parser.add_argument("--groupnorm", nargs="+" if several else None, default=list(default) if several else default,
                      help=f"displaced GroupNorm mode{'s' if several else ''}: {modes} (default {shown})")


def _add_bench_simulate(benches) -> None:
  simulate = benches.add_parser(
      "simulate", help="per-device cost of patch parallelism on one device, projected over NVLink",
      description="Runs, on one device, exactly the program one device of an N-device patch mesh runs (its rows, "
      "the halo/K/V/moment shapes of N devices, collectives replaced by local stand-ins), times it, and "
      "projects the step time and speedup of exact (compute + comm) and displaced (max of the two) over A100 and "
      "H100 NVLink, beside DistriFusion's measured speedups. Configurations that do not fit are skipped.")
  simulate.add_argument("--config", default="tiny-sdxl", help="preset (sd15, sd21, sdxl, tiny-sd15, tiny-sdxl) or config.json")
  simulate.add_argument("--resolution", type=int, nargs="+", default=[512], help="image side(s) in pixels (latent = /8)")
  simulate.add_argument("--patch", type=int, nargs="+", default=[2, 4, 8], help="patch counts N to simulate")
  simulate.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
  simulate.add_argument("--iters", type=int, default=5, help="timed steps per configuration (median)")
  simulate.add_argument("--strategy", nargs="+", default=["exact", "displaced"], help="exact and/or displaced")
  _add_groupnorm_argument(simulate, "corrected_async")
  simulate.add_argument("--hlo-comm", action="store_true",
                        help="also compile the real N-device sampling program and read its per-step traffic "
                        "(needs N devices: on a CPU the virtual ones; for tiny configs)")
  simulate.add_argument("--latency-us", type=float, default=0.0,
                        help="fixed cost per collective added to the communication time (default 0: bandwidth only)")
  simulate.set_defaults(run=_bench_simulate)


def _bench_strategies(args) -> None:
  from dfjax.bench import strategies
  strategies.run(args.config, args.resolution, args.patch, args.cfg, args.steps, args.warmup_steps,
                 args.dtype, args.iters)


def _generate(args) -> None:
  from dfjax import generate
  config = generate.GenerateConfig(
      checkpoint=args.checkpoint, strategies=tuple(args.strategy), patch=args.patch, cfg=args.cfg,
      steps=args.steps, scheduler=args.scheduler, guidance_scale=args.guidance, warmup_steps=args.warmup_steps,
      groupnorm=args.groupnorm, seed=args.seed, images=args.images, size=args.size, out=args.out)
  generate.run(config, command=args.command_line)


def _bench_fidelity(args) -> None:
  from dfjax.bench import fidelity
  config = fidelity.FidelityConfig(seeds=args.seeds, steps=args.steps, patch=tuple(args.patch),
                                   groupnorm=tuple(args.groupnorm), warmup_steps=args.warmup_steps,
                                   ablation_patch=args.ablation_patch, guidance_scale=args.guidance,
                                   checkpoint=args.checkpoint)
  fidelity.run(config, args.json, command=args.command_line)


def _add_generate(commands) -> None:
  from dfjax.generate import GenerateConfig

  d = GenerateConfig()
  generate = commands.add_parser(
      "generate", help="sample with single/displaced/naive, write PNGs, print times and PSNR",
      description="Samples one batch with each strategy on the same noise, writes each strategy's "
      "images and a side-by-side sheet with the amplified difference from `single` to --out, and "
      "prints compile and sampling time and PSNR/SSIM against `single`. With no checkpoint it runs "
      "the embedded model (class-conditional, 64×64 RGB, one image per class). On a CPU the devices "
      "are virtual and share the cores: times show cost, not speed-up.")
  generate.add_argument("--checkpoint", metavar="DIR",
                        help="a `dfjax train` model folder, or a `dfjax convert`ed diffusers UNet. dfjax has no "
                        "text encoder or VAE yet: a text-to-image UNet runs text-free (seeded random prompt "
                        "embeddings of its cross-attention width, zeros for the unconditional half), and its "
                        "latents are drawn as pictures of their first 3 channels, not decoded")
  generate.add_argument("--devices", type=int, default=None,
                        help="virtual CPU devices (same as the global --cpu-devices; ignored on accelerators)")
  generate.add_argument("--patch", type=int, default=None,
                        help="row patches of displaced/naive/exact (default: all devices the cfg axis leaves, at most 8 for 64 rows)")
  generate.add_argument("--cfg", type=int, default=d.cfg, help="2 runs the guidance halves on two device groups (mesh cfg × patch)")
  generate.add_argument("--strategy", nargs="+", default=list(d.strategies),
                        help="strategies to run, in order: single exact displaced naive (single is the reference)")
  generate.add_argument("--steps", type=int, default=d.steps, help=f"denoising steps (default {d.steps})")
  generate.add_argument("--scheduler", default=d.scheduler, help=f"ddim, euler or dpmpp_2m (default {d.scheduler})")
  generate.add_argument("--guidance", type=float, default=d.guidance_scale,
                        help=f"classifier-free guidance scale (default {d.guidance_scale:g})")
  generate.add_argument("--warmup-steps", type=int, default=d.warmup_steps,
                        help=f"displaced: synchronous steps after the first (default {d.warmup_steps})")
  _add_groupnorm_argument(generate, d.groupnorm)
  generate.add_argument("--seed", type=int, default=d.seed, help=f"noise seed (default {d.seed})")
  generate.add_argument("--images", type=int, default=None, help="batch size (default: one image per class)")
  generate.add_argument("--size", type=int, default=None, help="sample side in rows (default: the model's sample_size)")
  generate.add_argument("--out", default=d.out, help=f"output folder (default ./{d.out})")
  generate.set_defaults(run=_generate)


def _add_bench_fidelity(benches) -> None:
  from dfjax.bench.fidelity import FidelityConfig

  d = FidelityConfig()
  fidelity = benches.add_parser(
      "fidelity", help="PSNR/SSIM of displaced and naive vs single (DistriFusion Table 1's shape)",
      description="For each patch count and GroupNorm mode, PSNR and SSIM of displaced and naive "
      "images against single over --seeds seeds (one batched sample call per configuration), then "
      "a warm-up ablation with 10-step DPM-Solver++(2M). The default run takes tens of minutes on a "
      "2-core CPU.")
  fidelity.add_argument("--seeds", type=int, default=d.seeds, help=f"images per configuration (default {d.seeds})")
  fidelity.add_argument("--steps", type=int, default=d.steps, help=f"DDIM steps of the main table (default {d.steps})")
  fidelity.add_argument("--patch", type=int, nargs="+", default=list(d.patch),
                        help=f"patch counts (default {' '.join(map(str, d.patch))})")
  _add_groupnorm_argument(fidelity, d.groupnorm, several=True)
  fidelity.add_argument("--warmup-steps", type=int, default=d.warmup_steps,
                        help=f"displaced warm-up of the main table (default {d.warmup_steps})")
  fidelity.add_argument("--ablation-patch", type=int, default=None,
                        help="patch count of the warm-up ablation (default: the largest --patch; 0 skips it)")
  fidelity.add_argument("--guidance", type=float, default=d.guidance_scale,
                        help=f"classifier-free guidance scale (default {d.guidance_scale:g})")
  fidelity.add_argument("--checkpoint", metavar="DIR", help="a `dfjax train` model folder instead of the embedded model")
  fidelity.add_argument("--json", metavar="OUT", help="also write every per-seed value to this JSON file")
  fidelity.set_defaults(run=_bench_fidelity)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="dfjax", description=__doc__)
  parser.add_argument("--cpu-devices", type=int, default=8,
                      help="virtual devices to split the CPU into when there is no accelerator (default 8)")
  processes = parser.add_argument_group("multi-process runs (or DFJAX_COORDINATOR, DFJAX_NUM_PROCESSES, DFJAX_PROCESS_ID)")
  processes.add_argument("--coordinator", help="host:port of process 0's coordination service")
  processes.add_argument("--num-processes", type=int, help="number of processes in the run")
  processes.add_argument("--process-id", type=int, help="this process's index, 0 … num-processes−1")
  commands = parser.add_subparsers(dest="command", required=True)

  convert = commands.add_parser("convert", help="diffusers UNet or pipeline folder → dfjax checkpoint")
  convert.add_argument("src", help="diffusers pipeline folder (model_index.json + unet/) or UNet folder")
  convert.add_argument("dst", help="output folder (written atomically)")
  convert.add_argument("--variant", default=None, help="weights variant to read, e.g. fp16")
  convert.add_argument("--dtype", default=None, help="store weights in this float dtype (default: as read)")
  convert.add_argument("--overwrite", action="store_true", help="replace an existing dst")
  convert.set_defaults(run=_convert)

  bench = commands.add_parser("bench", help="measurements, side by side, machine named")
  benches = bench.add_subparsers(dest="bench", required=True)
  unet = benches.add_parser("unet", help="UNet step (CFG batch) latency, compile time, memory, TFLOP/s vs diffusers")
  unet.add_argument("--config", default="tiny-sdxl", help="preset (sd15, sd21, sdxl, tiny-sd15, tiny-sdxl) or config.json")
  unet.add_argument("--resolution", type=int, nargs="+", default=[256], help="image side(s) in pixels")
  unet.add_argument("--batch", type=int, default=2, help="UNet batch (2 = one image with CFG)")
  unet.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
  unet.add_argument("--iters", type=int, default=5)
  unet.add_argument("--no-torch", action="store_true", help="skip diffusers' PyTorch UNet")
  unet.add_argument("--torch-compile", action="store_true", help="also time torch.compile'd diffusers")
  unet.add_argument("--torch-threads", type=int, default=None,
                    help="PyTorch CPU threads (default: one per core other processes leave idle)")
  unet.set_defaults(run=_bench_unet)

  strategies = benches.add_parser("strategies", help="single/exact/displaced/naive: step time, traffic, stale memory")
  strategies.add_argument("--config", default="tiny-sdxl", help="preset or config.json")
  strategies.add_argument("--resolution", type=int, default=256, help="image side in pixels (latent = /8)")
  strategies.add_argument("--patch", type=int, nargs="+", default=[2, 4, 8], help="patch counts to compare")
  strategies.add_argument("--cfg", type=int, choices=[1, 2], default=1, help="split guidance over 2 device groups")
  strategies.add_argument("--steps", type=int, default=10)
  strategies.add_argument("--warmup-steps", type=int, default=4)
  strategies.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
  strategies.add_argument("--iters", type=int, default=3)
  strategies.set_defaults(run=_bench_strategies)
  _add_bench_fidelity(benches)
  _add_bench_simulate(benches)
  _add_generate(commands)
  from dfjax.training.cli import add_train_command
  add_train_command(commands)
  return parser


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = build_parser().parse_args(argv)
  args.command_line = shlex.join(["dfjax", *argv])
  _use_cpu_devices(getattr(args, "devices", None) or args.cpu_devices)
  try:
    from sharding.distributed import ProcessGroup, initialize
    initialize(ProcessGroup.from_env(args.coordinator, args.num_processes, args.process_id))
    args.run(args)
  except (ValueError, FileExistsError, FileNotFoundError, ConnectionError, FloatingPointError) as error:  # bad input: what and how to fix
    print(f"dfjax {args.command}: error: {error}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
