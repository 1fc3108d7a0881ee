"""The class-conditional UNet that `dfjax train` trains: configs, variants and the joint module.

A trained model is the ordinary diffusers-style `models.unet.UNet2DConditionModel` plus a
`models.class_tokens.ClassTokens` table that turns class ids into its `encoder_hidden_states`.
`VARIANTS` names the model sizes `dfjax train --model` offers: `default` is the shipped model,
`tiny` a seconds-fast one for tests.

Shape letters: B batch, H rows, W columns, C image channels, T class tokens, D token width.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models.class_tokens import ClassTokens
from models.config import UNetConfig

# Stable Diffusion's "scaled_linear" betas over 1000 steps, epsilon prediction; sampled with DDIM
# by default ("trailing" spacing reaches the noisiest timestep, x0 clipped to the data range).
# Not DDPM's linear 1e-4…0.02: its last timesteps keep sqrt(ᾱ) ≈ 0.006 of the image, so x0 =
# (x − σ·ε̂)/sqrt(ᾱ) magnifies the ε error of a briefly trained model 160× in the first sampling
# steps (pure noise out); scaled_linear ends at sqrt(ᾱ) ≈ 0.07.
SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "trailing",
    "steps_offset": 0,
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
}


def _unet_config(block_out_channels, down_block_types, heads, *, groups: int, token_dim: int,
                 layers_per_block: int = 1) -> dict[str, Any]:
  """A diffusers UNet2DConditionModel config for 64×64 RGB images (pixel space)."""
  up = {"DownBlock2D": "UpBlock2D", "CrossAttnDownBlock2D": "CrossAttnUpBlock2D"}
  return {
      "_class_name": "UNet2DConditionModel",
      "in_channels": 3,
      "out_channels": 3,
      "sample_size": 64,
      "block_out_channels": list(block_out_channels),
      "down_block_types": list(down_block_types),
      "up_block_types": [up[kind] for kind in reversed(down_block_types)],
      "layers_per_block": layers_per_block,
      "attention_head_dim": list(heads),  # diffusers' name for the head count (see models.config)
      "cross_attention_dim": token_dim,
      "norm_num_groups": groups,
      "norm_eps": 1e-5,
      "use_linear_projection": True,
      "flip_sin_to_cos": True,
      "freq_shift": 0,
      "act_fn": "silu",
  }


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What to build: the UNet's diffusers config and the class-token table's size.

  Attributes:
    unet_config: diffusers `config.json` contents of the UNet (its cross_attention_dim is the
      token width).
    num_classes: real classes (the null class is one more id).
    num_tokens: context tokens per class.
    fast_compile: compile the init and train step without backend optimisation (quick to
      compile, slow to run: for models trained for a few steps, as in tests). Results differ
      in the last bits from the optimised programs', so this is part of the variant.
  """

  unet_config: dict[str, Any]
  num_classes: int
  num_tokens: int = 4
  fast_compile: bool = False

  def __post_init__(self):
    config = UNetConfig.from_diffusers_config(self.unet_config)  # raises on a bad config
    if config.class_embedding_kind is not None or config.addition_embed_type is not None:
      raise ValueError("the class goes in through the class tokens: the UNet config must have no "
                       f"class embedding ({config.class_embedding_kind}) or addition embedding "
                       f"({config.addition_embed_type})")

  @property
  def token_dim(self) -> int:
    return UNetConfig.from_diffusers_config(self.unet_config).encoder_dim

  def to_json(self) -> dict[str, Any]:
    return {"unet_config": copy.deepcopy(self.unet_config), "num_classes": self.num_classes,
            "num_tokens": self.num_tokens}


def _variants() -> dict[str, ModelSpec]:
  from dfjax import data

  attn, plain = "CrossAttnDownBlock2D", "DownBlock2D"
  return {
      # 4 levels (64, 32, 16, 8 rows): 8 row patches keep 1 row each at the lowest level.
      # Self- and cross-attention at 16×16 and 8×8 (and the mid block). The 64×64 and 32×32
      # levels are narrow (8, 16 channels): per-pixel work there dominates a CPU training step.
      "default": ModelSpec(_unet_config((8, 16, 32, 64), (plain, plain, attn, attn), (1, 1, 1, 2),
                                        groups=4, token_dim=64), data.num_classes, 4),
      # Seconds to compile and run: the tests' model.
      "tiny": ModelSpec(_unet_config((8, 16), (plain, plain), (1, 1), groups=4, token_dim=16),
                        data.num_classes, 2, fast_compile=True),
  }


VARIANTS: dict[str, ModelSpec] = _variants()


class ClassConditionalUNet(nnx.Module):
  """The trained pair: `unet` (diffusers' UNet2DConditionModel) and `class_tokens`."""

  def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32):
    from models.unet import UNet2DConditionModel

    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.unet = UNet2DConditionModel(UNetConfig.from_diffusers_config(spec.unet_config), **kw)
    self.class_tokens = ClassTokens(spec.num_classes, spec.num_tokens, spec.token_dim, **kw)

  def __call__(self, x_bhwc: jax.Array, timesteps_b: jax.Array, labels_b: jax.Array) -> jax.Array:
    """Predicted noise ε (B, H, W, C) of noisy images at `timesteps_b` for class ids `labels_b`."""
    tokens_btd = self.class_tokens(labels_b)  # B, T, D
    return self.unet(x_bhwc, timesteps_b, tokens_btd)  # B, H, W, C
