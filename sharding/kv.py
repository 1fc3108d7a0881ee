"""Self-attention K/V: queries stay local, keys and values come from every patch.

Tokens are row-major, so device i's tokens are the i-th contiguous block of the image's tokens
and gathering the blocks in device order gives the full-image token order.
"""

import jax
import jax.numpy as jnp
from jax import lax


def exchange(kv_2btc: jax.Array, axis: str) -> jax.Array:
  """All devices' stacked (K, V): (2, B, T, C) → (2, B, n, T, C)."""
  return lax.all_gather(kv_2btc, axis, axis=2)


def attach(gathered_2bntc: jax.Array, fresh_2btc: jax.Array, axis: str) -> tuple[jax.Array, jax.Array]:
  """Full-image K and V from the gathered blocks with this device's own block fresh."""
  own = lax.axis_index(axis)
  full = lax.dynamic_update_index_in_dim(gathered_2bntc, fresh_2btc, own, axis=2)  # 2, B, n, T, C
  two, b, n, t, c = full.shape
  full = full.reshape(two, b, n * t, c)  # 2, B, n·T, C
  return full[0], full[1]


def stack(k_btc: jax.Array, v_btc: jax.Array) -> jax.Array:
  return jnp.stack([k_btc, v_btc])  # 2, B, T, C
