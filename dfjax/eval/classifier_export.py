"""A trained shapes classifier as a folder (what `dfjax train classifier` exports), and its card.

  params/          the NNX params (orbax)
  config.json      the architecture (`ClassifierConfig.to_json`)
  training.json    the run: command, settings, held-out accuracy (overall and per class), machine
  loss.csv         step, loss (mean over each logging interval), learning rate
  manifest.json    dfjax checkpoint format marker, model "ShapeClassifier", sha256 of params/ and
                   config.json (checked by `load_classifier`)
  MODEL_CARD.md    written from the above

Written into a temporary sibling and renamed into place (`convert.atomic`), like every dfjax folder.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from convert.atomic import prepare_destination, write_atomically
from convert.format import CONFIG, PARAMS_DIR, check_weights, manifest_header, write_manifest
from convert.keymap import path_str
from dfjax.eval.classifier import CLASSIFIER_KIND, ShapeClassifier
from dfjax.training.card import subsample

TRAINING = "training.json"
LOSS_CSV = "loss.csv"
MODEL_CARD = "MODEL_CARD.md"
_CURVE_ROWS = 12


def write_classifier(folder: str | os.PathLike, model: ShapeClassifier, *, training: Mapping[str, Any],
                     loss_rows: Sequence[tuple[int, float, float]], overwrite: bool = True) -> Path:
  """Writes the classifier folder (atomically); returns it.

  Raises:
    FileExistsError: `folder` exists and is not a dfjax folder, or `overwrite` is False.
    ValueError: a param holds NaN or inf.
  """
  folder = Path(folder)
  target = prepare_destination(folder, overwrite)
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  flat = {path_str(p): np.asarray(v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  check_weights(flat, "trained classifier params")
  manifest = {**manifest_header(flat), "model": CLASSIFIER_KIND, "source": {"kind": "dfjax train classifier"}}

  def write(tmp: Path) -> None:
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(tmp / PARAMS_DIR, params)
    (tmp / CONFIG).write_text(json.dumps(model.config.to_json(), indent=2) + "\n")
    (tmp / TRAINING).write_text(json.dumps(dict(training), indent=2) + "\n")
    with open(tmp / LOSS_CSV, "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(["step", "loss", "learning_rate"])
      writer.writerows([int(s), f"{l:.6f}", f"{r:.3e}"] for s, l, r in loss_rows)
    write_manifest(tmp, manifest, hashed=(PARAMS_DIR, CONFIG))
    (tmp / MODEL_CARD).write_text(classifier_card(training, model.config.to_json(), manifest["num_params"],
                                                  loss_rows))

  write_atomically(target, write, size_bytes=sum(a.nbytes for a in jax.tree.leaves(params)))
  return folder


def classifier_card(training: Mapping[str, Any], config: Mapping[str, Any], num_params: int,
                    loss_rows: Sequence[tuple[int, float, float]]) -> str:
  """MODEL_CARD.md of a classifier folder."""
  cfg, held_out, machine = training["config"], training["held_out"], training["machine"]
  names = training["data"]["class_names"]
  lines = [
      "# dfjax shapes classifier",
      "",
      "A small CNN (Flax NNX) that names the class of a `dfjax.data` image. It judges sample quality",
      "(`dfjax.eval.quality`): the class accuracy of generated images and the Fréchet classifier",
      "distance (the FID analogue) between its penultimate features of generated and of dataset images.",
      "",
      "## Held-out accuracy",
      "",
      f"**{100 * held_out['accuracy']:.2f} %** on {held_out['images']:,} fresh images with uniformly random "
      f"classes (`dfjax.data.batch(({held_out['seed'][0]}, {held_out['seed'][1]}, i), ...)`, a seed stream "
      "no training batch uses). Per class:",
      "",
      "| class | accuracy |",
      "|---|---:|",
      *(f"| {i} `{name}` | {100 * a:.1f} % |" for i, (name, a) in enumerate(zip(names, held_out["per_class"]))),
      "",
      "## Reproduce",
      "",
      "```",
      training["command"],
      "```",
      "",
      f"Fixed seed {cfg['seed']}: the init, every batch and its noise augmentation are functions of "
      "(seed, step), so the command gives the same weights again, also when interrupted and continued",
      "with `--resume`.",
      "",
      "## Model and training",
      "",
      f"- Conv stages of widths {config['channels']} (3×3 conv, GroupNorm({config['groups']}), SiLU, 2×2 "
      f"mean pool), global mean, a {config['features']}-wide SiLU layer (the features), a linear read-out "
      f"to {config['num_classes']} classes; {num_params:,} params.",
      f"- {cfg['steps']:,} steps of batch {cfg['batch']} ({training['images_seen']:,} fresh images, step s "
      f"draws `dfjax.data.batch(({cfg['seed']}, s), {cfg['batch']})`), each image with Gaussian noise of std "
      f"uniform in [0, {cfg['noise_augment']:g}].",
      f"- Cross-entropy; AdamW (β = 0.9, 0.99, weight decay {cfg['weight_decay']:g}), peak learning rate "
      f"{cfg['lr']:g} after {cfg['warmup_steps']} warm-up steps"
      + (f", cosine decay to {cfg['lr'] * cfg['final_lr_fraction']:g}" if cfg["cosine"] else ", then constant")
      + f"; gradient clipping at global norm {cfg['grad_clip']:g}.",
      f"- Wall time {training['wall_seconds']:.0f} s (compilation and the held-out evaluation included) on "
      f"{machine['cpu']}, {machine['cpu_cores']} CPU cores ({machine['device_kind']}, jax {machine['jax']}), "
      "shared with other jobs.",
      "",
      "## Loss curve",
      "",
      "| step | loss | learning rate |",
      "|---:|---:|---:|",
      *(f"| {s} | {l:.4f} | {r:.2e} |" for s, l, r in subsample(loss_rows, _CURVE_ROWS)),
      "",
      "## Limits",
      "",
      "It knows the dataset's ten patterns and nothing else: an image unlike all of them still gets one",
      "of the ten names. Its accuracy on generated samples measures whether they show their class as",
      "this classifier sees it, which is a proxy for — not a proof of — what a person would read.",
      "",
  ]
  return "\n".join(lines)
