"""Ulysses (DeepSpeed-Ulysses): swap a token-sharded tensor for a head-sharded one and back.

Before attention each device holds all heads of its own tokens; one `all_to_all` per tensor
gives it every token of 1/n of the heads, attention runs locally over the whole sequence, and a
last `all_to_all` returns the output to token sharding. Tokens are row-major and devices hold
consecutive blocks, so concatenating the received blocks in device order is the image's order.
Each all-to-all keeps 1/n of the local tensor and receives the other (n−1)/n.

Shape letters: B batch, T tokens per device, n devices, N heads, D head width.
"""

import jax
from jax import lax


def check_heads(heads: int, num_devices: int, where: str, axis: str) -> None:
  """Ulysses gives each device heads/n whole heads: a clear error when n does not divide them."""
  if heads % num_devices:
    valid = [n for n in range(1, heads + 1) if heads % n == 0]
    raise ValueError(f"Ulysses splits the {heads} attention heads of {where} over {axis}={num_devices} "
                     f"devices, which does not divide them: use {axis} in {valid}, or ring attention "
                     "(any device count).")


def to_heads(x_btnd: jax.Array, axis: str) -> jax.Array:
  """(B, T, N, D) this device's tokens, every head → (B, n·T, N/n, D) every token, this device's heads."""
  return lax.all_to_all(x_btnd, axis, split_axis=2, concat_axis=1, tiled=True)


def to_tokens(x_bsnd: jax.Array, axis: str) -> jax.Array:
  """The inverse of `to_heads`: (B, n·T, N/n, D) → (B, T, N, D)."""
  return lax.all_to_all(x_bsnd, axis, split_axis=1, concat_axis=2, tiled=True)
