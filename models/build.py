"""Abstract models: what the converter, the loader and the analytic accounting all build.

`nnx.eval_shape` builds the model without initialising a weight, so the param tree (paths and
shapes) of any config, SDXL included, costs no memory: the converter maps diffusers tensors onto
it, the loader restores a checkpoint into it, and `segment_costs` reads its layout (the FLOPs and
parallel-context requests of each segment), the one description of the model's structure.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from flax import nnx

from models.config import UNetConfig
from models.dit import DiTTransformer2DModel, PixArtTransformer2DModel
from models.dit_config import DiTConfig, PixArtConfig
from models.layers import Cost, Workload
from models.unet import UNet2DConditionModel
from models.vae import AutoencoderKL
from models.vae_config import VAEConfig

_MODEL_CLASSES = {UNetConfig: UNet2DConditionModel, DiTConfig: DiTTransformer2DModel,
                  PixArtConfig: PixArtTransformer2DModel, VAEConfig: AutoencoderKL}

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


def abstract_model(config, *, dtype: Any = None, param_dtype: Any = None) -> nnx.Module:
  """The model of a UNetConfig, DiTConfig, PixArtConfig or VAEConfig, built with `nnx.eval_shape` (abstract params)."""
  if type(config) not in _MODEL_CLASSES:
    raise ValueError(f"no model for a {type(config).__name__}; model configs: "
                     f"{', '.join(c.__name__ for c in _MODEL_CLASSES)}")
  kwargs = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v is not None}
  return nnx.eval_shape(lambda: _MODEL_CLASSES[type(config)](config, rngs=nnx.Rngs(0), **kwargs))


def abstract_unet(config: Mapping, *, dtype: Any = None, param_dtype: Any = None) -> UNet2DConditionModel:
  """The UNet of a diffusers config, built with `nnx.eval_shape` (abstract params, no init)."""
  return abstract_model(UNetConfig.from_diffusers_config(dict(config)), dtype=dtype, param_dtype=param_dtype)


@functools.lru_cache(maxsize=8)
def _layout(config) -> nnx.Module:
  """The abstract model of `config`, built once per config: read-only."""
  return abstract_model(config)


def segment_costs(config, latent: Workload) -> dict[str, Cost]:
  """{segment name: its cost per sample}, in call order, for an input of `latent.rows` × `latent.cols`.

  Read off the model `config` builds (abstractly, once per config), so the counts follow its layout.
  """
  return {segment.name: segment.cost(latent) for segment in _layout(config).segments()}


def segment_names(config) -> tuple[str, ...]:
  """The model's segment names, in call order (where pipeline methods may cut it)."""
  return tuple(segment.name for segment in _layout(config).segments())


def unet_param_shapes(config: Mapping) -> dict[ParamPath, Shape]:
  """Param path → shape of the UNet a diffusers config describes."""
  params = nnx.state(abstract_unet(config), nnx.Param)
  return {p: tuple(v.shape) for p, v in nnx.to_flat_state(params)}
