"""The model families dfjax converts and loads: one table entry each (config reader, keymap, builder).

A diffusers `config.json` names its class (`_class_name`); `family_of` finds the family that builds
it. Hub checkpoints of DiT and PixArt still say `Transformer2DModel`, the class diffusers split them
out of: its `norm_type` tells them apart, as diffusers' own remapping does (`ada_norm_zero` → DiT,
`ada_norm_single` → PixArt). A family:

  resolve_config(config, source keys) → (config, notes)   fills what the config leaves to the weights
  config_class.from_diffusers_config(config)              the strict dfjax config (UNetConfig, DiTConfig…)
  abstract_model(model config)                            the model without weights: its param paths/shapes
  convert_state_dict(tensors, param shapes) → (params, notes)   the strict keymap

The notes say what conversion decided or merged; the manifest records them. A whole pipeline's VAE
and text encoders are entries of the same table: a transformers `config.json` names its class under
`architectures` (`CLIPTextModel`, `CLIPTextModelWithProjection`, `T5EncoderModel`) and its config is
read with `from_transformers_config`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from convert import keymap
from convert.clip_keymap import convert_clip_state_dict
from convert.dit_keymap import convert_transformer_state_dict
from convert.format import read_json
from convert.t5_keymap import convert_t5_state_dict
from convert.vae_keymap import convert_vae_state_dict
from models.build import ParamPath, Shape, abstract_model
from models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from models.config import UNetConfig
from models.dit_config import DiTConfig, PixArtConfig
from models.t5 import T5Config, T5EncoderModel
from models.vae_config import VAEConfig

Notes = list[str]


@dataclasses.dataclass(frozen=True)
class Family:
  """One model family: how its diffusers config and weights become a dfjax model.

  Attributes:
    model_class: the diffusers (or transformers) class it ports (the manifest's "model").
    component: its diffusers pipeline component name ("unet", "transformer", "text_encoder").
    config_class: the strict dfjax config, built with `from_diffusers_config` (transformers models:
      `from_transformers_config`).
    resolve_config: (diffusers config, source tensor keys) → (config with what the weights decide, notes).
    convert_state_dict: (diffusers tensors, target param shapes) → (dfjax params, notes).
    abstract_model: model config → the model built abstractly (`nnx.eval_shape`), no weights.
  """

  model_class: str
  component: str
  config_class: type
  resolve_config: Callable[[dict, Collection[str]], tuple[dict, Notes]]
  convert_state_dict: Callable[[Mapping[str, np.ndarray], Mapping[ParamPath, Shape]],
                               tuple[dict[ParamPath, np.ndarray], Notes]]
  abstract_model: Callable[..., nnx.Module] = abstract_model

  def model_config(self, config: Mapping[str, Any], origin: str):
    """The dfjax config of the diffusers `config`, with `origin` (a file) named in its errors."""
    read = getattr(self.config_class, "from_diffusers_config", None) or self.config_class.from_transformers_config
    try:
      return read(dict(config))
    except (ValueError, TypeError) as e:
      raise ValueError(f"{origin}: {e}") from e

  def param_shapes(self, model_config) -> dict[ParamPath, Shape]:
    """Param path → shape of the model `model_config` describes."""
    params = nnx.state(self.abstract_model(model_config), nnx.Param)
    return {p: tuple(v.shape) for p, v in nnx.to_flat_state(params)}


def _as_given(config: dict, keys: Collection[str]) -> tuple[dict, Notes]:
  del keys
  return config, []


def _pixart_additional_conditions(config: dict, keys: Collection[str]) -> tuple[dict, Notes]:
  """`use_additional_conditions` from the weights when the config leaves it out (PixArt-Σ's do).

  diffusers would guess it from `sample_size` (True at 128, the 1024² α models), which is wrong for
  Σ at 1024²; the weights say it: α's resolution and aspect-ratio embedders exist only with it.
  """
  if config.get("use_additional_conditions") is not None:
    return config, []
  present = any(k.startswith(_RESOLUTION_EMBEDDER) for k in keys)
  note = (f"use_additional_conditions: not in the config; set to {present} because the weights "
          f"{'hold' if present else 'have no'} {_RESOLUTION_EMBEDDER}*")
  return {**config, "use_additional_conditions": present}, [note]


_RESOLUTION_EMBEDDER = "adaln_single.emb.resolution_embedder."


def _unet_state_dict(source, target_shapes) -> tuple[dict[ParamPath, np.ndarray], Notes]:
  return keymap.convert_state_dict(source, target_shapes), []


UNET = Family("UNet2DConditionModel", "unet", UNetConfig, _as_given, _unet_state_dict)
DIT = Family("DiTTransformer2DModel", "transformer", DiTConfig, _as_given, convert_transformer_state_dict)
PIXART = Family("PixArtTransformer2DModel", "transformer", PixArtConfig, _pixart_additional_conditions,
                convert_transformer_state_dict)


def _abstract(model_type: type) -> Callable[..., nnx.Module]:
  """The abstract builder of a model class taking (config, *, rngs, dtype, param_dtype)."""
  def build(config, *, dtype: Any = None, param_dtype: Any = None) -> nnx.Module:
    kwargs = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v is not None}
    return nnx.eval_shape(lambda: model_type(config, rngs=nnx.Rngs(0), **kwargs))
  return build


CLIP_TEXT = Family("CLIPTextModel", "text_encoder", CLIPTextConfig, _as_given, convert_clip_state_dict,
                   _abstract(CLIPTextModel))
CLIP_TEXT_PROJECTION = Family("CLIPTextModelWithProjection", "text_encoder_2", CLIPTextConfig, _as_given,
                              convert_clip_state_dict, _abstract(CLIPTextModelWithProjection))
T5_ENCODER = Family("T5EncoderModel", "text_encoder", T5Config, _as_given, convert_t5_state_dict,
                    _abstract(T5EncoderModel))
VAE = Family("AutoencoderKL", "vae", VAEConfig, _as_given, convert_vae_state_dict)
FAMILIES = {f.model_class: f for f in (UNET, DIT, PIXART, VAE, CLIP_TEXT, CLIP_TEXT_PROJECTION, T5_ENCODER)}
TRANSFORMER_2D_BY_NORM = {"ada_norm_zero": DIT, "ada_norm_single": PIXART}
"""diffusers' remapping of hub `Transformer2DModel` configs with patch input, by `norm_type`."""


def family_of(config: Mapping[str, Any], origin: str) -> tuple[Family, Notes]:
  """The family that builds the diffusers `config` (read from `origin`), and a note when a hub
  `Transformer2DModel` config was mapped by its norm_type. A transformers config names its class under
  `architectures`; a config with neither is a UNet's (dfjax's own exports before it recorded the class).

  Raises:
    ValueError: a class dfjax does not build, or a Transformer2DModel norm_type it does not map.
  """
  architectures = config.get("architectures") or []
  name = config.get("_class_name") or (architectures[0] if len(architectures) == 1 else UNET.model_class)
  if name in FAMILIES:
    return FAMILIES[name], []
  if name == "Transformer2DModel":
    norm_type = config.get("norm_type", "layer_norm")
    if norm_type not in TRANSFORMER_2D_BY_NORM:
      mapped = ", ".join(f"{n!r} → {f.model_class}" for n, f in TRANSFORMER_2D_BY_NORM.items())
      raise ValueError(f"{origin} describes a Transformer2DModel with norm_type={norm_type!r}, which dfjax does "
                       f"not map to a model it builds ({mapped}); a 'layer_norm' Transformer2DModel is a UNet's "
                       "attention block, not a whole denoiser: convert the UNet it belongs to")
    family = TRANSFORMER_2D_BY_NORM[norm_type]
    return family, [f"config class Transformer2DModel with norm_type {norm_type!r}: converted as "
                    f"{family.model_class}"]
  raise ValueError(f"{origin} describes a {name}, which dfjax does not build; it converts "
                   f"{', '.join(FAMILIES)} and Transformer2DModel configs with norm_type "
                   f"{' or '.join(map(repr, TRANSFORMER_2D_BY_NORM))}")


def read_model_config(file: Path):
  """(family, dfjax model config) of a stored `config.json` — what `dfjax.load_model` builds.

  Raises:
    ValueError: naming the file, when it is not a config of a model dfjax builds.
  """
  config = read_json(file)
  family, _ = family_of(config, str(file))
  return family, family.model_config(config, str(file))
