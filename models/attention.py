"""Attention layers of the diffusion UNet: diffusers' `Attention`, `FeedForward` (GEGLU or GELU),
`BasicTransformerBlock` and `Transformer2DModel` (continuous input), NHWC.

Self-attention (`attn1`) asks the parallel context to attend over every token of the image
(`ctx.attend`, with this device's queries, keys and values); cross-attention (`attn2`) attends to the
text and never needs other devices. Renames against diffusers (the only ones in the UNet):
`attnN.to_out.0` → `attnN.to_out`, `ff.net.0.proj` → `ff.proj_in`, `ff.net.2` → `ff.proj_out`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import (CONV_IN, CONV_OUT, EMBED, HEADS, MLP, Conv2d, Cost, Dtype, Exchange, GroupNorm,
                           LayerNorm, Linear, Workload, total)
from models.parallel import SINGLE_DEVICE, ParallelContext, keep_for_next_step


class Attention(nnx.Module):
  """Multi-head attention with `to_q`, `to_k`, `to_v` (biases with `bias`, diffusers' `attention_bias`)
  and `to_out`. Cross-attention takes an optional keep-mask over the context tokens.

  Under tensor parallelism the q/k/v projections write this device's heads (HEADS is split) and
  `to_out` sums their contributions (`ctx.reduce_partial_sums`): heads are whole per device, so
  every shape below counts this device's heads.

  Scores and softmax are fp32 for any activation dtype (`jax.nn.dot_product_attention`
  accumulates the scores in fp32 and takes the softmax in fp32). `upcast` (diffusers'
  `upcast_attention`, against fp16 overflow) additionally runs fp16 attention in fp32.

  Shape letters: B batch, T query tokens, S key tokens, C query channels, E context channels,
  N heads, H head width, I = N·H.
  """

  def __init__(self, query_dim: int, heads: int, head_dim: int, *, context_dim: int | None = None,
               upcast: bool = False, bias: bool = False, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    inner = heads * head_dim
    self.to_q = Linear(query_dim, inner, use_bias=bias, axes=(EMBED, HEADS), **kw)
    self.to_k = Linear(context_dim or query_dim, inner, use_bias=bias, axes=(EMBED, HEADS), **kw)
    self.to_v = Linear(context_dim or query_dim, inner, use_bias=bias, axes=(EMBED, HEADS), **kw)
    self.to_out = Linear(inner, query_dim, axes=(HEADS, EMBED), **kw)
    self.heads = heads
    self.head_dim = head_dim
    self.is_self_attention = context_dim is None
    self.upcast = upcast
    self.dtype = dtype
    self.ctx_key = ""

  def __call__(self, x_btc: jax.Array, context_bse: jax.Array | None = None, *,
               context_mask_bs: jax.Array | None = None, ctx: ParallelContext = SINGLE_DEVICE) -> jax.Array:
    """`context_mask_bs` (cross-attention only): 1 keeps a context token, 0 drops it; as in diffusers,
    (1 − mask)·−10000 is added to the scores."""
    b, t, _ = x_btc.shape
    q_btnh = self._heads(self.to_q(x_btc))  # B, T, N, H
    if self.is_self_attention:
      k_bsnh, v_bsnh = self._keys_values(x_btc)  # B, S, N, H each (S = T: this device's tokens)
    else:  # the text's keys and values are the same at every step: the context may have kept them
      (k_bsnh, v_bsnh), sent = ctx.cross_kv(context_bse, self._keys_values, self.ctx_key)  # B, S, N, H each
      keep_for_next_step(self, sent)
    if self.upcast and q_btnh.dtype == jnp.float16:
      q_btnh, k_bsnh, v_bsnh = (a.astype(jnp.float32) for a in (q_btnh, k_bsnh, v_bsnh))  # fp32
    if self.is_self_attention:  # keys and values of every token of the image: the context's request
      o_btnh, sent = ctx.attend(q_btnh, k_bsnh, v_bsnh, self.ctx_key)  # B, T, N, H
      keep_for_next_step(self, sent)
    else:
      bias_b11s = None if context_mask_bs is None else (
          (1.0 - context_mask_bs.astype(jnp.float32)) * -10000.0)[:, None, None, :]  # B, 1, 1, S
      o_btnh = jax.nn.dot_product_attention(q_btnh, k_bsnh, v_bsnh, bias=bias_b11s)  # B, T, N, H
    o_bti = o_btnh.astype(self.dtype).reshape(b, t, -1)  # B, T, I
    return self.to_out(o_bti, ctx=ctx)  # B, T, C

  def cost(self, at: Workload) -> Cost:
    """Queries from `at.tokens` image tokens, keys from them (self) or from `at.text_tokens` (cross)."""
    t, s = at.tokens, at.tokens if self.is_self_attention else at.text_tokens
    inner = self.to_q.kernel.shape[1]
    kv = ((Exchange("kv", self.ctx_key, at.rows, at.cols, inner, heads=self.heads, axis=HEADS),)
          if self.is_self_attention else ())
    attend = Cost({"attention": 2 * 2 * t * s * inner}, kv)  # Q·Kᵀ and P·V
    return self.to_q.cost(t) + self.to_k.cost(s) + self.to_v.cost(s) + attend + self.to_out.cost(t)

  def _keys_values(self, source_bsc: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`to_k` and `to_v` of the tokens attended to, split into heads: (B, S, N, H) each."""
    return self._heads(self.to_k(source_bsc)), self._heads(self.to_v(source_bsc))

  def _heads(self, x_bsi: jax.Array) -> jax.Array:
    b, s, _ = x_bsi.shape
    return x_bsi.reshape(b, s, -1, self.head_dim)  # B, S, N, H (N: this device's heads)


FEED_FORWARD_ACTIVATIONS = ("geglu", "gelu", "gelu-approximate")  # diffusers' `activation_fn` names


class FeedForward(nnx.Module):
  """`proj_in`, activation, `proj_out` (F → C). `activation` as diffusers' `activation_fn`:
  "geglu" (`proj_in` C → 2·F, value · gelu(gate), exact erf: the UNet's), "gelu" (exact) or
  "gelu-approximate" (tanh: DiT's and PixArt's), both with `proj_in` C → F.

  Under tensor parallelism `proj_in` writes this device's slice of the inner width (GEGLU: the same
  slice of the value and of the gate, `out_chunks=2`) and `proj_out` sums the slices' contributions.

  Shape letters: B batch, T tokens, C channels, F inner width (this device's).
  """

  def __init__(self, dim: int, inner_dim: int, *, activation: str = "geglu", dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    if activation not in FEED_FORWARD_ACTIVATIONS:
      raise ValueError(f"feed-forward activation {activation!r}; supported: {', '.join(FEED_FORWARD_ACTIVATIONS)}")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    chunks = 2 if activation == "geglu" else 1
    self.proj_in = Linear(dim, chunks * inner_dim, axes=(EMBED, MLP), out_chunks=chunks, **kw)
    self.proj_out = Linear(inner_dim, dim, axes=(MLP, EMBED), **kw)
    self.activation = activation

  def __call__(self, x_btc: jax.Array, *, ctx: ParallelContext = SINGLE_DEVICE) -> jax.Array:
    if self.activation == "geglu":
      value_btf, gate_btf = jnp.split(self.proj_in(x_btc), 2, axis=-1)  # B, T, F each
      return self.proj_out(value_btf * jax.nn.gelu(gate_btf, approximate=False), ctx=ctx)  # B, T, C
    h_btf = jax.nn.gelu(self.proj_in(x_btc), approximate=self.activation == "gelu-approximate")  # B, T, F
    return self.proj_out(h_btf, ctx=ctx)  # B, T, C

  def cost(self, tokens: int) -> Cost:
    return self.proj_in.cost(tokens) + self.proj_out.cost(tokens)


class BasicTransformerBlock(nnx.Module):
  """Pre-LayerNorm block: self-attention, cross-attention to the text, GEGLU feed-forward.

  Shape letters: B batch, T image tokens, S text tokens, C channels, E text channels.
  """

  def __init__(self, dim: int, heads: int, head_dim: int, *, context_dim: int, upcast: bool,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def norm():  # diffusers: nn.LayerNorm(dim, eps=1e-5)
      return LayerNorm(dim, epsilon=1e-5, **kw)

    self.norm1 = norm()
    self.attn1 = Attention(dim, heads, head_dim, upcast=upcast, **kw)
    self.norm2 = norm()
    self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim, upcast=upcast, **kw)
    self.norm3 = norm()
    self.ff = FeedForward(dim, 4 * dim, **kw)

  def __call__(self, x_btc: jax.Array, context_bse: jax.Array, *,
               ctx: ParallelContext = SINGLE_DEVICE) -> jax.Array:
    x_btc = x_btc + self.attn1(self.norm1(x_btc), ctx=ctx)  # B, T, C
    x_btc = x_btc + self.attn2(self.norm2(x_btc), context_bse, ctx=ctx)  # B, T, C
    return x_btc + self.ff(self.norm3(x_btc), ctx=ctx)  # B, T, C

  def cost(self, at: Workload) -> Cost:
    return self.attn1.cost(at) + self.attn2.cost(at) + self.ff.cost(at.tokens)


class Transformer2DModel(nnx.Module):
  """GroupNorm, `proj_in`, `transformer_blocks` over the image tokens, `proj_out`, residual.

  `proj_in`/`proj_out` are 1×1 convs (SD1.x) or Linear layers (`use_linear_projection`, SD2.x and
  SDXL), as in the checkpoints. Tokens are the image's pixels in row-major order.

  Shape letters: B batch, H rows, W columns, C channels, I inner width, T = H·W tokens,
  S text tokens, E text channels.
  """

  def __init__(self, in_channels: int, heads: int, head_dim: int, *, context_dim: int,
               num_layers: int, groups: int, use_linear_projection: bool, upcast: bool,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    inner = heads * head_dim
    self.norm = GroupNorm(groups, in_channels, epsilon=1e-6, **kw)
    if use_linear_projection:  # kept whole under tensor parallelism: the blocks' residual stream is whole
      self.proj_in = Linear(in_channels, inner, axes=(CONV_IN, EMBED), **kw)
      self.proj_out = Linear(inner, in_channels, axes=(EMBED, CONV_OUT), **kw)
    else:
      self.proj_in = Conv2d(in_channels, inner, 1, **kw)
      self.proj_out = Conv2d(inner, in_channels, 1, **kw)
    self.transformer_blocks = nnx.List([
        BasicTransformerBlock(inner, heads, head_dim, context_dim=context_dim, upcast=upcast, **kw)
        for _ in range(num_layers)])
    self.use_linear_projection = use_linear_projection

  def __call__(self, x_bhwc: jax.Array, context_bse: jax.Array, *,
               ctx: ParallelContext = SINGLE_DEVICE) -> jax.Array:
    b, h, w, c = x_bhwc.shape
    h_bhwc = self.norm(x_bhwc, ctx=ctx)  # B, H, W, C
    if self.use_linear_projection:
      h_bti = self.proj_in(h_bhwc.reshape(b, h * w, c))  # B, T, I
    else:
      h_bti = self.proj_in(h_bhwc).reshape(b, h * w, -1)  # B, T, I
    for block in self.transformer_blocks:
      h_bti = block(h_bti, context_bse, ctx=ctx)  # B, T, I
    if self.use_linear_projection:
      out_bhwc = self.proj_out(h_bti).reshape(b, h, w, c)  # B, H, W, C
    else:
      out_bhwc = self.proj_out(h_bti.reshape(b, h, w, -1))  # B, H, W, C
    return out_bhwc + x_bhwc  # B, H, W, C

  def cost(self, at: Workload) -> Cost:
    def projection(layer):
      return layer.cost(at.tokens) if self.use_linear_projection else layer.cost(at)

    blocks = total(block.cost(at) for block in self.transformer_blocks)
    return self.norm.cost(at) + projection(self.proj_in) + blocks + projection(self.proj_out)
