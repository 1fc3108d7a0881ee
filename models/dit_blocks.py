"""The layers of diffusers' DiT and PixArt transformers in Flax NNX: patch embedding with the 2-D sin-cos
positional embedding, the conditioning embeddings, and the two transformer blocks (adaLN-Zero, adaLN-single).

Attribute names mirror diffusers' modules (see convert/dit_keymap.py for the few renames).
Self-attention asks the parallel context (`ctx.attend`); the positional embedding is computed for
the token rows this device holds (`ctx.token_extent`), never for the whole image.

Shape letters: B batch, H/h latent rows (image/this device), W columns, C latent channels,
R/r token rows (image/this device), Q token columns, T = r·Q tokens, D width, S text tokens,
E text width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.attention import Attention, FeedForward
from models.dit_config import PixArtConfig, TransformerConfig
from models.layers import (CONV_IN, EMBED, EMBED_INNER, MODULATION, Conv2d, Cost, Dtype, Embed, LayerNorm, Linear,
                           TimestepEmbedding, Workload, param, param_key, timestep_embedding)
from models.parallel import SINGLE_DEVICE, ParallelContext

_TIME_PROJ = 256  # diffusers' `Timesteps(num_channels=256)` in every DiT/PixArt embedder


def sincos_1d(dim: int, positions_m: jax.Array) -> jax.Array:
  """diffusers' `get_1d_sincos_pos_embed_from_grid`: (M,) positions → (M, dim) [sin | cos], fp32."""
  omega_f = 1.0 / 10000.0 ** (jnp.arange(dim // 2, dtype=jnp.float32) / (dim / 2.0))  # F
  angle_mf = positions_m.astype(jnp.float32)[:, None] * omega_f[None, :]  # M, F
  return jnp.concatenate([jnp.sin(angle_mf), jnp.cos(angle_mf)], -1)  # M, dim


def sincos_2d(dim: int, first_row, rows: int, total_rows: int, cols: int, *, base_size: int,
              interpolation_scale: float) -> jax.Array:
  """diffusers' `get_2d_sincos_pos_embed` for token rows [first_row, first_row + rows) of a
  `total_rows` × `cols` grid, (rows, cols, dim) fp32: the column's embedding, then the row's.

  Positions are scaled to `base_size` tokens per side (the training grid) and divided by
  `interpolation_scale`, as in diffusers.
  """
  row_r = (first_row + jnp.arange(rows, dtype=jnp.float32)) / (total_rows / base_size) / interpolation_scale
  col_q = jnp.arange(cols, dtype=jnp.float32) / (cols / base_size) / interpolation_scale
  col_qd = sincos_1d(dim // 2, col_q)  # Q, D/2
  row_rd = sincos_1d(dim // 2, row_r)  # r, D/2
  return jnp.concatenate([jnp.broadcast_to(col_qd[None], (rows, cols, dim // 2)),
                          jnp.broadcast_to(row_rd[:, None], (rows, cols, dim // 2))], -1)  # r, Q, D


class PatchEmbed(nnx.Module):
  """`proj`: p×p stride-p conv from latent pixels to tokens, plus the fixed 2-D sin-cos positions.

  Returns the token grid (B, r, Q, D): tokens in row-major order are `reshape(B, r·Q, D)`.
  """

  def __init__(self, config: TransformerConfig, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    p = config.patch_size
    self.proj = Conv2d(config.in_channels, config.inner_dim, p, stride=p, axes=(CONV_IN, EMBED),
                       dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.base_size = config.base_size
    self.interpolation_scale = config.pos_interpolation_scale

  def __call__(self, x_bhwc: jax.Array, *, ctx: ParallelContext = SINGLE_DEVICE) -> jax.Array:
    tokens_brqd = self.proj(x_bhwc, ctx=ctx)  # B, r, Q, D
    _, rows, cols, dim = tokens_brqd.shape
    first_row, total_rows = ctx.token_extent(rows)
    pos_rqd = sincos_2d(dim, first_row, rows, total_rows, cols, base_size=self.base_size,
                        interpolation_scale=self.interpolation_scale)  # r, Q, D
    return (tokens_brqd + pos_rqd.astype(tokens_brqd.dtype)).astype(tokens_brqd.dtype)  # B, r, Q, D

  def cost(self, latent: Workload) -> Cost:
    return self.proj.cost(latent)


def _sinusoid(t_b: jax.Array, dtype: Dtype, freq_shift: float) -> jax.Array:
  return timestep_embedding(t_b, _TIME_PROJ, flip_sin_to_cos=True, freq_shift=freq_shift).astype(dtype)  # B, 256


class LabelEmbedding(nnx.Module):
  """`embedding_table` with one row per class and the null class (label dropout's row) last."""

  def __init__(self, num_classes: int, dim: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    self.embedding_table = Embed(num_classes + 1, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, labels_b: jax.Array) -> jax.Array:
    return self.embedding_table(labels_b.astype(jnp.int32))  # B, D


class CombinedTimestepLabelEmbeddings(nnx.Module):
  """DiT's conditioning: `timestep_embedder` (sinusoid, shift 1) + `class_embedder`, (B, D).

  diffusers builds one per block (`transformer_blocks.i.norm1.emb`) and every block computes the
  same value from equal weights; dfjax keeps one and computes it once.
  """

  def __init__(self, num_classes: int, dim: int, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.timestep_embedder = TimestepEmbedding(_TIME_PROJ, dim, **kw)
    self.class_embedder = LabelEmbedding(num_classes, dim, **kw)
    self.dtype = dtype

  def __call__(self, t_b: jax.Array, labels_b: jax.Array) -> jax.Array:
    return self.timestep_embedder(_sinusoid(t_b, self.dtype, 1)) + self.class_embedder(labels_b)  # B, D

  def cost(self) -> Cost:
    return self.timestep_embedder.cost()


class PixArtAlphaCombinedTimestepSizeEmbeddings(nnx.Module):
  """PixArt's timestep embedding (shift 0), plus resolution and aspect-ratio embeddings (width D/3:
  two for the resolution's height and width, one for the ratio) when the config has them."""

  def __init__(self, dim: int, use_additional_conditions: bool, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.timestep_embedder = TimestepEmbedding(_TIME_PROJ, dim, **kw)
    extra = use_additional_conditions
    self.resolution_embedder = TimestepEmbedding(_TIME_PROJ, dim // 3, **kw) if extra else None
    self.aspect_ratio_embedder = TimestepEmbedding(_TIME_PROJ, dim // 3, **kw) if extra else None
    self.dtype = dtype

  def __call__(self, t_b: jax.Array, resolution_b2: jax.Array | None, aspect_ratio_b1: jax.Array | None
               ) -> jax.Array:
    emb_bd = self.timestep_embedder(_sinusoid(t_b, self.dtype, 0))  # B, D
    if self.resolution_embedder is None:
      return emb_bd
    b = t_b.shape[0]
    res_bd = self.resolution_embedder(_sinusoid(resolution_b2.reshape(-1), self.dtype, 0)).reshape(b, -1)  # B, 2D/3
    ratio_bd = self.aspect_ratio_embedder(_sinusoid(aspect_ratio_b1.reshape(-1), self.dtype, 0)).reshape(b, -1)
    return emb_bd + jnp.concatenate([res_bd, ratio_bd], -1)  # B, D

  def cost(self) -> Cost:
    extra = [e.cost() for e in (self.resolution_embedder, self.aspect_ratio_embedder) if e is not None]
    return sum(extra, self.timestep_embedder.cost())


class AdaLayerNormSingle(nnx.Module):
  """PixArt's one modulation for every block: `emb`, then `linear`(SiLU) → (B, 6D); also returns `emb`'s (B, D)."""

  def __init__(self, config: PixArtConfig, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    dim = config.inner_dim
    self.emb = PixArtAlphaCombinedTimestepSizeEmbeddings(dim, config.use_additional_conditions, **kw)
    self.linear = Linear(dim, 6 * dim, axes=(EMBED, EMBED_INNER), **kw)

  def __call__(self, t_b, resolution_b2, aspect_ratio_b1) -> tuple[jax.Array, jax.Array]:
    emb_bd = self.emb(t_b, resolution_b2, aspect_ratio_b1)  # B, D
    return self.linear(nnx.silu(emb_bd)), emb_bd  # B, 6D and B, D

  def cost(self) -> Cost:
    return self.emb.cost() + self.linear.cost(1)


class PixArtAlphaTextProjection(nnx.Module):
  """PixArt's `caption_projection`: `linear_1`, tanh-GELU, `linear_2` (caption width → D)."""

  def __init__(self, in_features: int, dim: int, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.linear_1 = Linear(in_features, dim, axes=(EMBED, EMBED_INNER), **kw)
    self.linear_2 = Linear(dim, dim, axes=(EMBED_INNER, EMBED), **kw)

  def __call__(self, caption_bse: jax.Array) -> jax.Array:
    return self.linear_2(jax.nn.gelu(self.linear_1(caption_bse), approximate=True))  # B, S, D

  def cost(self, tokens: int) -> Cost:
    return self.linear_1.cost(tokens) + self.linear_2.cost(tokens)


def _modulate(x_btd: jax.Array, shift_b1d: jax.Array, scale_b1d: jax.Array) -> jax.Array:
  return x_btd * (1 + scale_b1d) + shift_b1d  # B, T, D


class _TransformerBlock(nnx.Module):
  """What both blocks have: self-attention `attn1` over every token, and `ff`."""

  def __init__(self, config: TransformerConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    dim = config.inner_dim
    self.attn1 = Attention(dim, config.num_attention_heads, config.attention_head_dim,
                           upcast=config.upcast_attention, bias=config.attention_bias, **kw)
    self.ff = FeedForward(dim, 4 * dim, activation=config.activation_fn, **kw)

  def _norm(self, config: TransformerConfig, **kw) -> LayerNorm:
    return LayerNorm(config.inner_dim, epsilon=config.norm_eps, elementwise_affine=config.norm_elementwise_affine,
                     **kw)


class AdaLayerNormZero(nnx.Module):
  """DiT's per-block modulation: `linear`(SiLU(conditioning)) → 6 × (B, 1, D), and `norm` (no affine, ε 1e-6)."""

  def __init__(self, dim: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    self.linear = Linear(dim, 6 * dim, axes=(EMBED, EMBED_INNER), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm = LayerNorm(dim, epsilon=1e-6, elementwise_affine=False, dtype=dtype, rngs=rngs)

  def __call__(self, cond_bd: jax.Array) -> list[jax.Array]:
    return jnp.split(self.linear(nnx.silu(cond_bd))[:, None, :], 6, axis=-1)  # 6 × (B, 1, D)


class DiTBlock(_TransformerBlock):
  """diffusers' `BasicTransformerBlock` with `norm_type="ada_norm_zero"`: adaLN-Zero modulated, gated
  self-attention and feed-forward; no cross-attention."""

  def __init__(self, config: TransformerConfig, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    super().__init__(config, **kw)
    self.norm1 = AdaLayerNormZero(config.inner_dim, **kw)
    self.norm3 = self._norm(config, **kw)

  def __call__(self, x_btd: jax.Array, cond_bd: jax.Array, *, ctx: ParallelContext = SINGLE_DEVICE) -> jax.Array:
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(cond_bd)  # B, 1, D each
    x_btd = x_btd + gate_msa * self.attn1(_modulate(self.norm1.norm(x_btd), shift_msa, scale_msa), ctx=ctx)
    return x_btd + gate_mlp * self.ff(_modulate(self.norm3(x_btd), shift_mlp, scale_mlp), ctx=ctx)  # B, T, D

  def cost(self, at: Workload) -> Cost:
    return self.norm1.linear.cost(1) + self.attn1.cost(at) + self.ff.cost(at.tokens)


class PixArtBlock(_TransformerBlock):
  """diffusers' `BasicTransformerBlock` with `norm_type="ada_norm_single"`: the shared modulation plus
  this block's `scale_shift_table` (6, D) shift, scale and gate self-attention and feed-forward;
  cross-attention `attn2` to the text in between, unnormalised and ungated."""

  def __init__(self, config: PixArtConfig, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    super().__init__(config, **kw)
    dim = config.inner_dim
    self.norm1 = self._norm(config, **kw)
    self.attn2 = Attention(dim, config.num_attention_heads, config.attention_head_dim,
                           context_dim=config.cross_attention_dim, upcast=config.upcast_attention,
                           bias=config.attention_bias, **kw)
    self.norm2 = self._norm(config, **kw)
    table = jax.random.normal(param_key(rngs), (6, dim), jnp.float32) / dim ** 0.5
    self.scale_shift_table = param(table.astype(param_dtype), (MODULATION, EMBED))

  def __call__(self, x_btd: jax.Array, modulation_bm: jax.Array, context_bse: jax.Array,
               context_mask_bs: jax.Array | None, *, ctx: ParallelContext = SINGLE_DEVICE) -> jax.Array:
    b, _, dim = x_btd.shape
    mods_b6d = self.scale_shift_table[...][None] + modulation_bm.reshape(b, 6, dim)  # B, 6, D
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mods_b6d, 6, axis=1)  # B, 1, D
    x_btd = x_btd + gate_msa * self.attn1(_modulate(self.norm1(x_btd), shift_msa, scale_msa), ctx=ctx)
    x_btd = x_btd + self.attn2(x_btd, context_bse, context_mask_bs=context_mask_bs, ctx=ctx)
    return x_btd + gate_mlp * self.ff(_modulate(self.norm2(x_btd), shift_mlp, scale_mlp), ctx=ctx)  # B, T, D

  def cost(self, at: Workload) -> Cost:
    return self.attn1.cost(at) + self.attn2.cost(at) + self.ff.cost(at.tokens)
