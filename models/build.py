"""Abstract models from a diffusers config: what the converter and the loader both build.

`nnx.eval_shape` builds the model without initialising a weight, so the param tree (paths and
shapes) of any config, SDXL included, costs no memory: the converter maps diffusers tensors onto
it and the loader restores a checkpoint into it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import nnx

from models.config import UNetConfig
from models.unet import UNet2DConditionModel

ParamPath = tuple[str | int, ...]
"""A param path as `nnx.state` flattens it: attribute names, ints for list indices."""
Shape = tuple[int, ...]


def check_unet_config(config: Mapping, origin: str) -> None:
  """Raises a ValueError naming `origin` when `config` is not a UNet2DConditionModel config dfjax builds."""
  name = config.get("_class_name", "UNet2DConditionModel")
  if name != "UNet2DConditionModel":
    raise ValueError(f"{origin} describes a {name}, not a UNet: dfjax builds UNet2DConditionModel only")
  try:
    UNetConfig.from_diffusers_config(dict(config))
  except (ValueError, TypeError) as e:
    raise ValueError(f"{origin}: {e}") from e


def abstract_unet(config: Mapping, *, dtype: Any = None, param_dtype: Any = None) -> UNet2DConditionModel:
  """The UNet of a diffusers config, built with `nnx.eval_shape` (abstract params, no init)."""
  unet_config = UNetConfig.from_diffusers_config(dict(config))
  kwargs = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v is not None}
  return nnx.eval_shape(lambda: UNet2DConditionModel(unet_config, rngs=nnx.Rngs(0), **kwargs))


def unet_param_shapes(config: Mapping) -> dict[ParamPath, Shape]:
  """Param path → shape of the UNet a diffusers config describes."""
  params = nnx.state(abstract_unet(config), nnx.Param)
  return {p: tuple(v.shape) for p, v in nnx.to_flat_state(params)}
