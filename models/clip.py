"""transformers' `CLIPTextModel` and `CLIPTextModelWithProjection` in Flax NNX (Stable Diffusion's text
encoders: SD1.x's CLIP ViT-L, SD2.x's OpenCLIP ViT-H, SDXL's both).

Attribute names mirror transformers' modules (`text_model.embeddings.token_embedding`,
`text_model.encoder.layers.i.self_attn.q_proj`, `text_model.final_layer_norm`, `text_projection`), so its
state dict maps one-for-one (convert/clip_keymap.py). Pre-LayerNorm causal transformer: every token
attends to itself and the tokens before it (and, with an attention mask, not to padding).

Shape letters: B batch (prompts), T tokens, D width, N heads, H head width, F MLP width, P projection.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import EMBED, HEADS, MLP, Cost, Dtype, Embed, LayerNorm, Linear
from models.text_encoder import (TextEncoderOutput, activation, check_positive, check_token_batch,
                                 fields_from_config)

__all__ = ["CLIPTextConfig", "CLIPTextModel", "CLIPTextModelWithProjection"]

_ARGMAX_EOS_ID = 2  # configs written before transformers PR #24773 (SDXL's second encoder's among them)


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """transformers' `CLIPTextConfig` fields that shape the text encoder (its defaults: CLIP ViT-B/32's)."""

  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  projection_dim: int = 512
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407

  @classmethod
  def from_transformers_config(cls, config: Mapping[str, Any]) -> CLIPTextConfig:
    """The config of a transformers `config.json` dict (a text encoder folder's).

    Raises:
      ValueError: a key dfjax does not know, another model type, or an unsupported value.
    """
    return cls(**fields_from_config(cls, config, kind="CLIP text", model_types=("clip_text_model",),
                                    inert=frozenset({"attention_dropout", "dropout"})))

  def __post_init__(self):
    check_positive("CLIP text", vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                   intermediate_size=self.intermediate_size, projection_dim=self.projection_dim,
                   num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                   max_position_embeddings=self.max_position_embeddings)
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"CLIP text config: hidden_size={self.hidden_size} does not split into "
                       f"num_attention_heads={self.num_attention_heads} heads")
    activation(self.hidden_act, "CLIP text config hidden_act")
    if not isinstance(self.eos_token_id, int) or not 0 <= self.eos_token_id < self.vocab_size:
      raise ValueError(f"CLIP text config: eos_token_id={self.eos_token_id!r} must be a token id below "
                       f"vocab_size={self.vocab_size} (the pooled output is read at it)")

  @property
  def pools_at_argmax(self) -> bool:
    """Whether the pooled token is the one with the largest id (old configs, eos_token_id 2) rather than
    the first `eos_token_id`: transformers keeps that rule for them, and so must we."""
    return self.eos_token_id == _ARGMAX_EOS_ID


class CLIPAttention(nnx.Module):
  """Multi-head self-attention, `q_proj`, `k_proj`, `v_proj`, `out_proj` with biases, scores scaled by
  1/√H, fp32 softmax (`jax.nn.dot_product_attention`)."""

  def __init__(self, config: CLIPTextConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    d = config.hidden_size
    self.q_proj = Linear(d, d, axes=(EMBED, HEADS), **kw)
    self.k_proj = Linear(d, d, axes=(EMBED, HEADS), **kw)
    self.v_proj = Linear(d, d, axes=(EMBED, HEADS), **kw)
    self.out_proj = Linear(d, d, axes=(HEADS, EMBED), **kw)
    self.heads = config.num_attention_heads

  def __call__(self, x_btd: jax.Array, mask_b1tt: jax.Array) -> jax.Array:
    b, t, d = x_btd.shape
    q_btnh, k_btnh, v_btnh = (proj(x_btd).reshape(b, t, self.heads, -1)
                              for proj in (self.q_proj, self.k_proj, self.v_proj))  # B, T, N, H each
    o_btnh = jax.nn.dot_product_attention(q_btnh, k_btnh, v_btnh, mask=mask_b1tt)  # B, T, N, H
    return self.out_proj(o_btnh.reshape(b, t, d))  # B, T, D

  def cost(self, tokens: int) -> Cost:
    """One prompt of `tokens` tokens: the projections, and scores and values over every (query, key) pair
    (the causal mask hides half of them, but the product is computed whole)."""
    width = self.q_proj.kernel.shape[1]
    projections = [proj.cost(tokens) for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj)]
    return sum(projections, Cost({"attention": 2 * 2 * tokens * tokens * width}))


class CLIPMLP(nnx.Module):
  """`fc1`, the config's activation, `fc2`."""

  def __init__(self, config: CLIPTextConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = Linear(config.hidden_size, config.intermediate_size, axes=(EMBED, MLP), **kw)
    self.fc2 = Linear(config.intermediate_size, config.hidden_size, axes=(MLP, EMBED), **kw)
    self.act = activation(config.hidden_act, "hidden_act")

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    return self.fc2(self.act(self.fc1(x_btd)))  # B, T, D (through B, T, F)

  def cost(self, tokens: int) -> Cost:
    return self.fc1.cost(tokens) + self.fc2.cost(tokens)


class CLIPEncoderLayer(nnx.Module):
  """Pre-LayerNorm block: `layer_norm1`, `self_attn`, residual; `layer_norm2`, `mlp`, residual."""

  def __init__(self, config: CLIPTextConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.layer_norm1 = LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, **kw)
    self.self_attn = CLIPAttention(config, **kw)
    self.layer_norm2 = LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, **kw)
    self.mlp = CLIPMLP(config, **kw)

  def __call__(self, x_btd: jax.Array, mask_b1tt: jax.Array) -> jax.Array:
    x_btd = x_btd + self.self_attn(self.layer_norm1(x_btd), mask_b1tt)  # B, T, D
    return x_btd + self.mlp(self.layer_norm2(x_btd))  # B, T, D

  def cost(self, tokens: int) -> Cost:
    return self.self_attn.cost(tokens) + self.mlp.cost(tokens)


class CLIPEmbeddings(nnx.Module):
  """`token_embedding` plus `position_embedding` of positions 0…T-1."""

  def __init__(self, config: CLIPTextConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.token_embedding = Embed(config.vocab_size, config.hidden_size, **kw)
    self.position_embedding = Embed(config.max_position_embeddings, config.hidden_size, **kw)

  def __call__(self, ids_bt: jax.Array) -> jax.Array:
    positions_t = jnp.arange(ids_bt.shape[1])  # T
    return self.token_embedding(ids_bt) + self.position_embedding(positions_t)[None]  # B, T, D


class CLIPEncoder(nnx.Module):
  """The `layers`."""

  def __init__(self, config: CLIPTextConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    self.layers = nnx.List([CLIPEncoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                            for _ in range(config.num_hidden_layers)])


class CLIPTextTransformer(nnx.Module):
  """`embeddings`, `encoder`, `final_layer_norm`, and the pooling at each prompt's end-of-text token."""

  def __init__(self, config: CLIPTextConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.config = config
    self.embeddings = CLIPEmbeddings(config, **kw)
    self.encoder = CLIPEncoder(config, **kw)
    self.final_layer_norm = LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, **kw)

  def __call__(self, input_ids_bt: jax.Array, attention_mask_bt: jax.Array | None = None) -> TextEncoderOutput:
    check_token_batch(input_ids_bt, attention_mask_bt, "CLIP text", self.config.max_position_embeddings)
    keep_b1tt = keep_mask(input_ids_bt.shape[1], attention_mask_bt)  # B|1, 1, T, T
    h_btd = self.embeddings(input_ids_bt)  # B, T, D
    hidden_states = [h_btd]
    for layer in self.encoder.layers:
      h_btd = layer(h_btd, keep_b1tt)  # B, T, D
      hidden_states.append(h_btd)
    last_btd = self.final_layer_norm(h_btd)  # B, T, D
    if self.config.pools_at_argmax:
      pooled_at_b = jnp.argmax(input_ids_bt, axis=-1)  # B
    else:  # the first end-of-text token (padding may repeat the id after it)
      pooled_at_b = jnp.argmax(input_ids_bt == self.config.eos_token_id, axis=-1)  # B
    pooled_bd = jnp.take_along_axis(last_btd, pooled_at_b[:, None, None], axis=1)[:, 0]  # B, D
    return TextEncoderOutput(last_btd, tuple(hidden_states), pooled_bd)

  # The encoder as a chain of layers (no attention mask: every prompt attends causally to its padding
  # too, as Stable Diffusion's pipelines run CLIP), for schedulers that place its work layer by layer
  # (DiffusionPipe fills pipeline bubbles with a frozen text encoder's layers, each on a part of the batch).

  @property
  def layer_names(self) -> tuple[str, ...]:
    """"embeddings", "encoder.layers.i" per layer, "final_layer_norm": `last_hidden_state` after them."""
    return ("embeddings", *(f"encoder.layers.{i}" for i in range(len(self.encoder.layers))), "final_layer_norm")

  def run_layer(self, index: int, x: jax.Array) -> jax.Array:
    """Layer `index` of `layer_names` on its input: (B, T) token ids for 0, the previous layer's (B, T, D)
    output else → (B, T, D)."""
    if index == 0:
      return self.embeddings(x)  # B, T, D
    if index == len(self.layer_names) - 1:
      return self.final_layer_norm(x)  # B, T, D
    return self.encoder.layers[index - 1](x, keep_mask(x.shape[1]))  # B, T, D

  def layer_costs(self, tokens: int) -> dict[str, Cost]:
    """Each layer's cost for one prompt of `tokens` tokens, by `layer_names`: the matrix work of
    `models.layers`' cost model (the embeddings, a lookup, and the final layer norm have none)."""
    layers = {f"encoder.layers.{i}": layer.cost(tokens) for i, layer in enumerate(self.encoder.layers)}
    return {"embeddings": self.embeddings.token_embedding.cost(), **layers, "final_layer_norm": Cost()}


def keep_mask(tokens: int, attention_mask_bt: jax.Array | None = None) -> jax.Array:
  """Which keys each query attends to: the causal mask (1, 1, T, T), and with an attention mask (1: token,
  0: padding) not the padding (B, 1, T, T)."""
  causal_tt = jnp.tril(jnp.ones((tokens, tokens), bool))  # T, T: query row, key column
  if attention_mask_bt is None:
    return causal_tt[None, None]  # 1, 1, T, T
  return causal_tt[None, None] & attention_mask_bt.astype(bool)[:, None, None, :]  # B, 1, T, T


class CLIPTextModel(nnx.Module):
  """transformers' `CLIPTextModel`: `model(input_ids, attention_mask=None)` → `TextEncoderOutput` with
  `last_hidden_state`, `hidden_states` (embeddings and every layer, before the final layer norm) and
  `pooler_output`.

  Args:
    config: the encoder's `CLIPTextConfig`.
    dtype: activation dtype (layer norms and softmax run in fp32 whatever it is).
    param_dtype: the params' dtype.
  """

  def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32):
    self.config = config
    self.text_model = CLIPTextTransformer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, input_ids_bt: jax.Array, attention_mask_bt: jax.Array | None = None) -> TextEncoderOutput:
    return self.text_model(input_ids_bt, attention_mask_bt)


class CLIPTextModelWithProjection(nnx.Module):
  """transformers' `CLIPTextModelWithProjection`: as `CLIPTextModel`, plus `text_embeds`, the pooled
  output through `text_projection` (no bias): SDXL's pooled text embedding."""

  def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32):
    self.config = config
    self.text_model = CLIPTextTransformer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.text_projection = Linear(config.hidden_size, config.projection_dim, use_bias=False,
                                  dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, input_ids_bt: jax.Array, attention_mask_bt: jax.Array | None = None) -> TextEncoderOutput:
    out = self.text_model(input_ids_bt, attention_mask_bt)
    return dataclasses.replace(out, text_embeds=self.text_projection(out.pooler_output))  # B, P
