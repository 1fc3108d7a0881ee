"""Self-attention K/V: queries stay local, keys and values come from every patch.

Tokens are row-major, so device i's tokens are the i-th contiguous block of the image's tokens
and gathering the blocks in device order gives the full-image token order.

Shape letters: B batch, n devices, T tokens per device, N heads, D head width.
"""

import jax
import jax.numpy as jnp
from jax import lax


def exchange(kv_2btnd: jax.Array, axis: str) -> jax.Array:
  """All devices' stacked (K, V): (2, B, T, N, D) → (2, B, n, T, N, D)."""
  return lax.all_gather(kv_2btnd, axis, axis=2)


def attach(gathered_2bntnd: jax.Array, fresh_2btnd: jax.Array, axis: str) -> tuple[jax.Array, jax.Array]:
  """Full-image K and V, (B, n·T, N, D) each, from the gathered blocks with this device's own block fresh."""
  own = lax.axis_index(axis)
  full = lax.dynamic_update_index_in_dim(gathered_2bntnd, fresh_2btnd, own, axis=2)  # 2, B, n, T, N, D
  two, b, n, t, *heads = full.shape
  full = full.reshape(two, b, n * t, *heads)  # 2, B, n·T, N, D
  return full[0], full[1]


def stack(k_btnd: jax.Array, v_btnd: jax.Array) -> jax.Array:
  return jnp.stack([k_btnd, v_btnd])  # 2, B, T, N, D
