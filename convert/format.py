"""The dfjax checkpoint format: its folder layout, manifest, dtypes and atomic writing.

A dfjax checkpoint is a folder:

  params/                 the denoiser's NNX params (orbax), nested like `nnx.state(model, nnx.Param)`
  config.json             its diffusers config (UNet, DiT or PixArt): the source's, with what conversion
                          decided from the weights filled in (PixArt's use_additional_conditions)
  scheduler_config.json   the pipeline's scheduler config, when the source had one
  manifest.json           format marker, the denoiser's class ("model"), what it was made from, dtype,
                          dfjax version; under "components" each converted model's class, folder and
                          conversion notes (DiT's merged per-block embedders…); under "files" the size
                          and sha256 of every file it holds (`write_manifest`)

The denoiser sits at the root, so `dfjax.load_model(folder)` reads every checkpoint alike. A whole
pipeline's other models (VAE, text encoders) go in subfolders named as the diffusers components
(`vae/params/`, `vae/config.json`, …), each a "components" entry of the one manifest.

Every writer (`convert_checkpoint`, `dfjax train`'s export) writes it into a hidden temporary
sibling of the destination and renames it into place at the end (`convert.atomic`), so an
interrupted or failed write leaves no half checkpoint behind; every reader checks it with
`read_manifest` and the file hashes with `changed_files`. One definition of the format, shared by
both sides.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from models.build import check_unet_config

FORMAT = "dfjax-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARAMS_DIR = "params"
CONFIG = "config.json"
SCHEDULER_CONFIG = "scheduler_config.json"
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


# ---------------------------------------------------------------------------------- reading

def read_json(path: Path) -> dict:
  """A JSON object from `path`, with the file named in the error when it is not one."""
  try:
    value = json.loads(Path(path).read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: cannot read JSON ({type(e).__name__}: {e})") from e
  if not isinstance(value, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
  return value


def read_unet_config(file: Path) -> dict:
  """A diffusers UNet `config.json` as a dict, checked to be one dfjax can build.

  Raises:
    ValueError: naming the file, when it is not a UNet2DConditionModel config dfjax supports.
  """
  config = read_json(file)
  check_unet_config(config, str(file))
  return config


def is_checkpoint(path: Path) -> bool:
  """Whether `path` is a folder with a dfjax manifest."""
  try:
    return read_json(Path(path) / MANIFEST).get("format") == FORMAT
  except ValueError:
    return False


def read_manifest(folder: Path) -> dict | None:
  """The manifest of the dfjax checkpoint `folder`; None when it has no manifest of the format.

  Raises:
    ValueError: a manifest.json that is there but is not valid JSON (a damaged checkpoint).
  """
  file = Path(folder) / MANIFEST
  if not file.is_file():
    return None
  try:
    manifest = read_json(file)
  except ValueError as e:
    raise ValueError(f"{file} is not valid JSON, the checkpoint is damaged ({e.__cause__ or e}); re-run "
                     "dfjax convert (or dfjax train --export) to write it again") from e
  return manifest if manifest.get("format") == FORMAT else None


# ---------------------------------------------------------------------------------- what it holds

def as_float_dtype(dtype: str | np.dtype, name: str = "dtype") -> np.dtype:
  """`"bf16"`, `"float16"`, `jnp.float32`… → a numpy float dtype, or a ValueError naming `name`."""
  choices = "use float32, float16 or bfloat16 (or fp32, fp16, half, bf16)"
  try:
    result = jnp.dtype(_DTYPE_ALIASES.get(dtype, dtype) if isinstance(dtype, str) else dtype)
  except TypeError as e:
    raise ValueError(f"{name} {dtype!r} is not a dtype; {choices}") from e
  if not jnp.issubdtype(result, jnp.floating):
    raise ValueError(f"{name} {dtype!r} is not a float dtype; {choices}")
  return result


def check_weights(tensors: Mapping[str, np.ndarray], what: str) -> None:
  """Every tensor is a float and finite, else one ValueError listing the offenders."""
  not_float = [f"{k} ({a.dtype})" for k, a in tensors.items()
               if not jnp.issubdtype(a.dtype, jnp.floating)]
  if not_float:
    raise ValueError(f"{what}: {len(not_float)} tensors are not floating point: "
                     + ", ".join(sorted(not_float)))
  bad = []
  for key, array in tensors.items():
    finite = np.isfinite(array.astype(np.float32) if array.dtype == ml_dtypes.bfloat16 else array)
    if not finite.all():
      bad.append(f"{key} ({int(array.size - finite.sum())} of {array.size} values NaN/inf)")
  if bad:
    raise ValueError(f"{what}: {len(bad)} tensors hold NaN or inf, refusing to convert: "
                     + ", ".join(sorted(bad)))


def manifest_header(params: Mapping[Any, np.ndarray], model: str = "UNet2DConditionModel") -> dict:
  """The manifest fields every dfjax checkpoint has, whatever wrote it; `model` is the diffusers class
  of the model at its root (the one `dfjax.load_model` builds)."""
  dtypes = sorted({str(a.dtype) for a in params.values()})
  return {
      "format": FORMAT,
      "format_version": FORMAT_VERSION,
      "model": model,
      "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
      "num_params": int(sum(a.size for a in params.values())),
      "num_tensors": len(params),
      "dfjax_version": _dfjax_version(),
      "converted_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
  }


def _dfjax_version() -> str:
  try:
    return importlib.metadata.version("dfjax")
  except importlib.metadata.PackageNotFoundError:
    return "unknown"


# ---------------------------------------------------------------------------------- integrity

def sha256_file(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 24):
      digest.update(chunk)
  return digest.hexdigest()


def write_manifest(folder: Path, manifest: Mapping[str, Any], hashed: Iterable[str]) -> None:
  """Writes `manifest` into the checkpoint `folder` with "files": path → {bytes, sha256} of every
  file under the `hashed` entries (files or folders, relative to `folder`) that exist."""
  files = {}
  for entry in hashed:
    top = folder / entry
    for file in sorted(top.rglob("*")) if top.is_dir() else [top] if top.is_file() else []:
      if file.is_file():
        files[file.relative_to(folder).as_posix()] = {"bytes": file.stat().st_size,
                                                      "sha256": sha256_file(file)}
  (folder / MANIFEST).write_text(json.dumps({**manifest, "files": files}, indent=2) + "\n")


def changed_files(folder: Path, manifest: Mapping[str, Any], entries: Iterable[str]) -> list[str] | None:
  """The recorded files under `entries` that are missing or differ from what was written, each as
  "path: why"; None when the manifest records no hashes (written before dfjax recorded them)."""
  files = manifest.get("files")
  if files is None:
    return None
  if not isinstance(files, dict):
    raise ValueError(f"{folder / MANIFEST}: \"files\" is not a mapping; the manifest is damaged, "
                     "re-run dfjax convert")
  problems = []
  for name, record in sorted(files.items()):
    if not any(name == e or name.startswith(f"{e}/") for e in entries):
      continue
    file, record = folder / name, record if isinstance(record, dict) else {}
    if not file.is_file():
      problems.append(f"{name}: missing")
    elif file.stat().st_size != record.get("bytes"):
      problems.append(f"{name}: {file.stat().st_size} bytes, {record.get('bytes')} were written")
    elif sha256_file(file) != record.get("sha256"):
      problems.append(f"{name}: contents changed (sha256 differs)")
  return problems
