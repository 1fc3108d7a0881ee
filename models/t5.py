"""transformers' `T5EncoderModel` in Flax NNX: PixArt's text encoder (T5 v1.1 XXL: gated-GELU).

Attribute names mirror transformers' modules (`shared`, `encoder.block.i.layer.0.SelfAttention.q`,
`encoder.block.i.layer.1.DenseReluDense.wi_0`, `encoder.final_layer_norm`), so its state dict maps
one-for-one (convert/t5_keymap.py). Pre-norm bidirectional transformer with RMS layer norms (no mean, no
bias) in fp32, unscaled attention scores plus a learned bias per head and relative-position bucket, which
only the first block holds and every block adds; an attention mask drops padding tokens as keys.

Shape letters: B batch (prompts), T query tokens, S key tokens, D width, N heads, H head width, F MLP width,
K relative-position buckets.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from models.layers import EMBED, HEADS, MLP, VOCAB, Dtype, Embed, Linear, param, param_key
from models.text_encoder import TextEncoderOutput, activation, check_positive, check_token_batch, fields_from_config

__all__ = ["T5Config", "T5EncoderModel", "relative_position_buckets"]


@dataclasses.dataclass(frozen=True)
class T5Config:
  """transformers' `T5Config` fields that shape the encoder (its defaults: t5-small's).

  `feed_forward_proj` is "ACT" (one `wi`) or "gated-ACT" (`wi_0` activated times `wi_1`), ACT a
  transformers activation name; "gated-gelu" means the tanh GELU, as in transformers.
  """

  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_heads: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "relu"

  @classmethod
  def from_transformers_config(cls, config: Mapping[str, Any]) -> T5Config:
    """The config of a transformers `config.json` dict (a T5 or T5 v1.1 encoder folder's).

    Raises:
      ValueError: a key dfjax does not know, a decoder config, derived keys (`dense_act_fn`,
        `is_gated_act`) that contradict `feed_forward_proj`, or an unsupported value.
    """
    if config.get("is_decoder"):
      raise ValueError("T5 config has is_decoder=true: dfjax builds the (bidirectional) encoder only")
    made = cls(**fields_from_config(
        cls, config, kind="T5", model_types=("t5",),
        inert=frozenset({"dropout_rate", "classifier_dropout", "num_decoder_layers", "dense_act_fn", "is_gated_act",
                         "n_positions", "output_past", "scale_decoder_outputs"})))
    derived = {"dense_act_fn": made.dense_act_fn, "is_gated_act": made.is_gated_act}
    contradicting = [f"{k}={config[k]!r} (feed_forward_proj={made.feed_forward_proj!r} means {v!r})"
                     for k, v in derived.items() if k in config and config[k] != v]
    if contradicting:
      raise ValueError(f"T5 config contradicts itself: {', '.join(contradicting)}")
    return made

  def __post_init__(self):
    check_positive("T5", vocab_size=self.vocab_size, d_model=self.d_model, d_kv=self.d_kv, d_ff=self.d_ff,
                   num_layers=self.num_layers, num_heads=self.num_heads,
                   relative_attention_num_buckets=self.relative_attention_num_buckets,
                   relative_attention_max_distance=self.relative_attention_max_distance)
    if self.relative_attention_num_buckets < 4:
      raise ValueError(f"T5 config relative_attention_num_buckets={self.relative_attention_num_buckets}: "
                       "bidirectional buckets need at least 4 (exact and logarithmic, each direction)")
    activation(self.dense_act_fn, f"T5 config feed_forward_proj={self.feed_forward_proj!r}: activation")

  @property
  def is_gated_act(self) -> bool:
    return self.feed_forward_proj.startswith("gated-")

  @property
  def dense_act_fn(self) -> str:
    """The activation's transformers name (transformers maps "gated-gelu" to "gelu_new")."""
    if self.feed_forward_proj == "gated-gelu":
      return "gelu_new"
    return self.feed_forward_proj.removeprefix("gated-")


def relative_position_buckets(query_length: int, key_length: int, *, num_buckets: int,
                              max_distance: int) -> np.ndarray:
  """(T, S) int32: the bidirectional bucket of every key position minus query position, as
  transformers' `T5Attention._relative_position_bucket`.

  Half the buckets per direction; in each, distances below a quarter of `num_buckets` have their own
  bucket, longer ones share logarithmically wider buckets up to `max_distance`, beyond which all share
  the last. Computed on the host in fp32 with transformers' order of operations (the lengths are static),
  so a distance on a bucket boundary rounds the same way on every backend.
  """
  relative_ts = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]  # T, S
  half = num_buckets // 2
  max_exact = half // 2
  direction_ts = np.where(relative_ts > 0, half, 0)  # T, S
  distance_ts = np.abs(relative_ts)  # T, S
  with np.errstate(divide="ignore"):  # log(0) where the distance is exact anyway
    scaled_ts = (np.log(distance_ts.astype(np.float32) / np.float32(max_exact))
                 / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact))  # T, S
  large_ts = max_exact + np.where(distance_ts < max_exact, 0, scaled_ts).astype(np.int64)  # T, S
  large_ts = np.minimum(large_ts, half - 1)  # T, S
  return (direction_ts + np.where(distance_ts < max_exact, distance_ts, large_ts)).astype(np.int32)  # T, S


class RelativeAttentionBias(nnx.Module):
  """`embedding` (K, N): a learned score bias per relative-position bucket and head (torch `nn.Embedding`)."""

  def __init__(self, config: T5Config, *, param_dtype: Dtype, rngs: nnx.Rngs):
    shape = (config.relative_attention_num_buckets, config.num_heads)
    self.embedding = param(jax.random.normal(param_key(rngs), shape, param_dtype), (VOCAB, HEADS))
    self.config = config

  def __call__(self, query_length: int, key_length: int) -> jax.Array:
    buckets_ts = relative_position_buckets(query_length, key_length,
                                           num_buckets=self.config.relative_attention_num_buckets,
                                           max_distance=self.config.relative_attention_max_distance)  # T, S
    bias_tsn = jnp.take(self.embedding[...].astype(jnp.float32), buckets_ts, axis=0)  # T, S, N
    return bias_tsn.transpose(2, 0, 1)[None]  # 1, N, T, S


class T5Attention(nnx.Module):
  """`q`, `k`, `v`, `o` without biases; scores unscaled (T5 folds the scale into its init) plus the
  position bias; the first block's also holds `relative_attention_bias`."""

  def __init__(self, config: T5Config, *, has_relative_attention_bias: bool, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs):
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    inner = config.num_heads * config.d_kv
    self.q = Linear(config.d_model, inner, axes=(EMBED, HEADS), **kw)
    self.k = Linear(config.d_model, inner, axes=(EMBED, HEADS), **kw)
    self.v = Linear(config.d_model, inner, axes=(EMBED, HEADS), **kw)
    self.o = Linear(inner, config.d_model, axes=(HEADS, EMBED), **kw)
    self.relative_attention_bias = (RelativeAttentionBias(config, param_dtype=param_dtype, rngs=rngs)
                                    if has_relative_attention_bias else None)
    self.heads = config.num_heads

  def __call__(self, x_btd: jax.Array, bias_1nts: jax.Array, keep_b11s: jax.Array | None) -> jax.Array:
    b, t, _ = x_btd.shape
    q_btnh, k_btnh, v_btnh = (proj(x_btd).reshape(b, t, self.heads, -1)
                              for proj in (self.q, self.k, self.v))  # B, T, N, H each
    o_btnh = jax.nn.dot_product_attention(q_btnh, k_btnh, v_btnh, bias=bias_1nts,
                                          mask=keep_b11s, scale=1.0)  # B, T, N, H
    return self.o(o_btnh.reshape(b, t, -1))  # B, T, D


class T5LayerNorm(nnx.Module):
  """RMS norm with `scale` (D,) and no bias, in fp32: x / √(mean(x²) + ε) · scale."""

  def __init__(self, config: T5Config, *, dtype: Dtype, param_dtype: Dtype):
    self.scale = param(jnp.ones((config.d_model,), param_dtype), (EMBED,))
    self.epsilon = config.layer_norm_epsilon
    self.dtype = dtype

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    x_btd = x_btd.astype(jnp.float32)  # B, T, D
    inv_bt1 = lax.rsqrt(jnp.mean(jnp.square(x_btd), axis=-1, keepdims=True) + self.epsilon)  # B, T, 1
    return (x_btd * inv_bt1 * self.scale[...].astype(jnp.float32)).astype(self.dtype)  # B, T, D


class T5LayerSelfAttention(nnx.Module):
  """`layer_norm`, `SelfAttention`, residual."""

  def __init__(self, config: T5Config, *, has_relative_attention_bias: bool, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs):
    self.SelfAttention = T5Attention(config, has_relative_attention_bias=has_relative_attention_bias,
                                     dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.layer_norm = T5LayerNorm(config, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x_btd: jax.Array, bias_1nts: jax.Array, keep_b11s: jax.Array | None) -> jax.Array:
    return x_btd + self.SelfAttention(self.layer_norm(x_btd), bias_1nts, keep_b11s)  # B, T, D


class T5DenseReluDense(nnx.Module):
  """`wi` (or, gated, `wi_0` activated times `wi_1`), then `wo`; named as transformers' `DenseReluDense`
  whatever the activation."""

  def __init__(self, config: T5Config, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if config.is_gated_act:
      self.wi_0 = Linear(config.d_model, config.d_ff, axes=(EMBED, MLP), **kw)
      self.wi_1 = Linear(config.d_model, config.d_ff, axes=(EMBED, MLP), **kw)
    else:
      self.wi = Linear(config.d_model, config.d_ff, axes=(EMBED, MLP), **kw)
    self.wo = Linear(config.d_ff, config.d_model, axes=(MLP, EMBED), **kw)
    self.act = activation(config.dense_act_fn, "T5 dense_act_fn")
    self.gated = config.is_gated_act

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    if self.gated:
      h_btf = self.act(self.wi_0(x_btd)) * self.wi_1(x_btd)  # B, T, F
    else:
      h_btf = self.act(self.wi(x_btd))  # B, T, F
    return self.wo(h_btf)  # B, T, D


class T5LayerFF(nnx.Module):
  """`layer_norm`, `DenseReluDense`, residual."""

  def __init__(self, config: T5Config, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    self.DenseReluDense = T5DenseReluDense(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.layer_norm = T5LayerNorm(config, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    return x_btd + self.DenseReluDense(self.layer_norm(x_btd))  # B, T, D


class T5Block(nnx.Module):
  """`layer`: [self-attention, feed-forward], as transformers' encoder block."""

  def __init__(self, config: T5Config, *, has_relative_attention_bias: bool, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.layer = nnx.List([T5LayerSelfAttention(config, has_relative_attention_bias=has_relative_attention_bias, **kw),
                           T5LayerFF(config, **kw)])

  def __call__(self, x_btd: jax.Array, bias_1nts: jax.Array, keep_b11s: jax.Array | None) -> jax.Array:
    return self.layer[1](self.layer[0](x_btd, bias_1nts, keep_b11s))  # B, T, D


class T5Stack(nnx.Module):
  """The encoder's `block`s (the first with the position bias table) and `final_layer_norm`."""

  def __init__(self, config: T5Config, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    self.block = nnx.List([T5Block(config, has_relative_attention_bias=i == 0, dtype=dtype,
                                   param_dtype=param_dtype, rngs=rngs) for i in range(config.num_layers)])
    self.final_layer_norm = T5LayerNorm(config, dtype=dtype, param_dtype=param_dtype)


class T5EncoderModel(nnx.Module):
  """transformers' `T5EncoderModel`: `model(input_ids, attention_mask=None)` → `TextEncoderOutput` with
  `last_hidden_state` (after the final RMS norm) and `hidden_states` (the embeddings, every block but the
  last, then `last_hidden_state`, as transformers returns them).

  Args:
    config: the encoder's `T5Config`.
    dtype: activation dtype (RMS norms, the position bias and softmax run in fp32 whatever it is).
    param_dtype: the params' dtype.
  """

  def __init__(self, config: T5Config, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32):
    self.config = config
    self.shared = Embed(config.vocab_size, config.d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.encoder = T5Stack(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, input_ids_bt: jax.Array, attention_mask_bt: jax.Array | None = None) -> TextEncoderOutput:
    check_token_batch(input_ids_bt, attention_mask_bt, "T5")
    t = input_ids_bt.shape[1]
    keep_b11s = None if attention_mask_bt is None else attention_mask_bt.astype(bool)[:, None, None, :]  # B, 1, 1, S
    bias_1nts = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias(t, t)  # 1, N, T, S
    h_btd = self.shared(input_ids_bt)  # B, T, D
    hidden_states = [h_btd]
    for block in self.encoder.block:
      h_btd = block(h_btd, bias_1nts, keep_b11s)  # B, T, D
      hidden_states.append(h_btd)
    last_btd = self.encoder.final_layer_norm(h_btd)  # B, T, D
    return TextEncoderOutput(last_btd, (*hidden_states[:-1], last_btd))
