"""diffusers' `DiTTransformer2DModel` and `PixArtTransformer2DModel` in Flax NNX, NHWC.

Called like the UNet: `model(x_bhwc, timesteps, *, ctx=None, class_labels=…)` (DiT) or
`model(x_bhwc, timesteps, *, ctx=None, encoder_hidden_states=…, encoder_attention_mask=…,
resolution=…, aspect_ratio=…)` (PixArt). The latent's rows may be this device's share of the image:
the patch embedding needs no other rows (stride = patch size), the positional embedding asks
`ctx.token_extent` which token rows these are, and self-attention asks `ctx.attend` (tokens are
row-major, so a row patch is a contiguous block of tokens). Cross-attention to the text is local.

The forward is a fold over named segments ("embed", "transformer_blocks.i", "out") over an explicit
`DiTCarry`, as the UNet's (models/unet.py), and each segment says what it costs.

Shape letters: B batch, H/h latent rows (image/this device), W columns, C latent channels, r token
rows here, Q token columns, T = r·Q tokens, D width, S text tokens, E text width, p patch size.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from models.dit_blocks import (AdaLayerNormSingle, CombinedTimestepLabelEmbeddings, DiTBlock, PatchEmbed,
                               PixArtAlphaTextProjection, PixArtBlock)
from models.dit_config import DiTConfig, PixArtConfig, TransformerConfig
from models.layers import (CONV_OUT, EMBED, EMBED_INNER, MODULATION, Cost, Dtype, LayerNorm, Linear, Workload,
                           assign_ctx_keys, param, param_key)
from models.parallel import SINGLE_DEVICE, ParallelContext
from models.unet import Segment

__all__ = ["DiTConfig", "PixArtConfig", "DiTTransformer2DModel", "PixArtTransformer2DModel", "DiTCarry"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DiTCarry:
  """What one segment hands the next (arrays only, so that a pipeline can send it to another device).

  Attributes:
    h: the input latent (B, h, W, C) before "embed"; the token grid (B, r, Q, D) between; the output
      (B, h, W, out_channels) after "out".
    cond_bd: DiT: the timestep + class embedding every block and the final layer modulate with;
      PixArt: the embedded timestep the final layer reads. None before "embed".
    modulation_bm: PixArt: adaLN-single's (B, 6D) every block adds to its table; None for DiT.
    context_bse: PixArt: the (projected) text states; None for DiT.
    context_mask_bs: PixArt: the text keep-mask, or None.
    embedding_inputs: what "embed" embeds: "timesteps" (B,) and "class_labels" or "resolution" and
      "aspect_ratio"; "embed" empties it.
  """

  h: jax.Array
  cond_bd: jax.Array | None
  modulation_bm: jax.Array | None
  context_bse: jax.Array | None
  context_mask_bs: jax.Array | None
  embedding_inputs: dict[str, jax.Array]


def _tokens(latent: Workload, p: int) -> Workload:
  """The token grid of a latent `latent.rows` × `latent.cols`."""
  return dataclasses.replace(latent, rows=latent.rows // p, cols=latent.cols // p)


def _run_block(block, block_inputs, carry: DiTCarry, ctx: ParallelContext) -> DiTCarry:
  b, r, q, d = carry.h.shape
  x_btd = block(carry.h.reshape(b, r * q, d), *block_inputs(carry), ctx=ctx)  # B, T, D (row-major)
  return dataclasses.replace(carry, h=x_btd.reshape(b, r, q, d))


class _PatchTransformer(nnx.Module):
  """What DiT and PixArt share: `pos_embed`, `transformer_blocks`, `norm_out` and the unpatchify."""

  block_class: type

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.config = config
    self.dtype = dtype
    self.pos_embed = PatchEmbed(config, **kw)
    self.transformer_blocks = nnx.List([self.block_class(config, **kw) for _ in range(config.num_layers)])
    self.norm_out = LayerNorm(config.inner_dim, epsilon=1e-6, elementwise_affine=False, **kw)

  def segments(self) -> tuple[Segment, ...]:
    """The ordered cut points: "embed" (patch + positional embedding, the conditioning embeddings),
    "transformer_blocks.i", "out" (final modulation, projection, unpatchify)."""
    p = self.config.patch_size
    return (Segment("embed", self._embed, self._embed_cost),
            *(Segment(f"transformer_blocks.{i}", functools.partial(_run_block, block, self._block_inputs),
                      lambda latent, block=block: block.cost(_tokens(latent, p)))
              for i, block in enumerate(self.transformer_blocks)),
            Segment("out", self._out, self._out_cost))

  def _fold(self, carry: DiTCarry, ctx: ParallelContext | None) -> jax.Array:
    ctx = SINGLE_DEVICE if ctx is None else ctx
    for segment in self.segments():
      carry = segment(carry, ctx=ctx)
    return carry.h  # B, h, W, out_channels

  def _unpatchify(self, x_brqd: jax.Array) -> jax.Array:
    """(B, r, Q, p·p·C) → (B, r·p, Q·p, C), diffusers' "nhwpqc" patch layout."""
    b, r, q, _ = x_brqd.shape
    p, c = self.config.patch_size, self.config.out_channels
    x_brpqpc = x_brqd.reshape(b, r, q, p, p, c).transpose(0, 1, 3, 2, 4, 5)  # B, r, p, Q, p, C
    return x_brpqpc.reshape(b, r * p, q * p, c)  # B, h, W, C

  def _first_carry(self, x, timesteps, **inputs) -> DiTCarry:
    b = x.shape[0]
    t_b = jnp.broadcast_to(jnp.reshape(jnp.asarray(timesteps), (-1,)), (b,))  # B
    given = {name: jnp.asarray(v) for name, v in inputs.items() if v is not None}
    return DiTCarry(x.astype(self.dtype), None, None, None, None, {"timesteps": t_b, **given})


class DiTTransformer2DModel(_PatchTransformer):
  """diffusers' `DiTTransformer2DModel`: class-conditional, adaLN-Zero blocks, NHWC.

  Shape letters as in the module docstring.
  """

  block_class = DiTBlock

  def __init__(self, config: DiTConfig, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    super().__init__(config, **kw)
    dim = config.inner_dim
    self.emb = CombinedTimestepLabelEmbeddings(config.num_embeds_ada_norm, dim, **kw)
    self.proj_out_1 = Linear(dim, 2 * dim, axes=(EMBED, EMBED_INNER), **kw)
    self.proj_out_2 = Linear(dim, config.patch_size ** 2 * config.out_channels, axes=(EMBED, CONV_OUT), **kw)
    assign_ctx_keys(self)

  def __call__(self, x: jax.Array, timesteps: jax.Array | float | int, *, class_labels: jax.Array,
               ctx: ParallelContext | None = None) -> jax.Array:
    """The noise (and learned variance) of the latent `x`: `segments()` folded over `first_carry(...)`.

    Args:
      x: (B, h, W, C) noisy latent, NHWC (this device's rows under a row-split context).
      timesteps: scalar or (B,).
      class_labels: (B,) class ids; `config.null_class` for the unconditional embedding.
      ctx: the parallel context; None means one device holds the whole image.
    Returns:
      (B, h, W, out_channels) in `dtype`.
    """
    return self._fold(self.first_carry(x, timesteps, class_labels=class_labels), ctx)

  def first_carry(self, x, timesteps, *, class_labels) -> DiTCarry:
    """The carry "embed" starts from: the inputs of `__call__`, checked and broadcast."""
    _check_latent(self.config, x, timesteps)
    if class_labels is None or jnp.ndim(class_labels) != 1 or jnp.shape(class_labels)[0] != x.shape[0]:
      raise ValueError(f"this DiT is class-conditional: pass class_labels of shape ({x.shape[0]},) (ids; "
                       f"{self.config.null_class} is the unconditional class), got shape {jnp.shape(class_labels)}")
    return self._first_carry(x, timesteps, class_labels=class_labels)

  @staticmethod
  def _block_inputs(carry: DiTCarry) -> tuple:
    return (carry.cond_bd,)

  def _embed(self, carry: DiTCarry, ctx: ParallelContext) -> DiTCarry:
    inputs = carry.embedding_inputs
    cond_bd = self.emb(inputs["timesteps"], inputs["class_labels"])  # B, D
    return DiTCarry(self.pos_embed(carry.h, ctx=ctx), cond_bd, None, None, None, {})

  def _embed_cost(self, latent: Workload) -> Cost:
    return self.pos_embed.cost(latent) + self.emb.cost()

  def _out(self, carry: DiTCarry, ctx: ParallelContext) -> DiTCarry:
    del ctx
    shift_bd, scale_bd = jnp.split(self.proj_out_1(nnx.silu(carry.cond_bd)), 2, axis=-1)  # B, D each
    h_brqd = self.norm_out(carry.h) * (1 + scale_bd[:, None, None]) + shift_bd[:, None, None]  # B, r, Q, D
    return dataclasses.replace(carry, h=self._unpatchify(self.proj_out_2(h_brqd)))  # B, h, W, C_out

  def _out_cost(self, latent: Workload) -> Cost:
    return self.proj_out_1.cost(1) + self.proj_out_2.cost(_tokens(latent, self.config.patch_size).tokens)


class PixArtTransformer2DModel(_PatchTransformer):
  """diffusers' `PixArtTransformer2DModel` (PixArt-α, -Σ): adaLN-single, cross-attention to text, NHWC."""

  block_class = PixArtBlock

  def __init__(self, config: PixArtConfig, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    super().__init__(config, **kw)
    dim = config.inner_dim
    table = jax.random.normal(param_key(rngs), (2, dim), jnp.float32) / dim ** 0.5
    self.scale_shift_table = param(table.astype(param_dtype), (MODULATION, EMBED))
    self.proj_out = Linear(dim, config.patch_size ** 2 * config.out_channels, axes=(EMBED, CONV_OUT), **kw)
    self.adaln_single = AdaLayerNormSingle(config, **kw)
    self.caption_projection = (None if config.caption_channels is None else
                               PixArtAlphaTextProjection(config.caption_channels, dim, **kw))
    assign_ctx_keys(self)

  def __call__(self, x: jax.Array, timesteps: jax.Array | float | int, *, encoder_hidden_states: jax.Array,
               encoder_attention_mask: jax.Array | None = None, resolution: jax.Array | None = None,
               aspect_ratio: jax.Array | None = None, ctx: ParallelContext | None = None) -> jax.Array:
    """The noise (and learned variance) of the latent `x`.

    Args:
      x: (B, h, W, C) noisy latent, NHWC (this device's rows under a row-split context).
      timesteps: scalar or (B,).
      encoder_hidden_states: (B, S, E) text states, E = config.encoder_dim.
      encoder_attention_mask: (B, S), 1 keeps a text token, 0 drops it; None keeps every token.
      resolution, aspect_ratio: (B, 2) image (height, width) in pixels and (B, 1) height / width,
        for configs with `use_additional_conditions`.
      ctx: the parallel context; None means one device holds the whole image.
    Returns:
      (B, h, W, out_channels) in `dtype`.
    """
    carry = self.first_carry(x, timesteps, encoder_hidden_states=encoder_hidden_states,
                             encoder_attention_mask=encoder_attention_mask, resolution=resolution,
                             aspect_ratio=aspect_ratio)
    return self._fold(carry, ctx)

  def first_carry(self, x, timesteps, *, encoder_hidden_states, encoder_attention_mask=None, resolution=None,
                  aspect_ratio=None) -> DiTCarry:
    """The carry "embed" starts from: the inputs of `__call__`, checked and broadcast."""
    cfg = self.config
    _check_latent(cfg, x, timesteps)
    b = x.shape[0]
    if encoder_hidden_states is None or jnp.ndim(encoder_hidden_states) != 3 \
        or encoder_hidden_states.shape[0] != b or encoder_hidden_states.shape[-1] != cfg.encoder_dim:
      raise ValueError(f"encoder_hidden_states must have shape ({b}, S, {cfg.encoder_dim}), got "
                       f"{jnp.shape(encoder_hidden_states)}")
    tokens = encoder_hidden_states.shape[1]
    if encoder_attention_mask is not None and jnp.shape(encoder_attention_mask) != (b, tokens):
      raise ValueError(f"encoder_attention_mask must have shape ({b}, {tokens}) (1 keeps a text token), got "
                       f"{jnp.shape(encoder_attention_mask)}")
    if cfg.use_additional_conditions:
      if resolution is None or aspect_ratio is None or jnp.shape(resolution) != (b, 2) \
          or jnp.size(aspect_ratio) != b:
        raise ValueError(f"this PixArt (use_additional_conditions) needs resolution ({b}, 2) (image height, "
                         f"width in pixels) and aspect_ratio ({b}, 1) (height / width), got shapes "
                         f"{jnp.shape(resolution)} and {jnp.shape(aspect_ratio)}")
    else:
      resolution = aspect_ratio = None  # embedded only by configs that have the embedders
    carry = self._first_carry(x, timesteps, resolution=resolution, aspect_ratio=aspect_ratio)
    mask = None if encoder_attention_mask is None else jnp.asarray(encoder_attention_mask)
    return dataclasses.replace(carry, context_bse=jnp.asarray(encoder_hidden_states).astype(self.dtype),
                               context_mask_bs=mask)

  @staticmethod
  def _block_inputs(carry: DiTCarry) -> tuple:
    return carry.modulation_bm, carry.context_bse, carry.context_mask_bs

  def _embed(self, carry: DiTCarry, ctx: ParallelContext) -> DiTCarry:
    inputs = carry.embedding_inputs
    modulation_bm, emb_bd = self.adaln_single(inputs["timesteps"], inputs.get("resolution"),
                                              inputs.get("aspect_ratio"))  # B, 6D and B, D
    context_bse = carry.context_bse
    if self.caption_projection is not None:
      context_bse = self.caption_projection(context_bse)  # B, S, D
    return DiTCarry(self.pos_embed(carry.h, ctx=ctx), emb_bd, modulation_bm, context_bse, carry.context_mask_bs, {})

  def _embed_cost(self, latent: Workload) -> Cost:
    caption = Cost() if self.caption_projection is None else self.caption_projection.cost(latent.text_tokens)
    return self.pos_embed.cost(latent) + self.adaln_single.cost() + caption

  def _out(self, carry: DiTCarry, ctx: ParallelContext) -> DiTCarry:
    del ctx
    mods_b2d = self.scale_shift_table[...][None] + carry.cond_bd[:, None]  # B, 2, D
    shift_b11d, scale_b11d = mods_b2d[:, None, 0:1], mods_b2d[:, None, 1:2]  # B, 1, 1, D each
    h_brqd = self.norm_out(carry.h) * (1 + scale_b11d) + shift_b11d  # B, r, Q, D
    return dataclasses.replace(carry, h=self._unpatchify(self.proj_out(h_brqd)))  # B, h, W, C_out

  def _out_cost(self, latent: Workload) -> Cost:
    return self.proj_out.cost(_tokens(latent, self.config.patch_size).tokens)


def _check_latent(cfg: TransformerConfig, x, timesteps) -> None:
  """Raises a ValueError naming the problem and the fix."""
  if jnp.ndim(x) != 4:
    raise ValueError(f"x must be an NHWC latent (B, H, W, C) of rank 4, got shape {jnp.shape(x)}")
  b, h, w, c = x.shape
  if c != cfg.in_channels:
    hint = " It looks NCHW: transpose with x.transpose(0, 2, 3, 1)." if h == cfg.in_channels else ""
    raise ValueError(f"x has {c} channels (last axis of shape {x.shape}) but the {cfg.kind} takes "
                     f"in_channels={cfg.in_channels}.{hint}")
  cfg.check_latent_size(h, w)
  t_shape = jnp.shape(timesteps)
  if len(t_shape) > 1 or (len(t_shape) == 1 and t_shape[0] not in (1, b)):
    raise ValueError(f"timesteps must be a scalar or have shape ({b},) for batch {b}, got shape {t_shape}")
