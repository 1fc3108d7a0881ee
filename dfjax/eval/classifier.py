"""The shapes classifier: a small Flax NNX CNN that names the class of a `dfjax.data` image.

It is the judge of sample quality (dfjax/eval/quality.py): the share of generated images it
labels with the class they were asked for, and the Fréchet distance between its penultimate
features of generated and of dataset images (the FID analogue). Four conv stages halve the
64×64 image down to 4×4 (GroupNorm, SiLU); a global mean, one hidden layer (the features) and a
linear read-out give the class logits.

The shipped weights are `dfjax/assets/classifier/` (`load_classifier()`), written by
`dfjax train classifier` (dfjax/eval/train_classifier.py), with a card stating their held-out
accuracy on fresh dataset samples.

Shape letters: B batch, H rows, W columns, C channels, F features, K classes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert.format import CONFIG, MANIFEST, PARAMS_DIR, read_json, read_manifest
from dfjax.loading import restore_params, verify_files

CLASSIFIER_KIND = "ShapeClassifier"  # manifest "model" of a classifier folder
EVAL_BATCH = 256  # images per jitted forward when classifying many


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
  """Architecture of the classifier (its folder's config.json).

  Attributes:
    channels: conv widths of the stages; each stage ends with a 2×2 mean pool.
    features: width of the penultimate layer (the Fréchet distance's feature space).
    num_classes: K logits.
    groups: GroupNorm groups in every stage (divides every width).
    image_size: side of the square RGB input.
  """

  channels: tuple[int, ...] = (8, 16, 32, 64)
  features: int = 64
  num_classes: int = 10
  groups: int = 4
  image_size: int = 64

  def __post_init__(self):
    object.__setattr__(self, "channels", tuple(self.channels))
    if not self.channels or any(c < 1 or c % self.groups for c in self.channels):
      raise ValueError(f"channels {list(self.channels)} must be positive multiples of groups={self.groups}")
    if self.features < 1 or self.num_classes < 2:
      raise ValueError(f"need features >= 1 and num_classes >= 2, got {self.features}, {self.num_classes}")
    if self.image_size % 2 ** len(self.channels):
      raise ValueError(f"image_size {self.image_size} must be divisible by 2^{len(self.channels)} "
                       f"(one halving per stage of channels {list(self.channels)})")

  def to_json(self) -> dict[str, Any]:
    return {"_class_name": CLASSIFIER_KIND, **dataclasses.asdict(self), "channels": list(self.channels)}

  @classmethod
  def from_json(cls, config: dict[str, Any], source: str = "config") -> ClassifierConfig:
    if config.get("_class_name") != CLASSIFIER_KIND:
      raise ValueError(f"{source}: _class_name {config.get('_class_name')!r} is not {CLASSIFIER_KIND!r}; "
                       "not a dfjax shapes classifier")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - fields - {"_class_name"})
    if unknown:
      raise ValueError(f"{source}: unknown classifier config keys {unknown}; valid: {sorted(fields)}")
    return cls(**{k: v for k, v in config.items() if k in fields})


class _Stage(nnx.Module):
  """3×3 conv, GroupNorm, SiLU, then a 2×2 mean pool: (B, H, W, C) → (B, H/2, W/2, C')."""

  def __init__(self, c_in: int, c_out: int, groups: int, *, rngs: nnx.Rngs):
    self.conv = nnx.Conv(c_in, c_out, (3, 3), padding="SAME", rngs=rngs)
    self.norm = nnx.GroupNorm(c_out, num_groups=groups, rngs=rngs)

  def __call__(self, x_bhwc: jax.Array) -> jax.Array:
    x_bhwc = nnx.silu(self.norm(self.conv(x_bhwc)))  # B, H, W, C'
    b, h, w, c = x_bhwc.shape
    return x_bhwc.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))  # B, H/2, W/2, C'


class ShapeClassifier(nnx.Module):
  """`logits = model(images)`; `model.features(images)` is the penultimate layer."""

  def __init__(self, config: ClassifierConfig, *, rngs: nnx.Rngs):
    self.config = config
    widths = (3, *config.channels)
    self.stages = nnx.List([_Stage(a, b, config.groups, rngs=rngs) for a, b in zip(widths, widths[1:])])
    self.hidden = nnx.Linear(config.channels[-1], config.features, rngs=rngs)
    self.head = nnx.Linear(config.features, config.num_classes, rngs=rngs)

  def features(self, images_bhwc: jax.Array) -> jax.Array:
    """Penultimate activations of images in [-1, 1]."""
    x_bhwc = images_bhwc
    for stage in self.stages:
      x_bhwc = stage(x_bhwc)  # B, H/2^i, W/2^i, C_i
    return nnx.silu(self.hidden(x_bhwc.mean(axis=(1, 2))))  # B, F

  def __call__(self, images_bhwc: jax.Array) -> jax.Array:
    return self.head(self.features(images_bhwc))  # B, K


# ------------------------------------------------------------------------------ many images

@functools.partial(nnx.jit, static_argnames="with_logits")
def _forward(model: ShapeClassifier, images_bhwc: jax.Array, with_logits: bool):
  features_bf = model.features(images_bhwc)  # B, F
  return features_bf, (model.head(features_bf) if with_logits else None)  # B, F / B, K


def classify(model: ShapeClassifier, images_bhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Features (B, F) and logits (B, K) of any number of images in [-1, 1], as host float64 arrays.

  Runs in batches of EVAL_BATCH; a smaller batch is padded to the next power of two, so a few
  programs serve every count.
  Raises:
    ValueError: not a (B, S, S, 3) batch of the classifier's image size S, or non-finite values.
  """
  images_bhwc = np.asarray(images_bhwc, np.float32)
  side = model.config.image_size
  if images_bhwc.ndim != 4 or images_bhwc.shape[1:] != (side, side, 3):
    raise ValueError(f"the classifier takes (B, {side}, {side}, 3) RGB images in [-1, 1], got shape "
                     f"{images_bhwc.shape}; sample at the dataset's size")
  if not np.isfinite(images_bhwc).all():
    raise ValueError("images to classify hold NaN or inf")
  features, logits = [], []
  for start in range(0, len(images_bhwc), EVAL_BATCH):
    chunk = images_bhwc[start:start + EVAL_BATCH]
    padded = np.pad(chunk, ((0, min(EVAL_BATCH, 1 << (len(chunk) - 1).bit_length()) - len(chunk)),
                            (0, 0), (0, 0), (0, 0)))
    f_bf, l_bk = jax.device_get(_forward(model, jnp.asarray(padded), True))
    features.append(f_bf[:len(chunk)])
    logits.append(l_bk[:len(chunk)])
  empty = (np.zeros((0, model.config.features)), np.zeros((0, model.config.num_classes)))
  if not features:
    return empty
  return np.concatenate(features).astype(np.float64), np.concatenate(logits).astype(np.float64)


# ------------------------------------------------------------------------------ loading

def classifier_dir() -> Path:
  """The folder of the shipped classifier inside the installed package."""
  return Path(str(resources.files("dfjax") / "assets" / "classifier"))


def load_classifier(folder: str | os.PathLike | None = None, *, verify: bool = True) -> ShapeClassifier:
  """Loads a classifier folder written by `dfjax train classifier` (default: the shipped one).

  Raises:
    FileNotFoundError: the shipped classifier is missing (the package was installed without assets).
    ValueError: not a classifier folder, or damaged files (hashes differ from the manifest's).
  """
  folder = classifier_dir() if folder is None else Path(folder)
  manifest = read_manifest(folder)
  if manifest is None or manifest.get("model") != CLASSIFIER_KIND:
    if folder == classifier_dir():
      raise FileNotFoundError(f"the shipped classifier is missing from {folder}; reinstall dfjax (the "
                              "wheel ships it as package data)")
    raise ValueError(f"{folder} is not a dfjax shapes classifier (no {MANIFEST} with model "
                     f"{CLASSIFIER_KIND!r}); write one with `dfjax train classifier`")
  if verify:
    verify_files(folder, manifest, (PARAMS_DIR, CONFIG))
  config = ClassifierConfig.from_json(read_json(folder / CONFIG), str(folder / CONFIG))
  abstract = nnx.eval_shape(lambda: ShapeClassifier(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                        nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, restore_params(folder / PARAMS_DIR, target, check_finite=verify))
  return nnx.merge(graphdef, state)


def read_card_record(folder: str | os.PathLike | None = None) -> dict[str, Any]:
  """The classifier's training.json (its held-out accuracy, command, data seeds)."""
  folder = classifier_dir() if folder is None else Path(folder)
  return json.loads((folder / "training.json").read_text())
