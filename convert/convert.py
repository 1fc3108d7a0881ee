"""diffusers UNet folder → dfjax checkpoint folder (the layout of `convert/format.py`).

The source's tensors are mapped onto the param tree of the UNet its config describes
(`models.build`), checked, optionally cast, and written atomically with a manifest recording every
source file's sha256 and size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from convert import keymap
from convert.format import (CONFIG, FORMAT, MANIFEST, PARAMS_DIR, SCHEDULER_CONFIG, as_float_dtype,
                            check_weights, is_checkpoint, manifest_header, read_unet_config,
                            write_atomically)
from convert.safetensors_io import SourceFiles, find_source, read_tensors
from models.build import unet_param_shapes

log = logging.getLogger(__name__)


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
  source = find_source(src, variant)
  config = read_unet_config(source.config)
  tensors = read_tensors(source)
  check_weights(tensors, f"source weights in {source.unet_dir}")
  params = keymap.convert_state_dict(tensors, unet_param_shapes(config))
  if store_dtype is not None:
    params = {path: array.astype(store_dtype) for path, array in params.items()}
    check_weights({keymap.path_str(p): a for p, a in params.items()}, f"weights cast to {dtype}")
  manifest = _manifest(source, params)
  write_atomically(dst, lambda tmp: _write_checkpoint(tmp, source, params, manifest))
  log.info("converted %s (%d params, %s) into %s", src, len(params), manifest["dtype"], dst)
  return dst


# ---------------------------------------------------------------------------------- checks

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


# ---------------------------------------------------------------------------------- writing

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
