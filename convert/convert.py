"""diffusers UNet folder → dfjax checkpoint folder.

A dfjax checkpoint is a folder:

  params/                 the NNX params (orbax), nested like `nnx.state(model, nnx.Param)`
  config.json             the diffusers UNet config, unchanged
  scheduler_config.json   the pipeline's scheduler config, when the source had one
  manifest.json           format marker, source files with sha256 and size, dtype, dfjax version

It is written into a hidden temporary sibling of the destination and renamed into place at the
end, so an interrupted or failed conversion leaves no half checkpoint behind.
"""

from __future__ import annotations

import datetime
from typing import Any
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from convert import keymap
from convert.safetensors_io import SourceFiles, find_source, read_json, read_tensors

log = logging.getLogger(__name__)

FORMAT = "dfjax-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARAMS_DIR = "params"
CONFIG = "config.json"
SCHEDULER_CONFIG = "scheduler_config.json"
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *,
                       variant: str | None = None, dtype: str | np.dtype | None = None,
                       overwrite: bool = False) -> Path:
  """Converts a diffusers UNet (pipeline or UNet folder, safetensors) into a dfjax checkpoint.

  Args:
    src: diffusers pipeline folder (`model_index.json` + `unet/`) or UNet folder.
    dst: the checkpoint folder to create.
    variant: weights variant to read (`"fp16"`…); None prefers full precision.
    dtype: float dtype to store the params in (`"float32"`, `"bf16"`…); None keeps the source's.
    overwrite: replace an existing dfjax checkpoint at `dst` (atomically).
  Returns:
    `dst` as a Path.
  Raises:
    FileExistsError: `dst` exists and `overwrite` is False, or it is not a dfjax checkpoint.
    ValueError: `dst` is or holds `src`; unreadable source, weights that do not fit the config,
      non-float or non-finite weights. Nothing is written in any of these cases.
  """
  src, dst = Path(src), Path(dst)
  _check_destination(src, dst, overwrite)
  store_dtype = None if dtype is None else as_float_dtype(dtype)
  # dfjax.loading builds the model; imported here, not at the top, as it imports this module.
  from dfjax.loading import read_unet_config, unet_param_shapes

  source = find_source(src, variant)
  config = read_unet_config(source.config)
  tensors = read_tensors(source)
  check_weights(tensors, f"source weights in {source.unet_dir}")
  params = keymap.convert_state_dict(tensors, unet_param_shapes(config))
  if store_dtype is not None:
    params = {path: array.astype(store_dtype) for path, array in params.items()}
    check_weights({keymap.path_str(p): a for p, a in params.items()}, f"weights cast to {dtype}")
  manifest = _manifest(source, params)
  _write_atomically(dst, lambda tmp: _write_checkpoint(tmp, source, params, manifest))
  log.info("converted %s (%d params, %s) into %s", src, len(params), manifest["dtype"], dst)
  return dst


# ---------------------------------------------------------------------------------- checks

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


def _check_destination(src: Path, dst: Path, overwrite: bool) -> None:
  """Refuses a destination that would lose data: an existing folder without `overwrite`, a
  folder that is not a dfjax checkpoint, or one holding the source."""
  src_abs, dst_abs = src.resolve(), dst.resolve()
  if dst_abs == src_abs or dst_abs in src_abs.parents:
    raise ValueError(f"destination {dst} is (or holds) the source {src}; choose another folder")
  if not dst.exists() and not dst.is_symlink():
    return
  if not overwrite:
    raise FileExistsError(f"{dst} already exists; pass overwrite=True (CLI: --overwrite) to "
                          "replace it")
  if not is_checkpoint(dst) and not (dst.is_dir() and not any(dst.iterdir())):
    raise FileExistsError(f"{dst} exists and is not a dfjax checkpoint (no {MANIFEST} of format "
                          f"{FORMAT!r}); refusing to replace it, remove it yourself if meant")


def is_checkpoint(path: Path) -> bool:
  """Whether `path` is a folder with a dfjax manifest."""
  try:
    return read_json(Path(path) / MANIFEST).get("format") == FORMAT
  except ValueError:
    return False


# ---------------------------------------------------------------------------------- writing

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


def _manifest(source: SourceFiles, params: Mapping[keymap.Path, np.ndarray]) -> dict:
  return {
      **manifest_header(params),
      "source": {
          "path": str(source.root.resolve()),
          "variant": source.variant,
          "files": [_file_record(p, source.root) for p in source.all_files],
      },
  }


def _file_record(path: Path, root: Path) -> dict:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 24):
      digest.update(chunk)
  return {"path": os.path.relpath(path, root), "bytes": path.stat().st_size,
          "sha256": digest.hexdigest()}


def _dfjax_version() -> str:
  try:
    return importlib.metadata.version("dfjax")
  except importlib.metadata.PackageNotFoundError:
    return "unknown"


def _write_checkpoint(folder: Path, source: SourceFiles,
                      params: Mapping[keymap.Path, np.ndarray], manifest: dict) -> None:
  """Writes every file of the checkpoint into `folder` (which exists and is empty)."""
  import orbax.checkpoint as ocp
  from flax.traverse_util import unflatten_dict

  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(folder / PARAMS_DIR, unflatten_dict(dict(params)))
    checkpointer.wait_until_finished()
  shutil.copyfile(source.config, folder / CONFIG)
  if source.scheduler_config is not None:
    shutil.copyfile(source.scheduler_config, folder / SCHEDULER_CONFIG)
  (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _write_atomically(dst: Path, write: Callable[[Path], None]) -> None:
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
