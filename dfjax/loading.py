"""A converted dfjax checkpoint → a ready-to-run NNX model: UNet, DiT or PixArt, as its config says.

The model is built abstractly (`nnx.eval_shape`, no random init), its params are restored by
orbax straight into arrays of the asked dtype and sharding, and the stored config is checked
against the stored weights before anything is read. Unless `verify=False`, every file read is
first checked against the sha256 its manifest recorded, and the restored params must be finite.
The checkpoint folder layout is described in `convert/format.py`; `dfjax convert SRC DST` writes it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert.families import read_model_config
from convert.format import (CONFIG, MANIFEST, PARAMS_DIR, SCHEDULER_CONFIG, as_float_dtype, changed_files,
                            read_json, read_manifest)
from convert.keymap import path_str
from convert.source import DENOISERS, MODEL_INDEX
from models.build import ParamPath, Shape

log = logging.getLogger(__name__)
_RECONVERT = "re-run dfjax convert (or dfjax train --export) to write it again"


def load_model(path: str | os.PathLike, *, dtype: Any = None, param_dtype: Any = None,
               sharding: jax.sharding.Sharding | None = None, verify: bool = True, component: str | None = None):
  """Loads a dfjax checkpoint as the model its config.json describes (with `model.config`).

  A UNet2DConditionModel config gives a `models.unet.UNet2DConditionModel`, a DiTTransformer2DModel
  one a `models.dit.DiTTransformer2DModel`, a PixArtTransformer2DModel one a
  `models.dit.PixArtTransformer2DModel` (hub `Transformer2DModel` configs by their norm_type); a
  pipeline's other components are the text encoders of models/clip.py and models/t5.py and the VAE.

  Args:
    path: a folder written by `dfjax convert` / `convert.convert_checkpoint`.
    component: the pipeline component to load ("vae", "text_encoder"…, as the manifest's
      "components" name them); None: the denoiser, at the checkpoint's root.
    dtype: computation dtype of the model (None: the model's default); "bf16", "fp16"… as for
      `param_dtype`.
    param_dtype: dtype the params are restored in (None: as stored, when all share one dtype).
    sharding: placed on every param (e.g. `NamedSharding(mesh, P())` to replicate); None puts
      them on the default device.
    verify: check params/ and config.json against the manifest's sha256s and the params for
      NaN/inf (a checkpoint written before dfjax recorded hashes loads with a warning).
  Raises:
    ValueError: `path` is not a dfjax checkpoint (e.g. a diffusers folder), it holds no such
      `component`, a file of it is missing, unreadable, damaged or edited, a param is not finite, its
      config.json is not one of a model dfjax builds or does not describe its stored weights, or a
      dtype is not a float dtype.
  """
  path = Path(path)
  manifest = _checked_manifest(path)
  dtype = None if dtype is None else as_float_dtype(dtype, "dtype")
  param_dtype = None if param_dtype is None else as_float_dtype(param_dtype, "param_dtype")
  relative = "" if component is None else component_folder(path, manifest, component)
  entries = (os.path.join(relative, PARAMS_DIR), os.path.join(relative, CONFIG))
  changed = verify_files(path, manifest, entries) if verify else []
  path = path / relative
  family, config = read_model_config(path / CONFIG)
  stored = _stored_params(path / PARAMS_DIR)
  param_dtype = _param_dtype(param_dtype, stored)
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  targets = {p: jax.ShapeDtypeStruct(shape, param_dtype, sharding=_checked(sharding, p, shape))
             for p, (shape, _) in stored.items()}
  model = family.abstract_model(config, dtype=dtype, param_dtype=param_dtype)
  graphdef, abstract_params, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise NotImplementedError(f"the model holds non-Param state, which checkpoints do not store: "
                              f"{[path_str(p) for p, _ in nnx.to_flat_state(rest)]}")
  expected = {p: tuple(v.shape) for p, v in nnx.to_flat_state(abstract_params)}
  _check_config_matches(expected, {p: s for p, (s, _) in stored.items()}, path)
  if changed:  # only config.json: its shapes still fit, but it is not the config written
    raise ValueError(f"{path / CONFIG} changed since the checkpoint was written (its sha256 differs "
                     f"from {MANIFEST}'s); restore it, or {_RECONVERT}")

  from flax.traverse_util import unflatten_dict
  restored = restore_params(path / PARAMS_DIR, unflatten_dict(targets), check_finite=verify)
  nnx.replace_by_pure_dict(abstract_params, restored)
  return nnx.merge(graphdef, abstract_params, rest)


def component_folder(path: Path, manifest: Mapping[str, Any], component: str) -> str:
  """Where the checkpoint `path` holds `component`, relative to it ("" for the denoiser at its root)."""
  records = manifest.get("components") or {}
  if component not in records:
    held = ", ".join(records) or "only its denoiser (written before dfjax recorded components)"
    raise ValueError(f"{path} holds no {component} (it holds {held}); convert the whole diffusers pipeline "
                     f"folder (`dfjax convert PIPELINE {path} --overwrite`) to include it")
  folder = records[component].get("folder", ".")
  return "" if folder in (".", "") else folder


def load_scheduler_config(path: str | os.PathLike) -> dict | None:
  """The scheduler config the checkpoint was converted with, or None when it had none."""
  path = Path(path)
  _checked_manifest(path)
  file = path / SCHEDULER_CONFIG
  return read_json(file) if file.is_file() else None


def verify_files(folder: Path, manifest: Mapping[str, Any], entries: Iterable[str]) -> list[str]:
  """Checks the files under `entries` against the sha256s the manifest recorded.

  Returns:
    [its path] when a config.json alone changed (the caller first explains how it no longer fits the
    weights, if it does not), else [].
  Raises:
    ValueError: a recorded file is missing, or another one changed; names the checkpoint and files.
  """
  problems = changed_files(folder, manifest, entries)
  if problems is None:
    log.warning("%s records no file hashes (written before dfjax recorded them), so it cannot be "
                "verified; %s to add them", folder, _RECONVERT)
    return []
  missing = [p for p in problems if p.endswith(": missing")]
  if missing:
    raise ValueError(f"checkpoint params are unreadable or incomplete: {folder} lacks "
                     + ", ".join(m.removesuffix(": missing") for m in missing) + f"; {_RECONVERT}")
  names = [p.split(":")[0] for p in problems]
  if len(names) == 1 and Path(names[0]).name == CONFIG:
    return names
  if problems:
    raise ValueError(f"checkpoint {folder} is damaged, its files differ from what was written ("
                     + "; ".join(problems) + f"); {_RECONVERT}, or pass verify=False to load it anyway")
  return []


def restore_params(directory: Path, target: Any, *, check_finite: bool) -> Any:
  """Restores the orbax tree in `directory` as `target` (ShapeDtypeStructs) describes.

  Raises:
    ValueError: the files cannot be read (one line, naming `directory`), or, with
      `check_finite`, a restored param holds NaN or inf (naming it).
  """
  import orbax.checkpoint as ocp
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      restored = checkpointer.restore(directory.absolute(), target)
  except Exception as e:  # orbax/TensorStore raise ValueError, KeyError, OSError… with long dumps
    raise _unreadable(directory, f"{type(e).__name__}: {e}") from e
  if check_finite:
    _check_finite(restored, directory, target)
  return restored


# ---------------------------------------------------------------------------------- checks

def _checked_manifest(path: Path) -> dict:
  """The manifest of the checkpoint `path`, or a ValueError saying what `path` is instead."""
  manifest = read_manifest(path)  # raises when manifest.json is not valid JSON
  if manifest is not None and (path / PARAMS_DIR).is_dir() and (path / CONFIG).is_file():
    return manifest
  if manifest is not None:
    raise ValueError(f"checkpoint params are unreadable or incomplete: {path} lacks "
                     f"{PARAMS_DIR if not (path / PARAMS_DIR).is_dir() else CONFIG}; {_RECONVERT}")
  if not path.exists():
    raise ValueError(f"{path} does not exist")
  diffusers_marks = (MODEL_INDEX, *DENOISERS, "diffusion_pytorch_model.safetensors",
                     "diffusion_pytorch_model.safetensors.index.json")
  if any((path / m).exists() for m in diffusers_marks) or any(path.glob("*.safetensors")):
    raise ValueError(f"{path} is a diffusers folder, not a dfjax checkpoint; convert it first: "
                     f"`dfjax convert {path} DST`, then load DST")
  raise ValueError(f"{path} is not a dfjax checkpoint (expected {MANIFEST}, {CONFIG} and "
                   f"{PARAMS_DIR}/ written by `dfjax convert SRC DST`)")


def _stored_params(params_dir: Path) -> dict[ParamPath, tuple[Shape, jnp.dtype]]:
  """Param path → (shape, dtype) as stored, from orbax's metadata (reads no array)."""
  import orbax.checkpoint as ocp
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      metadata = checkpointer.metadata(params_dir.absolute())
  except Exception as e:  # orbax/TensorStore raise many kinds, with long dumps
    raise _unreadable(params_dir, f"{type(e).__name__}: {e}") from e
  tree = getattr(getattr(metadata, "item_metadata", None), "tree", None)
  if tree is None:  # orbax answers None for a missing or garbled _METADATA
    raise _unreadable(params_dir, "no readable orbax metadata (_METADATA)")
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(_key_part(k) for k in keys): (tuple(m.shape), m.dtype) for keys, m in flat}


def _unreadable(directory: Path, reason: str) -> ValueError:
  """The one-line error for params orbax cannot read; `reason` is cut to its first line."""
  reason = (reason.strip().splitlines() or [""])[0].split(" See full TensorStore details")[0][:300]
  return ValueError(f"checkpoint params are unreadable or incomplete: {directory} ({reason}); {_RECONVERT}")


def _check_finite(restored: Any, directory: Path, target: Any) -> None:
  """Every restored param is finite, else a ValueError naming the params and the dtype.

  Reads each distinct shard once on the host (no compilation; zero-copy on CPU).
  """
  bad = []
  for keys, array in jax.tree_util.tree_flatten_with_path(restored)[0]:
    count = 0
    for shard in array.addressable_shards:
      if shard.replica_id == 0:
        values = np.asarray(shard.data).astype(np.float32, copy=False)  # numpy has no bf16 isfinite
        count += values.size - int(np.isfinite(values).sum())
    if count:
      bad.append(f"{'.'.join(str(_key_part(k)) for k in keys)} ({count} values)")
  if bad:
    dtypes = sorted({str(t.dtype) for t in jax.tree.leaves(target)})
    raise ValueError(f"{directory}: {len(bad)} params hold NaN or inf when restored as "
                     f"{'/'.join(dtypes)}: " + ", ".join(sorted(bad))
                     + f"; the checkpoint is damaged (or param_dtype too narrow for it); {_RECONVERT}")


def _param_dtype(asked: jnp.dtype | None, stored: Mapping[ParamPath, tuple[Shape, Any]]) -> jnp.dtype:
  """The dtype to restore params in: the asked one, else the stored one (if all agree)."""
  if asked is not None:
    return asked
  dtypes = {jnp.dtype(dt) for _, dt in stored.values()}
  if len(dtypes) != 1:
    raise ValueError(f"the stored params have several dtypes {sorted(map(str, dtypes))}; pass "
                     "param_dtype= to choose one")
  return dtypes.pop()


def _key_part(key) -> str | int:
  """A jax tree path entry → an nnx path part (orbax stores list indices as '0', '1'…)."""
  name = key.key if hasattr(key, "key") else key.idx
  return int(name) if isinstance(name, str) and name.isdigit() else name


def _check_config_matches(expected: Mapping[ParamPath, Shape], stored: Mapping[ParamPath, Shape],
                          ckpt: Path) -> None:
  """The model config.json builds has exactly the stored params, with the stored shapes."""
  problems = [f"  {path_str(p)}: not stored" for p in expected if p not in stored]
  problems += [f"  {path_str(p)}: stored, but not in the model" for p in stored
               if p not in expected]
  problems += [f"  {path_str(p)}: stored {stored[p]}, model expects {s}"
               for p, s in expected.items() if p in stored and tuple(stored[p]) != tuple(s)]
  if problems:
    raise ValueError(f"{ckpt / CONFIG} does not match the weights in {ckpt / PARAMS_DIR} "
                     f"({len(problems)} params differ; was config.json edited after conversion?):\n"
                     + "\n".join(sorted(problems)))


def _checked(sharding: jax.sharding.Sharding, path: ParamPath, shape: Shape) -> jax.sharding.Sharding:
  """`sharding`, after checking it can lay out a param of `shape` (names the param if not)."""
  try:
    sharding.shard_shape(shape)
  except Exception as e:  # jax raises ValueError/TypeError/IndexError depending on the spec
    raise ValueError(f"sharding {sharding} cannot hold param {path_str(path)} of shape {shape}: "
                     f"{e}") from e
  return sharding
