"""`dfjax convert SRC DST`: a diffusers UNet, DiT or PixArt folder, or a pipeline folder → a dfjax checkpoint."""

from __future__ import annotations

from convert import convert_checkpoint


def register(commands) -> None:
  """Adds `convert` to the `dfjax` parser's subcommands."""
  parser = commands.add_parser("convert", help="diffusers UNet, DiT, PixArt or pipeline folder → dfjax checkpoint")
  parser.add_argument("src", help="diffusers pipeline folder (model_index.json + unet/ or transformer/) or a "
                      "UNet, DiT or PixArt folder (config.json + safetensors)")
  parser.add_argument("dst", help="output folder (written atomically)")
  parser.add_argument("--variant", default=None, help="weights variant to read, e.g. fp16")
  parser.add_argument("--dtype", default=None, help="store weights in this float dtype (default: as read)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing dst")
  parser.set_defaults(run=run)


def run(args) -> None:
  dst = convert_checkpoint(args.src, args.dst, variant=args.variant, dtype=args.dtype,
                           overwrite=args.overwrite)
  print(f"wrote dfjax checkpoint {dst}")
