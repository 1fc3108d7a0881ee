"""`dfjax train`: its flags, and the thin wrapper that runs `dfjax.training.train`."""

from __future__ import annotations

from dfjax.commands.options import Flag, add_config_arguments, config_from_args
from dfjax.training.loop import TrainConfig, train
from dfjax.training.model import VARIANTS


def register(commands) -> None:
  """Adds `train` to the `dfjax` parser's subcommands, one flag per TrainConfig field."""
  parser = commands.add_parser(
      "train", help="train the class-conditional UNet on the built-in dataset (resumable)",
      description="DDPM training (ε prediction, AdamW, EMA) of a small class-conditional UNet on "
      "dfjax.data's procedural 64×64 shapes; orbax checkpoints every --save-every steps, a final "
      "dfjax model folder (OUT/model or --export) with the loss curve. Fixed --seed: the same "
      "command gives the same weights, also when interrupted and continued with --resume.")
  add_config_arguments(parser, TrainConfig, {
      "out": Flag("run folder: checkpoints/, train_config.json, model/"),
      "model": Flag("model size", choices=list(VARIANTS)),
      "steps": Flag("optimiser steps"),
      "batch": Flag("images per step"),
      "lr": Flag("peak AdamW learning rate"),
      "warmup_steps": Flag("learning-rate warm-up steps"),
      "cosine": Flag("cosine decay after warm-up (--no-cosine or --constant-lr: constant)"),
      "final_lr_fraction": Flag("learning rate at the end of the cosine decay, as a fraction of --lr"),
      "weight_decay": Flag("AdamW decoupled weight decay"),
      "grad_clip": Flag("global-norm gradient clipping"),
      "ema_decay": Flag("EMA of the params (0 disables it; the exported model is the EMA)"),
      "label_drop": Flag("probability of the null class (classifier-free guidance)"),
      "seed": Flag("fixes the init, the data, the noise and the label drops"),
      "save_every": Flag("checkpoint interval (steps)"),
      "log_every": Flag("loss-curve interval (steps)"),
      "export": Flag("final model folder (default: OUT/model)")})
  parser.add_argument("--constant-lr", dest="cosine", action="store_false", help="the same as --no-cosine")
  parser.add_argument("--resume", action="store_true",
                      help="continue from OUT's latest checkpoint (starts fresh when there is none)")
  parser.add_argument("--stop-at", type=int, default=None,
                      help="checkpoint and exit after this step; finish later with --resume")
  parser.set_defaults(run=run)


def run(args) -> None:
  folder = train(config_from_args(TrainConfig, args), resume=args.resume, stop_at=args.stop_at)
  if folder is None:
    print(f"stopped at step {args.stop_at}; continue with the same command and --resume")
  else:
    print(f"wrote model {folder}")
