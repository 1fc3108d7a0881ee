"""The `dfjax` command: convert | generate | bench. Each subcommand is a thin wrapper."""

import argparse
import sys


def _use_cpu_devices(count: int) -> None:
  """Splits the host CPU into `count` virtual devices; only the CPU backend reads it."""
  import jax
  if count < 1:
    raise SystemExit(f"dfjax: --cpu-devices={count} must be at least 1")
  jax.config.update("jax_num_cpu_devices", count)


def _convert(args) -> None:
  from convert import convert_checkpoint
  dst = convert_checkpoint(args.src, args.dst, variant=args.variant, dtype=args.dtype, overwrite=args.overwrite)
  print(f"wrote dfjax checkpoint {dst}")


def _bench_unet(args) -> None:
  from dfjax.bench import unet
  unet.run(args.config, args.resolution, args.batch, args.dtype, args.iters, not args.no_torch, args.torch_compile)


def _bench_strategies(args) -> None:
  from dfjax.bench import strategies
  strategies.run(args.config, args.resolution, args.patch, args.cfg, args.steps, args.warmup_steps,
                 args.dtype, args.iters)


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
  unet = benches.add_parser("unet", help="UNet forward latency and compile time vs diffusers")
  unet.add_argument("--config", default="tiny-sdxl", help="preset (sd15, sd21, sdxl, tiny-sd15, tiny-sdxl) or config.json")
  unet.add_argument("--resolution", type=int, nargs="+", default=[256], help="image side(s) in pixels")
  unet.add_argument("--batch", type=int, default=2, help="UNet batch (2 = one image with CFG)")
  unet.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
  unet.add_argument("--iters", type=int, default=5)
  unet.add_argument("--no-torch", action="store_true", help="skip diffusers' PyTorch UNet")
  unet.add_argument("--torch-compile", action="store_true", help="also time torch.compile'd diffusers")
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
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  _use_cpu_devices(args.cpu_devices)
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
