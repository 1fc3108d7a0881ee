"""A trained class-conditional model as a dfjax checkpoint folder, and back.

The folder is an ordinary dfjax checkpoint (the layout of `convert/format.py`, so
`dfjax.load_model` loads its denoiser) with what turns class ids into conditioning beside it:

  params/                 the denoiser's NNX params (orbax): a UNet or a DiT
  config.json             the denoiser's diffusers config
  scheduler_config.json   the training noise schedule (diffusers DDIMScheduler config)
  manifest.json           format marker; "source" describes the training run; "files" the sha256
                          of params/, config.json, scheduler_config.json and the class files
  class_tokens/           UNet: the ClassTokens params (orbax)
  class_tokens.json       UNet: num_classes, null_id, num_tokens, dim and the class names
  classes.json            DiT (its class embedding is in params/): num_classes, null_id, class names
  training.json           the run: command, config, wall time, machine, the loss curve
  loss.csv                step, loss (mean over each logging interval), learning rate
  MODEL_CARD.md           data, model, run, loss curve and machine, written from the above

It is written into a temporary sibling and renamed into place, as conversion does
(`convert.atomic`: interrupted or failed writes leave nothing behind).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert.atomic import prepare_destination, write_atomically
from convert.format import (CONFIG, MANIFEST, PARAMS_DIR, SCHEDULER_CONFIG, as_float_dtype, check_weights,
                            manifest_header, read_json, write_manifest)
from convert.keymap import path_str
from dfjax.loading import load_model, load_scheduler_config, restore_params, verify_files
from dfjax.sampling import Conditioning
from dfjax.training.card import write_model_card
from models.class_tokens import ClassTokens
from models.dit_config import DiTConfig

TOKENS_DIR = "class_tokens"
TOKENS_CONFIG = "class_tokens.json"
CLASSES_CONFIG = "classes.json"
TRAINING = "training.json"
LOSS_CSV = "loss.csv"


class TrainedModel(NamedTuple):
  """A loaded class-conditional model: `denoiser, class_tokens, scheduler_config = model`.

  Attributes:
    denoiser: the UNet2DConditionModel or DiTTransformer2DModel (`denoiser.config` is its config).
    class_tokens: the UNet's class → `encoder_hidden_states` table; None for a DiT, which embeds
      class ids itself (`class_labels`).
    scheduler_config: the diffusers scheduler config it was trained with.
  """

  denoiser: nnx.Module
  class_tokens: ClassTokens | None
  scheduler_config: dict

  @property
  def num_classes(self) -> int:
    """Real classes; the null (unconditional) class is the id after the last."""
    return self.class_tokens.num_classes if self.class_tokens is not None else self.denoiser.config.null_class

  def conditioning(self, labels_b) -> tuple[Conditioning, Conditioning]:
    """`cond, uncond` of `dfjax.sample` for the (B,) class ids `labels_b`: those classes and the null class."""
    labels_b = jnp.asarray(labels_b, jnp.int32)  # B
    if self.class_tokens is not None:
      return (Conditioning(self.class_tokens(labels_b)),  # B, T, D
              Conditioning(self.class_tokens.null(labels_b.size)))
    null_b = jnp.full_like(labels_b, self.num_classes)  # B
    return Conditioning(class_labels=labels_b), Conditioning(class_labels=null_b)


def write_model(folder: str | os.PathLike, denoiser: nnx.Module, class_tokens: ClassTokens | None, *,
                denoiser_config: Mapping, scheduler_config: Mapping, class_names: Sequence[str],
                training: Mapping[str, Any], loss_rows: Sequence[tuple[int, float, float]],
                overwrite: bool = True) -> Path:
  """Writes the trained model as a dfjax checkpoint folder (atomically).

  Args:
    folder: destination; an existing dfjax checkpoint there is replaced when `overwrite` (a
      symlink's target).
    denoiser, class_tokens: the modules whose `nnx.Param`s are stored (as they are: float32);
      class_tokens None for a DiT (its class embedding is one of its params).
    denoiser_config: the denoiser's diffusers config dict (config.json).
    scheduler_config: the diffusers scheduler config the model was trained with.
    class_names: name of each class id.
    training: what training.json records (command, hyper-parameters, wall time, machine…).
    loss_rows: (step, loss, learning rate) rows of loss.csv.
  Returns:
    `folder` as a Path.
  Raises:
    FileExistsError: `folder` exists and is not a dfjax checkpoint, or `overwrite` is False.
    ValueError: a param holds NaN or inf.
    OSError: the operating system refused a write (disk full…), in one line; nothing is written.
  """
  folder = Path(folder)
  target = prepare_destination(folder, overwrite)
  trees = {PARAMS_DIR: _pure(denoiser)}
  flat = {path_str(p): np.asarray(v) for p, v in nnx.to_flat_state(nnx.state(denoiser, nnx.Param))}
  check_weights(flat, "trained denoiser params")
  model_name = denoiser_config.get("_class_name", "UNet2DConditionModel")
  if class_tokens is None:
    class_files = {CLASSES_CONFIG: {"num_classes": denoiser.config.null_class, "null_id": denoiser.config.null_class,
                                    "class_names": list(class_names)}}
  else:
    check_weights({"class_tokens.embedding": np.asarray(class_tokens.embedding[...])}, "trained class tokens")
    trees[TOKENS_DIR] = _pure(class_tokens)
    class_files = {TOKENS_CONFIG: {"num_classes": class_tokens.num_classes, "null_id": class_tokens.null_id,
                                   "num_tokens": int(class_tokens.embedding.shape[1]),
                                   "dim": int(class_tokens.embedding.shape[2]), "class_names": list(class_names)}}
  source = {"kind": "dfjax train", **({"class_tokens": TOKENS_DIR} if class_tokens is not None else {})}
  manifest = {**manifest_header(flat, model_name), "source": source}

  def write(tmp: Path) -> None:
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as checkpointer:
      for name, tree in trees.items():
        checkpointer.save(tmp / name, tree)
    _write_json(tmp / CONFIG, dict(denoiser_config))
    _write_json(tmp / SCHEDULER_CONFIG, dict(scheduler_config))
    for name, value in class_files.items():
      _write_json(tmp / name, value)
    _write_json(tmp / TRAINING, dict(training))
    with open(tmp / LOSS_CSV, "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(["step", "loss", "learning_rate"])
      writer.writerows([int(s), f"{l:.6f}", f"{r:.3e}"] for s, l, r in loss_rows)
    write_manifest(tmp, manifest, hashed=(PARAMS_DIR, CONFIG, SCHEDULER_CONFIG, *trees.keys() - {PARAMS_DIR},
                                          *class_files))
    write_model_card(tmp)

  write_atomically(target, write, size_bytes=sum(a.nbytes for a in jax.tree.leaves(trees)))
  return folder


def is_trained_model(folder: str | os.PathLike) -> bool:
  """Whether `folder` looks like a `write_model` export (it has its class files)."""
  return any((Path(folder) / name).is_file() for name in (TOKENS_CONFIG, CLASSES_CONFIG))


def load_trained(folder: str | os.PathLike, *, dtype: Any = None, param_dtype: Any = None,
                 sharding: jax.sharding.Sharding | None = None, verify: bool = True) -> TrainedModel:
  """Loads a folder written by `write_model` (e.g. `dfjax train`'s model/).

  Args:
    folder: the model folder.
    dtype, param_dtype, sharding, verify: as in `dfjax.load_model`, for every module (verify also
      checks the class files and the noise schedule against the manifest).
  Returns:
    TrainedModel(denoiser, class_tokens, scheduler_config).
  Raises:
    ValueError: not a trained dfjax model (e.g. a converted text-to-image UNet: no class tokens),
      class tokens that do not fit the UNet, or damaged files (as in `dfjax.load_model`).
  """
  folder = Path(folder)
  kw = {k: as_float_dtype(v, k) for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v is not None}
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
  denoiser = load_model(folder, dtype=dtype, param_dtype=param_dtype, sharding=sharding, verify=verify)
  if isinstance(denoiser.config, DiTConfig):  # its class embedding is one of its params
    if not (folder / CLASSES_CONFIG).is_file():
      raise ValueError(f"{folder} is a DiT checkpoint without {CLASSES_CONFIG}: not a class-conditional model "
                       "written by `dfjax train`")
    tokens, class_files = None, (CLASSES_CONFIG,)
  else:
    tokens, class_files = _load_class_tokens(folder, denoiser, kw, sharding, verify), (TOKENS_DIR, TOKENS_CONFIG)
  manifest = read_json(folder / MANIFEST)
  if verify and "files" in manifest:  # (load_model warned already when it records no hashes)
    verify_files(folder, manifest, (*class_files, SCHEDULER_CONFIG))
  scheduler_config = load_scheduler_config(folder)
  if scheduler_config is None:
    raise ValueError(f"{folder} has no {SCHEDULER_CONFIG}: a trained model needs its noise schedule")
  return TrainedModel(denoiser, tokens, scheduler_config)


def _load_class_tokens(folder: Path, unet: nnx.Module, kw: Mapping, sharding, verify: bool) -> ClassTokens:
  if not (folder / TOKENS_CONFIG).is_file() or not (folder / TOKENS_DIR).is_dir():
    raise ValueError(f"{folder} is a dfjax checkpoint without class tokens ({TOKENS_CONFIG}, "
                     f"{TOKENS_DIR}/): not a class-conditional model written by `dfjax train`")
  meta = read_json(folder / TOKENS_CONFIG)
  if meta["dim"] != unet.config.encoder_dim:
    raise ValueError(f"{folder / TOKENS_CONFIG}: tokens of width {meta['dim']} do not fit the UNet's "
                     f"cross_attention_dim {unet.config.encoder_dim}")
  tokens = nnx.eval_shape(lambda: ClassTokens(meta["num_classes"], meta["num_tokens"], meta["dim"],
                                              rngs=nnx.Rngs(0), **kw))
  graphdef, abstract = nnx.split(tokens)
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                        nnx.to_pure_dict(abstract))
  nnx.replace_by_pure_dict(abstract, restore_params(folder / TOKENS_DIR, target, check_finite=verify))
  return nnx.merge(graphdef, abstract)


def _pure(module: nnx.Module) -> dict:
  """The module's params as a nested dict of host arrays, as `nnx.state(m, nnx.Param)` nests."""
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(module, nnx.Param)))


def _write_json(path: Path, value: Any) -> None:
  path.write_text(json.dumps(value, indent=2) + "\n")
