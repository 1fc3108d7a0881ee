"""`DiTConfig` and `PixArtConfig`: the diffusion-transformer hyper-parameters dfjax supports.

Built from a diffusers `config.json` of `DiTTransformer2DModel` / `PixArtTransformer2DModel`, or of
the older `Transformer2DModel` that hub checkpoints of both still name (its extra keys are accepted
with the values these two models use). Strict as `UNetConfig`: unknown keys and unsupported values
raise a ValueError naming them. Both give `dfjax.sample` and the strategies the interface the UNet's
config does: `conditioning_fields`, `row_granularity` (the patch size), `valid_row_splits`,
`check_latent_size`, `noise_prediction` (the learned-variance split).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax

from models.attention import FEED_FORWARD_ACTIVATIONS
from models.config import check_config_keys, row_split_problems, valid_row_splits

# Keys with no effect on the inference forward (dropout), or that diffusers ignores for patch input.
_INERT = frozenset({"dropout", "norm_num_groups", "use_linear_projection"})


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """What DiT and PixArt share: a patch embedding, `num_layers` blocks of `num_attention_heads` ×
  `attention_head_dim`, a final layer back to `out_channels` per latent pixel. Field names are
  diffusers' config keys."""

  num_attention_heads: int = 16
  attention_head_dim: int = 72
  in_channels: int = 4
  out_channels: int | None = None
  num_layers: int = 28
  sample_size: int = 32
  patch_size: int = 2
  activation_fn: str = "gelu-approximate"
  num_embeds_ada_norm: int = 1000
  attention_bias: bool = True
  upcast_attention: bool = False
  norm_elementwise_affine: bool = False
  norm_eps: float = 1e-5
  interpolation_scale: float | None = None

  kind: ClassVar[str] = ""
  norm_type: ClassVar[str] = ""
  # diffusers keys whose value must be one of these (Transformer2DModel keys included).
  _only_supported: ClassVar[Mapping[str, tuple[Any, ...]]] = {
      "num_vector_embeds": (None,), "only_cross_attention": (False,), "double_self_attention": (False,),
      "attention_type": ("default",)}

  @classmethod
  def from_diffusers_config(cls, d: Mapping[str, Any]):
    """The config of a diffusers `config.json` dict; keys starting with `_` are ignored.

    Raises:
      ValueError: a key dfjax does not know, or a value of a feature it does not implement.
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    check_config_keys(d, cls.kind, fields | _INERT, {"norm_type": (cls.norm_type,), **cls._only_supported})
    return cls(**{k: v for k, v in d.items() if k in fields})

  def __post_init__(self):
    if self.out_channels is None:
      object.__setattr__(self, "out_channels", self.in_channels)
    if self.out_channels not in (self.in_channels, 2 * self.in_channels):
      raise ValueError(f"{self.kind} out_channels={self.out_channels} must be in_channels={self.in_channels} "
                       f"(noise only) or {2 * self.in_channels} (noise and learned variance)")
    if not isinstance(self.patch_size, int) or self.patch_size < 1:
      raise ValueError(f"{self.kind} patch_size={self.patch_size!r} must be a positive int")
    if not isinstance(self.sample_size, int) or self.sample_size % self.patch_size:
      raise ValueError(f"{self.kind} sample_size={self.sample_size!r} must be an int divisible by "
                       f"patch_size={self.patch_size}")
    if self.inner_dim % 4:
      raise ValueError(f"{self.kind} width num_attention_heads × attention_head_dim = {self.inner_dim} must be "
                       "divisible by 4 (the 2-D sin-cos positional embedding: a sin and a cos half per axis)")
    if self.activation_fn not in FEED_FORWARD_ACTIVATIONS:
      raise ValueError(f"{self.kind} config activation_fn={self.activation_fn!r} is not supported by dfjax; "
                       f"supported values: {', '.join(map(repr, FEED_FORWARD_ACTIVATIONS))}")

  # ------------------------------------------------------------------------------ derived values

  @property
  def inner_dim(self) -> int:
    """Token width: heads × head width."""
    return self.num_attention_heads * self.attention_head_dim

  @property
  def base_size(self) -> int:
    """Token rows of the training resolution: the positional embedding's unit of length."""
    return self.sample_size // self.patch_size

  @property
  def pos_interpolation_scale(self) -> float:
    """diffusers' positional `interpolation_scale` (PatchEmbed's default when the config has none)."""
    return 1.0 if self.interpolation_scale is None else float(self.interpolation_scale)

  @property
  def predicts_variance(self) -> bool:
    """The output holds the noise and then a learned variance, in_channels each (DiT's learned sigma)."""
    return self.out_channels == 2 * self.in_channels

  def noise_prediction(self, out_bhwc: jax.Array) -> jax.Array:
    """The channels of the model output a scheduler steps with: the noise, without a learned variance
    (diffusers' DiT and PixArt pipelines drop it before guidance and the scheduler step)."""
    return out_bhwc[..., :self.in_channels] if self.predicts_variance else out_bhwc

  @property
  def row_granularity(self) -> int:
    """Latent rows a row patch must be a multiple of: one token row."""
    return self.patch_size

  def valid_row_splits(self, height: int) -> list[int]:
    """Row-patch counts that split `height` latent rows into whole token rows."""
    return valid_row_splits(height, self.row_granularity)

  def check_latent_size(self, height: int, width: int, row_splits: int = 1) -> None:
    """Checks that a latent of `height` × `width` splits into `row_splits` patches of whole tokens.

    Raises:
      ValueError: naming the sizes and the nearest valid choices.
    """
    f = self.patch_size
    problems = row_split_problems(height, width, row_splits, f)
    if problems:
      raise ValueError(f"latent size {height}×{width} does not fit this {self.kind} (patch size {f}: every "
                       f"patch's rows and columns must divide by {f}): " + "; ".join(problems))


@dataclasses.dataclass(frozen=True)
class DiTConfig(TransformerConfig):
  """diffusers' `DiTTransformer2DModel` (class-conditional DiT: adaLN-Zero blocks, no text)."""

  kind: ClassVar[str] = "DiT"
  norm_type: ClassVar[str] = "ada_norm_zero"
  _only_supported: ClassVar[Mapping[str, tuple[Any, ...]]] = {
      **TransformerConfig._only_supported, "cross_attention_dim": (None,), "caption_channels": (None,),
      "use_additional_conditions": (None, False)}

  @property
  def null_class(self) -> int:
    """The class id of the unconditional embedding (the label-dropout row): num_embeds_ada_norm."""
    return self.num_embeds_ada_norm

  @property
  def conditioning_fields(self) -> tuple[str, ...]:
    return ("class_labels",)


@dataclasses.dataclass(frozen=True)
class PixArtConfig(TransformerConfig):
  """diffusers' `PixArtTransformer2DModel` (PixArt-α and -Σ: adaLN-single, cross-attention to T5 states)."""

  out_channels: int | None = 8
  sample_size: int = 128
  norm_eps: float = 1e-6
  cross_attention_dim: int = 1152
  caption_channels: int | None = None
  use_additional_conditions: bool | None = None

  kind: ClassVar[str] = "PixArt"
  norm_type: ClassVar[str] = "ada_norm_single"

  def __post_init__(self):
    super().__post_init__()
    if self.use_additional_conditions is None:  # diffusers' rule: the 1024² α checkpoints have them
      object.__setattr__(self, "use_additional_conditions", self.sample_size == 128)
    if self.use_additional_conditions and self.inner_dim % 3:
      raise ValueError(f"PixArt use_additional_conditions needs a width divisible by 3 (resolution and "
                       f"aspect-ratio embeddings of width/3), got {self.inner_dim}")
    if self.caption_channels is not None and self.cross_attention_dim != self.inner_dim:
      raise ValueError(f"PixArt caption_projection writes {self.inner_dim}-wide text states, but "
                       f"cross_attention_dim={self.cross_attention_dim}: they must be equal")

  @property
  def pos_interpolation_scale(self) -> float:
    if self.interpolation_scale is None:
      return float(max(self.sample_size // 64, 1))
    return float(self.interpolation_scale)

  @property
  def encoder_dim(self) -> int:
    """Last dim of encoder_hidden_states: the caption (T5) width, or cross_attention_dim without projection."""
    return self.cross_attention_dim if self.caption_channels is None else self.caption_channels

  @property
  def conditioning_fields(self) -> tuple[str, ...]:
    """Needed fields; `encoder_attention_mask` is optional (no mask: every text token kept)."""
    extra = ("resolution", "aspect_ratio") if self.use_additional_conditions else ()
    return ("encoder_hidden_states", *extra)
