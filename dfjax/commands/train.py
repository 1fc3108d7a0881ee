"""`dfjax train`: its flags, and the thin wrapper that runs `dfjax.training.train`."""

from __future__ import annotations

import dataclasses

from dfjax.commands.options import Flag, add_config_arguments, config_from_args
from dfjax.eval.train_classifier import ClassifierTrainConfig, train_classifier
from dfjax.training.captions import FROZEN_TEXT
from dfjax.training.loop import TrainConfig, train
from dfjax.training.model import VARIANTS
from dfjax.training.pipeline_frozen import FROZEN_ENCODERS
from dfjax.training.pipeline_plan import PipelineConfig
from dfjax.training.pipeline_schedule import Schedule
from dfjax.training.pipeline_train import train_pipelined


def register(commands) -> None:
  """Adds `train` to the `dfjax` parser's subcommands, one flag per TrainConfig field."""
  parser = commands.add_parser(
      "train", help="train the class-conditional UNet on the built-in dataset (resumable)",
      description="DDPM training (ε prediction, AdamW, EMA) of a small class-conditional UNet on "
      "dfjax.data's procedural 64×64 shapes; orbax checkpoints every --save-every steps, a final "
      "dfjax model folder (OUT/model or --export) with the loss curve. Fixed --seed: the same "
      "command gives the same weights, also when interrupted and continued with --resume.")
  flags = {
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
      "frozen_text": Flag("a UNet's context from a frozen text encoder (fixed-seed CLIP) of a fixed caption per class "
                          "instead of learned class tokens; the UNet alone trains (pipelined: DiffusionPipe runs its "
                          "layers in the bubbles); exported as the class-token table", choices=["none", *FROZEN_TEXT]),
      "seed": Flag("fixes the init, the data, the noise and the label drops"),
      "save_every": Flag("checkpoint interval (steps)"),
      "log_every": Flag("loss-curve interval (steps)"),
      "export": Flag("final model folder (default: OUT/model)"),
      "grow_from": Flag("start from this trained DiT's model folder, grown to --model's depth (a multiple of "
                        "its own): block f·k is its block k, the blocks between are fresh identity "
                        "(adaLN-Zero) blocks; e.g. --model dit8 --grow-from a dit run's OUT/model",
                        metavar="FOLDER")}
  add_config_arguments(parser, TrainConfig, flags)
  add_config_arguments(parser, PipelineConfig, {
      "stages": Flag("pipeline stages on the `stage` mesh axis (DiffusionPipe training; 1: no pipeline)",
                     name="pipeline_stages"),
      "microbatches": Flag("micro-batches per data shard's batch (pipelined training)", name="micro_batches"),
      "data": Flag("data-parallel degree beside the pipeline (the mesh is data × stages devices)"),
      "schedule": Flag("pipeline schedule (diffusionpipe: 1F1B with the frozen parts in its bubbles: the UNet's "
                       "class tokens or --frozen-text encoder, the --frozen-encoder)",
                       choices=[s.value for s in Schedule]),
      "calibrate": Flag("plan the pipeline with each segment's forward and backward timed once on this device "
                        "(printed beside the analytic FLOPs) instead of the FLOPs alone"),
      "frozen_encoder": Flag("a frozen VAE encoder (fixed weights) in front of the backbone, which then trains on "
                             "its latents (half the image size); DiffusionPipe runs its layers in the bubbles",
                             choices=["none", *FROZEN_ENCODERS])})
  _resumable(parser)
  # argparse hands `train classifier --out X` to the subcommand and would then find --out missing
  # on `train` itself: `run` checks it instead.
  next(a for a in parser._actions if a.dest == "out").required = False
  parser.set_defaults(run=run)
  _register_classifier(parser, flags)


def _register_classifier(parser, unet_flags: dict[str, Flag]) -> None:
  """`dfjax train classifier`: the flags it shares with `train` read the same."""
  targets = parser.add_subparsers(dest="target", metavar="{classifier}", title="other models")
  classifier = targets.add_parser(
      "classifier", help="train the shapes classifier that judges sample quality (resumable)",
      description="Cross-entropy training of dfjax.eval.classifier's small CNN on dfjax.data's "
      "procedural shapes (fresh images every step, light noise augmentation); orbax checkpoints every "
      "--save-every steps; the exported folder (OUT/model or --export) records its accuracy on "
      "--eval-images fresh held-out images in training.json and MODEL_CARD.md.")
  fields = {f.name for f in dataclasses.fields(ClassifierTrainConfig)}
  add_config_arguments(classifier, ClassifierTrainConfig, {
      **{name: flag for name, flag in unet_flags.items() if name in fields},
      "seed": Flag("fixes the init, the data and the noise augmentation"),
      "channels": Flag("conv widths of the stages (each halves the image)"),
      "features": Flag("width of the penultimate layer (the Fréchet distance's features)"),
      "noise_augment": Flag("largest std of the Gaussian noise added to training images"),
      "eval_images": Flag("fresh held-out images the exported accuracy is measured on")})
  _resumable(classifier)
  classifier.set_defaults(run=run_classifier)


def _resumable(parser) -> None:
  parser.add_argument("--constant-lr", dest="cosine", action="store_false", help="the same as --no-cosine")
  parser.add_argument("--resume", action="store_true",
                      help="continue from OUT's latest checkpoint (starts fresh when there is none)")
  parser.add_argument("--stop-at", type=int, default=None,
                      help="checkpoint and exit after this step; finish later with --resume")


def run(args) -> None:
  if args.out is None:
    raise ValueError("train needs --out, the run folder (checkpoints/, train_config.json, model/)")
  cfg, pipeline = config_from_args(TrainConfig, args), config_from_args(PipelineConfig, args)
  if pipeline == PipelineConfig():  # no pipeline flag given: the single-device step
    _report(train(cfg, resume=args.resume, stop_at=args.stop_at), args)
  else:
    _report(train_pipelined(cfg, pipeline, resume=args.resume, stop_at=args.stop_at), args)


def run_classifier(args) -> None:
  _report(train_classifier(config_from_args(ClassifierTrainConfig, args), resume=args.resume,
                           stop_at=args.stop_at), args)


def _report(folder, args) -> None:
  if folder is None:
    print(f"stopped at step {args.stop_at}; continue with the same command and --resume")
  else:
    print(f"wrote model {folder}")
