"""Class ids → a few learned context tokens: the cross-attention input of a class-conditional UNet.

The UNet attends to `encoder_hidden_states` (B, T, D) as if it were text. A class-conditional
model replaces the text encoder by a table of T learned tokens per class, plus one more row, the
*null class* (id = num_classes), which stands for "no class": training drops labels to it at
random (`drop_labels`) so that one model gives both the conditional and the unconditional
prediction of classifier-free guidance.

Shape letters: B batch, T tokens per class, D token width (the UNet's cross_attention_dim),
K classes + 1 (the null class).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = Any


class ClassTokens(nnx.Module):
  """A learned (K, T, D) table: row `label` is that class's T context tokens.

  Params: `embedding` (num_classes + 1, num_tokens, dim), unit-Gaussian initialised like a
  text encoder's normalised outputs.
  """

  def __init__(self, num_classes: int, num_tokens: int, dim: int, *, rngs: nnx.Rngs,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
    """Args:
      num_classes: real classes; ids 0 … num_classes − 1, and num_classes is the null class.
      num_tokens: context tokens per class, T.
      dim: token width D (the UNet's `cross_attention_dim`).
    """
    for name, value in (("num_classes", num_classes), ("num_tokens", num_tokens), ("dim", dim)):
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"ClassTokens {name} must be a positive int, got {value!r}")
    shape = (num_classes + 1, num_tokens, dim)
    self.embedding = nnx.Param(jax.random.normal(rngs.params(), shape, param_dtype))
    self.num_classes = num_classes
    self.dtype = dtype

  @property
  def null_id(self) -> int:
    """The id of the null (unconditional) class."""
    return self.num_classes

  def __call__(self, labels_b: jax.Array) -> jax.Array:
    """(B,) int ids in [0, num_classes] (num_classes = null) → (B, T, D) context tokens.

    Ids are not range-checked inside jit (they are traced); `jnp.take` clips out-of-range ids.
    """
    labels_b = jnp.asarray(labels_b)
    if labels_b.ndim != 1 or not jnp.issubdtype(labels_b.dtype, jnp.integer):
      raise ValueError(f"class labels must be a (B,) int array, got shape {labels_b.shape} and "
                       f"dtype {labels_b.dtype}")
    tokens_btd = jnp.take(self.embedding[...], labels_b, axis=0, mode="clip")  # B, T, D
    return tokens_btd.astype(self.dtype)  # B, T, D

  def null(self, batch: int) -> jax.Array:
    """(batch, T, D) tokens of the null class: the unconditional half of guidance."""
    return self(jnp.full((batch,), self.null_id, jnp.int32))  # B, T, D


def drop_labels(labels_b: jax.Array, key: jax.Array, null_id: int, rate: float) -> jax.Array:
  """Replaces each label by `null_id` with probability `rate` (classifier-free-guidance training).

  Args:
    labels_b: (B,) int class ids.
    key: PRNG key for the drop decisions.
    null_id: the null class id (`ClassTokens.null_id`).
    rate: drop probability in [0, 1].
  Returns:
    (B,) ids, same dtype.
  """
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"label drop rate must be in [0, 1], got {rate}")
  dropped_b = jax.random.bernoulli(key, rate, labels_b.shape)  # B
  return jnp.where(dropped_b, jnp.asarray(null_id, labels_b.dtype), labels_b)  # B
