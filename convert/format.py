"""The dfjax checkpoint format: its folder layout, manifest, dtypes and atomic writing.

A dfjax checkpoint is a folder:

  params/                 the NNX params (orbax), nested like `nnx.state(model, nnx.Param)`
  config.json             the diffusers UNet config, unchanged
  scheduler_config.json   the pipeline's scheduler config, when the source had one
  manifest.json           format marker, what it was made from, dtype, dfjax version

Every writer (`convert_checkpoint`, `dfjax train`'s export) writes it into a hidden temporary
sibling of the destination and renames it into place at the end (`write_atomically`), so an
interrupted or failed write leaves no half checkpoint behind; every reader checks it with
`is_checkpoint`. One definition of the format, shared by both sides.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
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


# ---------------------------------------------------------------------------------- what it holds

def as_float_dtype(dtype: str | np.dtype) -> np.dtype:
  """`"bf16"`, `"float16"`, `jnp.float32`… → a numpy float dtype, or a ValueError."""
  name = _DTYPE_ALIASES.get(dtype, dtype) if isinstance(dtype, str) else dtype
  try:
    result = jnp.dtype(name)
  except TypeError as e:
    raise ValueError(f"dtype {dtype!r} is not a dtype; use float32, float16 or bfloat16") from e
  if not jnp.issubdtype(result, jnp.floating):
    raise ValueError(f"dtype {dtype!r} is not a float dtype; use float32, float16 or bfloat16")
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


def manifest_header(params: Mapping[Any, np.ndarray]) -> dict:
  """The manifest fields every dfjax checkpoint has, whatever wrote it."""
  dtypes = sorted({str(a.dtype) for a in params.values()})
  return {
      "format": FORMAT,
      "format_version": FORMAT_VERSION,
      "model": "UNet2DConditionModel",
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


# ---------------------------------------------------------------------------------- writing

def write_atomically(dst: Path, write: Callable[[Path], None]) -> None:
  """Runs `write(tmp)` on a fresh temporary sibling of `dst`, then renames it to `dst`.

  An existing `dst` is first renamed aside and only deleted once the new folder is in place; if
  the swap fails it is renamed back. On any error the temporary folder is removed.
  """
  dst = dst.absolute()
  dst.parent.mkdir(parents=True, exist_ok=True)
  tag = uuid.uuid4().hex[:8]
  tmp = dst.with_name(f".{dst.name}.tmp-{tag}")
  old = dst.with_name(f".{dst.name}.old-{tag}")
  tmp.mkdir()
  try:
    write(tmp)
    if dst.exists():
      os.replace(dst, old)
      try:
        os.replace(tmp, dst)
      except BaseException:
        os.replace(old, dst)
        raise
      shutil.rmtree(old)
    else:
      os.replace(tmp, dst)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
