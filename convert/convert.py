"""diffusers UNet folder → dfjax checkpoint folder (the layout of `convert/format.py`).

The source's tensors are mapped onto the param tree of the UNet its config describes
(`models.build`), checked, optionally cast, and written atomically (`convert.atomic`) with a
manifest recording the sha256 and size of every source file and of every file written.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from convert import keymap
from convert.atomic import prepare_destination, write_atomically
from convert.format import (CONFIG, PARAMS_DIR, SCHEDULER_CONFIG, as_float_dtype, check_weights,
                            manifest_header, read_unet_config, sha256_file, write_manifest)
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
    overwrite: replace an existing dfjax checkpoint at `dst` (atomically; a symlink's target).
  Returns:
    `dst` as a Path.
  Raises:
    FileExistsError: `dst` exists and `overwrite` is False, or it is not a dfjax checkpoint.
    FileNotFoundError: `dst` is a symlink to nothing.
    ValueError: `dst` is or holds `src`; unreadable source, weights that do not fit the config,
      non-float or non-finite weights.
    OSError: the operating system refused a write (disk full…), in one line.
    Nothing is written in any of these cases, nor when SIGINT/SIGTERM stop the write.
  """
  src, dst = Path(src), Path(dst)
  src_abs, dst_abs = src.resolve(), dst.resolve()
  if dst_abs == src_abs or dst_abs in src_abs.parents:
    raise ValueError(f"destination {dst} is (or holds) the source {src}; choose another folder")
  target = prepare_destination(dst, overwrite)
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
  write_atomically(target, lambda tmp: _write_checkpoint(tmp, source, params, manifest),
                   size_bytes=sum(a.nbytes for a in params.values()))
  log.info("converted %s (%d params, %s) into %s", src, len(params), manifest["dtype"], dst)
  return dst


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
  return {"path": os.path.relpath(path, root), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


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
  write_manifest(folder, manifest, hashed=(PARAMS_DIR, CONFIG, SCHEDULER_CONFIG))
