"""`dfjax train`: its flags, and the thin wrapper that runs `dfjax.training.train`."""

from __future__ import annotations

import argparse

from dfjax.training.loop import TrainConfig, train
from dfjax.training.model import VARIANTS


def register(commands) -> None:
  """Adds `train` to the `dfjax` parser's subcommands, its defaults from TrainConfig."""
  d = TrainConfig(out="")
  parser = commands.add_parser(
      "train", help="train the class-conditional UNet on the built-in dataset (resumable)",
      description="DDPM training (ε prediction, AdamW, EMA) of a small class-conditional UNet on "
      "dfjax.data's procedural 64×64 shapes; orbax checkpoints every --save-every steps, a final "
      "dfjax model folder (OUT/model or --export) with the loss curve. Fixed --seed: the same "
      "command gives the same weights, also when interrupted and continued with --resume.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--out", required=True, help="run folder: checkpoints/, train_config.json, model/")
  parser.add_argument("--model", choices=list(VARIANTS), default=d.model, help="model size")
  parser.add_argument("--steps", type=int, default=d.steps, help="optimiser steps")
  parser.add_argument("--batch", type=int, default=d.batch, help="images per step")
  parser.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate")
  parser.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
  parser.add_argument("--constant-lr", action="store_true", help="no cosine decay after warm-up")
  parser.add_argument("--ema-decay", type=float, default=d.ema_decay, help="0 disables the EMA")
  parser.add_argument("--label-drop", type=float, default=d.label_drop,
                      help="probability of the null class (classifier-free guidance)")
  parser.add_argument("--seed", type=int, default=d.seed)
  parser.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint interval (steps)")
  parser.add_argument("--log-every", type=int, default=d.log_every, help="loss-curve interval (steps)")
  parser.add_argument("--export", default=None, help="final model folder (None: OUT/model)")
  parser.add_argument("--resume", action="store_true",
                      help="continue from OUT's latest checkpoint (starts fresh when there is none)")
  parser.add_argument("--stop-at", type=int, default=None,
                      help="checkpoint and exit after this step; finish later with --resume")
  parser.set_defaults(run=run)


def run(args) -> None:
  cfg = TrainConfig(out=args.out, model=args.model, steps=args.steps, batch=args.batch, lr=args.lr,
                    warmup_steps=args.warmup_steps, cosine=not args.constant_lr,
                    ema_decay=args.ema_decay, label_drop=args.label_drop, seed=args.seed,
                    save_every=args.save_every, log_every=args.log_every, export=args.export)
  folder = train(cfg, resume=args.resume, stop_at=args.stop_at)
  if folder is None:
    print(f"stopped at step {args.stop_at}; continue with the same command and --resume")
  else:
    print(f"wrote model {folder}")
