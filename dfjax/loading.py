"""A converted dfjax checkpoint → a ready-to-run NNX UNet.

The model is built abstractly (`nnx.eval_shape`, no random init), its params are restored by
orbax straight into arrays of the asked dtype and sharding, and the stored config is checked
against the stored weights before anything is read. The checkpoint folder layout is described in
`convert/format.py`; `dfjax convert SRC DST` writes it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from convert.format import (CONFIG, MANIFEST, PARAMS_DIR, SCHEDULER_CONFIG, as_float_dtype, is_checkpoint,
                            read_json, read_unet_config)
from convert.keymap import path_str
from models.build import ParamPath, Shape, abstract_unet


def load_model(path: str | os.PathLike, *, dtype: Any = None, param_dtype: Any = None,
               sharding: jax.sharding.Sharding | None = None):
  """Loads a dfjax checkpoint as a `models.unet.UNet2DConditionModel` (with `model.config`).

  Args:
    path: a folder written by `dfjax convert` / `convert.convert_checkpoint`.
    dtype: computation dtype of the model (None: the model's default).
    param_dtype: dtype the params are restored in (None: as stored, when all share one dtype).
    sharding: placed on every param (e.g. `NamedSharding(mesh, P())` to replicate); None puts
      them on the default device.
  Raises:
    ValueError: `path` is not a dfjax checkpoint (e.g. a diffusers folder), or its config.json
      does not describe its stored weights.
  """
  path = Path(path)
  _check_is_checkpoint(path)
  config = read_unet_config(path / CONFIG)
  stored = _stored_params(path / PARAMS_DIR)
  param_dtype = _param_dtype(param_dtype, stored)
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  targets = {p: jax.ShapeDtypeStruct(shape, param_dtype, sharding=_checked(sharding, p, shape))
             for p, (shape, _) in stored.items()}
  model = abstract_unet(config, dtype=dtype, param_dtype=param_dtype)
  graphdef, abstract_params, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise NotImplementedError(f"the model holds non-Param state, which checkpoints do not store: "
                              f"{[path_str(p) for p, _ in nnx.to_flat_state(rest)]}")
  expected = {p: tuple(v.shape) for p, v in nnx.to_flat_state(abstract_params)}
  _check_config_matches(expected, {p: s for p, (s, _) in stored.items()}, path)

  import orbax.checkpoint as ocp
  from flax.traverse_util import unflatten_dict
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore((path / PARAMS_DIR).absolute(),
                                    unflatten_dict(targets))
  nnx.replace_by_pure_dict(abstract_params, restored)
  return nnx.merge(graphdef, abstract_params, rest)


def load_scheduler_config(path: str | os.PathLike) -> dict | None:
  """The scheduler config the checkpoint was converted with, or None when it had none."""
  path = Path(path)
  _check_is_checkpoint(path)
  file = path / SCHEDULER_CONFIG
  return read_json(file) if file.is_file() else None


# ---------------------------------------------------------------------------------- checks

def _check_is_checkpoint(path: Path) -> None:
  if is_checkpoint(path) and (path / PARAMS_DIR).is_dir() and (path / CONFIG).is_file():
    return
  if not path.exists():
    raise ValueError(f"{path} does not exist")
  diffusers_marks = ("model_index.json", "unet", "diffusion_pytorch_model.safetensors",
                     "diffusion_pytorch_model.safetensors.index.json")
  if any((path / m).exists() for m in diffusers_marks) or any(path.glob("*.safetensors")):
    raise ValueError(f"{path} is a diffusers folder, not a dfjax checkpoint; convert it first: "
                     f"`dfjax convert {path} DST`, then load DST")
  raise ValueError(f"{path} is not a dfjax checkpoint (expected {MANIFEST}, {CONFIG} and "
                   f"{PARAMS_DIR}/ written by `dfjax convert SRC DST`)")


def _stored_params(params_dir: Path) -> dict[ParamPath, tuple[Shape, jnp.dtype]]:
  """Param path → (shape, dtype) as stored, from orbax's metadata (reads no array)."""
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as checkpointer:
    tree = checkpointer.metadata(params_dir.absolute()).item_metadata.tree
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(_key_part(k) for k in keys): (tuple(m.shape), m.dtype) for keys, m in flat}


def _param_dtype(asked: Any, stored: Mapping[ParamPath, tuple[Shape, Any]]) -> jnp.dtype:
  """The dtype to restore params in: the asked one, else the stored one (if all agree)."""
  if asked is not None:
    return as_float_dtype(asked)
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
