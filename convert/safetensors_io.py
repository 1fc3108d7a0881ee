"""Reading one diffusers model folder from disk: which files hold it, and their tensors as numpy arrays.

A model folder (a pipeline's `unet/`, `transformer/`…, or one saved alone) holds `config.json` and
weights, safetensors only, named by diffusers (STEM `diffusion_pytorch_model`) or, for the text
encoders, by transformers (STEM `model`):

  STEM[.VARIANT].safetensors               one file
  STEM.safetensors.index[.VARIANT].json     shards named by the index
  STEM.VARIANT.safetensors.index.json       (older spelling of the same)

Full precision is preferred when both it and a variant are present, unless a variant is asked for.
Every problem (no weights, `.bin` only, a missing shard, a corrupted file) is a `ValueError` naming
the folder or file; nothing here writes.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors import safe_open

WEIGHTS_STEM = "diffusion_pytorch_model"
TRANSFORMERS_STEM = "model"  # what transformers' save_pretrained writes (a pipeline's text_encoder/)
_STEMS = f"(?:{WEIGHTS_STEM}|{TRANSFORMERS_STEM})"
_SINGLE_RE = re.compile(rf"^{_STEMS}(?:\.(?P<variant>\w+))?\.safetensors$")
_INDEX_RES = (
    re.compile(rf"^{_STEMS}\.safetensors\.index(?:\.(?P<variant>\w+))?\.json$"),
    re.compile(rf"^{_STEMS}\.(?P<variant>\w+)\.safetensors\.index\.json$"),
)
SAFETENSORS_HINT = (
    "dfjax reads safetensors only. Re-save the model with diffusers: "
    "`ModelClass.from_pretrained(SRC).save_pretrained(DST, safe_serialization=True)` (UNet2DConditionModel, "
    "DiTTransformer2DModel…) "
    "(or `pipe.save_pretrained(DST, safe_serialization=True)` for a whole pipeline)."
)


@dataclasses.dataclass(frozen=True)
class ModelFiles:
  """The files of one diffusers model folder (a UNet, a DiT/PixArt transformer, later a VAE…).

  Attributes:
    folder: the folder holding the model's `config.json` and weights.
    config: that `config.json`.
    weights: the safetensors files, in reading order (one file, or the shards of the index).
    index: the shard index when the weights are sharded.
    variant: the weights' variant (`"fp16"`…), None for the full-precision files.
  """

  folder: Path
  config: Path
  weights: tuple[Path, ...]
  index: Path | None = None
  variant: str | None = None

  @property
  def all_files(self) -> tuple[Path, ...]:
    """Every file the model is read from, for the manifest."""
    return (self.config, *(() if self.index is None else (self.index,)), *self.weights)


def find_weights(folder: Path, variant: str | None = None) -> ModelFiles:
  """The config and safetensors weights of the diffusers (or transformers) model folder `folder`.

  Args:
    folder: holds `config.json` and `diffusion_pytorch_model*.safetensors` (or `model*.safetensors`).
    variant: the weights variant to read (`"fp16"`…); None prefers full precision, falling back
      to the one variant present.
  Raises:
    ValueError: no config.json, or no usable safetensors weights (naming the folder).
  """
  config = folder / "config.json"
  if not config.is_file():
    raise ValueError(f"{folder}: no `config.json`; expected a diffusers model folder (config.json + "
                     f"{WEIGHTS_STEM}.safetensors)")
  chosen_variant, weights, index = _choose_weights(folder, variant)
  return ModelFiles(folder, config, weights, index, chosen_variant)


def _weight_sets(folder: Path) -> dict[str | None, dict[str, Path]]:
  """Variant → {"single": file, "index": file} for the safetensors weights in the folder."""
  sets: dict[str | None, dict[str, Path]] = {}
  for path in sorted(folder.iterdir()):
    if match := _SINGLE_RE.match(path.name):
      sets.setdefault(match["variant"], {})["single"] = path
    for index_re in _INDEX_RES:
      if match := index_re.match(path.name):
        sets.setdefault(match["variant"], {})["index"] = path
  return sets


def _choose_weights(folder: Path, variant: str | None
                    ) -> tuple[str | None, tuple[Path, ...], Path | None]:
  """Picks the variant and returns (variant, weight files, index or None)."""
  sets = _weight_sets(folder)
  if not sets:
    bins = sorted(p.name for p in folder.glob("*.bin"))
    if bins:
      raise ValueError(f"{folder} holds only PyTorch pickle weights ({', '.join(bins)}). "
                       + SAFETENSORS_HINT)
    listing = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
    raise ValueError(f"{folder}: no {WEIGHTS_STEM}*.safetensors weights (nor transformers' "
                     f"{TRANSFORMERS_STEM}*.safetensors; the folder holds {listing})")
  available = ", ".join(_variant_name(v) for v in sorted(sets, key=lambda v: (v is not None, v or "")))
  if variant is None and None not in sets:
    if len(sets) > 1:
      raise ValueError(f"{folder}: no full-precision weights and several variants ({available});"
                       " choose one with variant=")
    (variant,) = sets
  if variant not in sets:
    raise ValueError(f"{folder}: no weights of variant {_variant_name(variant)}; "
                     f"available: {available}")
  files = sets[variant]
  if len(files) == 2:
    raise ValueError(f"{folder}: both {files['single'].name} and {files['index'].name} exist for "
                     f"variant {_variant_name(variant)}; remove the stale one")
  if "single" in files:
    return variant, (files["single"],), None
  return variant, _shards_of(files["index"]), files["index"]


def _variant_name(variant: str | None) -> str:
  return "full precision (no variant)" if variant is None else repr(variant)


def _read_index(index: Path) -> dict[str, str]:
  """The index's weight_map, tensor name → shard file name."""
  try:
    weight_map = json.loads(index.read_text())["weight_map"]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise ValueError(f"{index}: not a safetensors shard index ({type(e).__name__}: {e})") from e
  if not isinstance(weight_map, dict):
    raise ValueError(f"{index}: `weight_map` is not a mapping")
  return weight_map


def _shards_of(index: Path) -> tuple[Path, ...]:
  """The shard files an index names, all present (else one error listing the missing ones)."""
  names = sorted(set(_read_index(index).values()))
  missing = [n for n in names if not (index.parent / n).is_file()]
  if missing:
    raise ValueError(f"{index} lists {len(names)} shards but {len(missing)} are missing from "
                     f"{index.parent}: {', '.join(missing)}")
  return tuple(index.parent / n for n in names)


def read_tensors(source: ModelFiles) -> dict[str, np.ndarray]:
  """All tensors of one model's weight files, by diffusers key.

  Raises:
    ValueError: a file is not valid safetensors (named), a key is in two files, or the shards do
      not hold what the index says.
  """
  tensors: dict[str, np.ndarray] = {}
  origin: dict[str, Path] = {}
  for path in source.weights:
    for key, array in read_safetensors(path).items():
      if key in tensors:
        raise ValueError(f"tensor {key!r} is in both {origin[key]} and {path}")
      tensors[key], origin[key] = array, path
  if source.index is not None:
    _check_index_matches(source.index, {k: p.name for k, p in origin.items()})
  return tensors


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
  """One safetensors file as numpy arrays (bf16 as ml_dtypes.bfloat16).

  Raises:
    ValueError: naming the file, when safetensors cannot parse it (truncated, corrupted).
  """
  try:
    with safe_open(path, framework="np") as f:
      return {key: f.get_tensor(key) for key in f.keys()}
  except Exception as e:  # safetensors raises its own SafetensorError, or OSError/ValueError
    raise ValueError(f"{path}: cannot read as safetensors, the file may be truncated or "
                     f"corrupted ({type(e).__name__}: {e})") from e


def _check_index_matches(index: Path, found: Mapping[str, str]) -> None:
  """The shards hold exactly the tensors the index places in them."""
  expected = _read_index(index)
  problems = [f"{k} (index: {v}, not found there)" for k, v in expected.items()
              if found.get(k) != v]
  problems += [f"{k} (in {v}, not in the index)" for k, v in found.items() if k not in expected]
  if problems:
    raise ValueError(f"{index} does not match its shards: " + "; ".join(sorted(problems)))
