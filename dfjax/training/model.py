"""The class-conditional models that `dfjax train` trains: configs, variants and the joint modules.

Two families, one training loop (dfjax/training/loop.py):
  * a UNet: the ordinary diffusers-style `models.unet.UNet2DConditionModel` plus a
    `models.class_tokens.ClassTokens` table that turns class ids into its `encoder_hidden_states`;
  * a DiT: diffusers' `DiTTransformer2DModel` (models/dit.py), which embeds class ids itself.
`VARIANTS` names the models `dfjax train --model` offers: `default` is the shipped UNet, `dit` the
shipped DiT, `dit8` it at twice the depth (grown from a trained `dit`), `tiny`, `dit-tiny` and
`dit-tiny2` seconds-fast ones for tests.

Shape letters: B batch, H rows, W columns, C image channels, T class tokens, D token width.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dfjax.training.captions import FROZEN_TEXT, CaptionEncoder, Captions
from models.class_tokens import ClassTokens
from models.config import UNetConfig
from models.dit_config import DiTConfig

# Stable Diffusion's "scaled_linear" betas over 1000 steps; sampled with DDIM by default
# ("trailing" spacing reaches the noisiest timestep). No x0 clipping: diffusers' DDIM clips the
# predicted x0 but keeps the model's ε, so the step's x(t−1) loses what the clip cut from the early,
# noisy x0 predictions, and the samples came out grey and textured (the ε-trained UNet: 70 % class
# accuracy with the clip, 90 % without, on the same 20 seeds).
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
    "clip_sample": False,
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


def _dit_config(width: int, heads: int, layers: int, *, patch: int, num_classes: int) -> dict[str, Any]:
  """A diffusers DiTTransformer2DModel config for 64×64 RGB images (pixel space, noise only: no learned
  variance, whose training needs the variational bound)."""
  return {
      "_class_name": "DiTTransformer2DModel",
      "in_channels": 3,
      "out_channels": 3,
      "sample_size": 64,
      "patch_size": patch,
      "num_attention_heads": heads,
      "attention_head_dim": width // heads,
      "num_layers": layers,
      "num_embeds_ada_norm": num_classes,  # the class-embedding table; id num_classes is the null class
      "activation_fn": "gelu-approximate",
      "norm_type": "ada_norm_zero",
      "norm_elementwise_affine": False,
      "norm_eps": 1e-5,
  }


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What to build: a class-conditional denoiser of one model family (`UNetSpec`, `DiTSpec`).

  Attributes:
    fast_compile: compile the init and train step without backend optimisation (quick to
      compile, slow to run: for models trained for a few steps, as in tests). Results differ
      in the last bits from the optimised programs', so this is part of the variant.
    prediction_type: what the denoiser predicts (diffusers' `prediction_type`).
  """

  fast_compile: bool = dataclasses.field(default=False, kw_only=True)
  prediction_type: str = dataclasses.field(default="epsilon", kw_only=True)

  @property
  def scheduler_config(self) -> dict[str, Any]:
    """The noise schedule and prediction target it is trained with (a diffusers scheduler config)."""
    return {**SCHEDULER_CONFIG, "prediction_type": self.prediction_type}

  @property
  def denoiser_config(self) -> dict[str, Any]:
    """The denoiser's diffusers `config.json` contents."""
    raise NotImplementedError

  @property
  def num_classes(self) -> int:
    """Real classes (the null class is one more id)."""
    raise NotImplementedError

  def build(self, *, rngs: nnx.Rngs) -> nnx.Module:
    """The trainable module: `module(x_bhwc, timesteps_b, labels_b)` → prediction, with attributes
    `denoiser` (what is exported and sampled) and `class_tokens` (a ClassTokens, or None)."""
    raise NotImplementedError

  def to_json(self) -> dict[str, Any]:
    raise NotImplementedError

  # -- what pipelined training (dfjax/training/pipeline_*.py) asks of a family

  @property
  def family(self) -> str:
    """The family's name in messages: "UNet", "DiT"."""
    raise NotImplementedError

  @property
  def model_config(self) -> UNetConfig | DiTConfig:
    """The denoiser's config, which names its segments and gives their costs (models/build.py)."""
    raise NotImplementedError

  @property
  def context_tokens(self) -> int:
    """Tokens the denoiser's cross-attention reads per sample (the cost model's `text_tokens`)."""
    raise NotImplementedError

  @property
  def class_token_shape(self) -> tuple[int, int] | None:
    """(T, D) of the frozen class-token table that conditions the denoiser; None where the denoiser
    embeds the labels itself (then the condition is the labels)."""
    raise NotImplementedError

  def condition_shape(self, batch: int) -> jax.ShapeDtypeStruct:
    """What conditions `batch` samples: class tokens (b, T, D) or labels (b,)."""
    shape = self.class_token_shape
    if shape is None:
      return jax.ShapeDtypeStruct((batch,), jnp.int32)
    return jax.ShapeDtypeStruct((batch, *shape), jnp.float32)

  def condition_inputs(self, condition: jax.Array) -> dict[str, jax.Array]:
    """The denoiser's keyword arguments carrying the condition."""
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class UNetSpec(ModelSpec):
  """A UNet2DConditionModel and the class-token table that feeds its cross-attention.

  Attributes:
    unet_config: diffusers `config.json` contents of the UNet (its cross_attention_dim is the
      token width).
    classes: real classes (the null class is one more id).
    num_tokens: context tokens per class.
    frozen_text: "none" (learned class tokens), or a `FROZEN_TEXT` encoder of the class captions in their
      place (dfjax/training/captions.py; num_tokens is then the captions' length): `with_frozen_text`.
  """

  unet_config: dict[str, Any]
  classes: int
  num_tokens: int = 4
  frozen_text: str = dataclasses.field(default="none", kw_only=True)

  def __post_init__(self):
    config = UNetConfig.from_diffusers_config(self.unet_config)  # raises on a bad config
    if config.class_embedding_kind is not None or config.addition_embed_type is not None:
      raise ValueError("the class goes in through the class tokens: the UNet config must have no "
                       f"class embedding ({config.class_embedding_kind}) or addition embedding "
                       f"({config.addition_embed_type})")
    if self.frozen_text != "none" and self.frozen_text not in FROZEN_TEXT:
      raise ValueError(f"unknown frozen text encoder {self.frozen_text!r}; valid: none, {', '.join(FROZEN_TEXT)}")

  def with_frozen_text(self, text: str) -> UNetSpec:
    """This UNet conditioned by frozen text encoder `text` on the class captions instead of learned tokens."""
    from dfjax import data

    return dataclasses.replace(self, frozen_text=text, num_tokens=Captions(data.class_names).tokens)

  @property
  def denoiser_config(self) -> dict[str, Any]:
    return self.unet_config

  @property
  def num_classes(self) -> int:
    return self.classes

  @property
  def token_dim(self) -> int:
    return self.model_config.encoder_dim

  def build(self, *, rngs: nnx.Rngs) -> nnx.Module:
    return ClassConditionalUNet(self, rngs=rngs)

  def to_json(self) -> dict[str, Any]:
    frozen = {} if self.frozen_text == "none" else {"frozen_text": self.frozen_text}
    return {"unet_config": copy.deepcopy(self.unet_config), "num_classes": self.classes,
            "num_tokens": self.num_tokens, **frozen}

  family = "UNet"

  @property
  def model_config(self) -> UNetConfig:
    return UNetConfig.from_diffusers_config(self.unet_config)

  @property
  def context_tokens(self) -> int:
    return self.num_tokens

  @property
  def class_token_shape(self) -> tuple[int, int]:
    return (self.num_tokens, self.token_dim)

  def condition_inputs(self, condition: jax.Array) -> dict[str, jax.Array]:
    return {"encoder_hidden_states": condition}


@dataclasses.dataclass(frozen=True)
class DiTSpec(ModelSpec):
  """A class-conditional DiTTransformer2DModel: it embeds the class ids itself (no class tokens).

  Attributes:
    dit_config: diffusers `config.json` contents of the DiT; `num_embeds_ada_norm` is the class count.
  """

  dit_config: dict[str, Any]
  # The clean image, not the noise: at high noise levels ε ≈ the input, and a token narrower than
  # its patch's pixel values (128 < 8·8·3) cannot carry that i.i.d. noise through (the ε loss of
  # such a DiT stalls near 0.37); the clean image of a patch is smooth and fits. With 4×4 patches
  # (48 < 128) v prediction trains too, but the shipped spec so trained (2,000 steps, same flags)
  # drew worse: 54 % class accuracy, Fréchet 128, against 65 % and 76 with the clean image.
  prediction_type: str = dataclasses.field(default="sample", kw_only=True)

  def __post_init__(self):
    DiTConfig.from_diffusers_config(self.dit_config)  # raises on a bad config

  @property
  def denoiser_config(self) -> dict[str, Any]:
    return self.dit_config

  @property
  def num_classes(self) -> int:
    return self.model_config.num_embeds_ada_norm

  def build(self, *, rngs: nnx.Rngs) -> nnx.Module:
    return ClassConditionalDiT(self, rngs=rngs)

  def to_json(self) -> dict[str, Any]:
    return {"dit_config": copy.deepcopy(self.dit_config)}

  family = "DiT"
  context_tokens = 1  # no cross-attention: the cost model's minimum
  class_token_shape = None  # it embeds the labels in its trainable "embed" segment

  @property
  def model_config(self) -> DiTConfig:
    return DiTConfig.from_diffusers_config(self.dit_config)

  def condition_inputs(self, condition: jax.Array) -> dict[str, jax.Array]:
    return {"class_labels": condition}


def _variants() -> dict[str, ModelSpec]:
  from dfjax import data

  attn, plain = "CrossAttnDownBlock2D", "DownBlock2D"
  return {
      # 4 levels (64, 32, 16, 8 rows): 8 row patches keep 1 row each at the lowest level.
      # Self- and cross-attention at 16×16 and 8×8 (and the mid block). The 64×64 and 32×32
      # levels are narrow (8, 16 channels): per-pixel work there dominates a CPU training step.
      # v, not ε: the first sampling steps start from pure noise, where x0 = (x − σ·ε̂)/sqrt(ᾱ)
      # magnifies the ε error 14× (sqrt(ᾱ) ≈ 0.07), and the ε-trained model drew textures, not
      # shapes; x0 = sqrt(ᾱ)·x − σ·v̂ does not magnify it.
      "default": UNetSpec(_unet_config((8, 16, 32, 64), (plain, plain, attn, attn), (1, 1, 1, 2),
                                       groups=4, token_dim=64), data.num_classes, 4,
                          prediction_type="v_prediction"),
      # Seconds to compile and run: the tests' model.
      "tiny": UNetSpec(_unet_config((8, 16), (plain, plain), (1, 1), groups=4, token_dim=16),
                       data.num_classes, 2, fast_compile=True),
      # 4×4-pixel patches: 16×16 = 256 tokens, 16 token rows (row patches of 2, 4 or 8 devices); 8
      # heads, so that ulysses splits them over 2, 4 or 8 devices. A 128-wide token draws 48 pixel
      # values (with 8×8 patches it drew 192, and the DiT reached 30 % class accuracy).
      "dit": DiTSpec(_dit_config(128, 8, 4, patch=4, num_classes=data.num_classes)),
      # `dit` at twice the depth, so that PipeFusion cuts it into 8 stages: trained `--grow-from` a
      # trained `dit` folder (dfjax/training/grow.py), whose blocks it starts from.
      "dit8": DiTSpec(_dit_config(128, 8, 8, patch=4, num_classes=data.num_classes)),
      "dit-tiny": DiTSpec(_dit_config(32, 8, 1, patch=8, num_classes=data.num_classes), fast_compile=True),
      # `dit-tiny` at twice the depth: the tests' model grown from it.
      "dit-tiny2": DiTSpec(_dit_config(32, 8, 2, patch=8, num_classes=data.num_classes), fast_compile=True),
  }


VARIANTS: dict[str, ModelSpec] = _variants()


def run_spec(model: str, frozen_text: str = "none") -> ModelSpec:
  """Variant `model` as a run trains it: with `frozen_text` ("none": learned class tokens), its UNet
  conditioned by that frozen text encoder's outputs of the class captions.

  Raises:
    ValueError: an unknown variant, or frozen text for a DiT (it embeds its labels itself).
  """
  if model not in VARIANTS:
    raise ValueError(f"unknown model {model!r}; valid: {', '.join(VARIANTS)}")
  spec = VARIANTS[model]
  if frozen_text == "none":
    return spec
  if not isinstance(spec, UNetSpec):
    unets = [name for name, variant in VARIANTS.items() if isinstance(variant, UNetSpec)]
    raise ValueError(f"--frozen-text {frozen_text}: the {model!r} {spec.family} embeds its class labels itself and "
                     f"reads no text; a frozen text encoder conditions the UNet variants: {', '.join(unets)}")
  return spec.with_frozen_text(frozen_text)


class ClassConditionalUNet(nnx.Module):
  """The trained pair: `unet` (diffusers' UNet2DConditionModel) and `class_tokens`: a learned
  ClassTokens table, or with `spec.frozen_text` the frozen text encoder of the class captions
  (a CaptionEncoder: no params, so the UNet alone trains)."""

  def __init__(self, spec: UNetSpec, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32):
    from models.unet import UNet2DConditionModel

    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.unet = UNet2DConditionModel(UNetConfig.from_diffusers_config(spec.unet_config), **kw)
    if spec.frozen_text == "none":
      self.class_tokens = ClassTokens(spec.num_classes, spec.num_tokens, spec.token_dim, **kw)
    else:
      from dfjax import data

      self.class_tokens = CaptionEncoder(data.class_names, spec.token_dim, spec.frozen_text)

  @property
  def denoiser(self) -> nnx.Module:
    return self.unet

  def __call__(self, x_bhwc: jax.Array, timesteps_b: jax.Array, labels_b: jax.Array) -> jax.Array:
    """Predicted noise ε (B, H, W, C) of noisy images at `timesteps_b` for class ids `labels_b`."""
    tokens_btd = self.class_tokens(labels_b)  # B, T, D
    return self.unet(x_bhwc, timesteps_b, tokens_btd)  # B, H, W, C


class ClassConditionalDiT(nnx.Module):
  """A DiT trained from scratch with the DiT paper's adaLN-Zero initialisation: every block's
  modulation and the final layer start at zero, so each block starts as the identity and the
  prediction as 0 (diffusers' own init, meant for loading weights, leaves them random)."""

  class_tokens = None  # the DiT embeds the class ids itself

  def __init__(self, spec: DiTSpec, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32):
    from models.dit import DiTTransformer2DModel

    self.dit = DiTTransformer2DModel(DiTConfig.from_diffusers_config(spec.dit_config), rngs=rngs, dtype=dtype,
                                     param_dtype=param_dtype)
    zeroed = [block.norm1.linear for block in self.dit.transformer_blocks]
    for linear in (*zeroed, self.dit.proj_out_1, self.dit.proj_out_2):
      for weight in (linear.kernel, linear.bias):
        weight.set_value(jnp.zeros_like(weight.get_value()))

  @property
  def denoiser(self) -> nnx.Module:
    return self.dit

  def __call__(self, x_bhwc: jax.Array, timesteps_b: jax.Array, labels_b: jax.Array) -> jax.Array:
    """Predicted noise ε (B, H, W, C) of noisy images at `timesteps_b` for class ids `labels_b`."""
    return self.dit(x_bhwc, timesteps_b, class_labels=labels_b)  # B, H, W, C
