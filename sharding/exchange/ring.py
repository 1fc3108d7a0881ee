"""Ring attention: K/V blocks rotated around the device ring, partial results merged by log-sum-exp.

Each device keeps its queries and starts with its own K/V block. n−1 times, it passes the block it
holds to the next device (`ppermute`, i → i+1 mod n) while attending to it, so after n blocks it
has seen every token. A block's attention comes with its log-sum-exp (`return_residual=True` of
`jax.nn.dot_product_attention`, so cuDNN flash attention serves each block on GPU), and the
blocks merge exactly: with L = logaddexp(L₁, L₂), o = o₁·exp(L₁ − L) + o₂·exp(L₂ − L), in fp32.
A device holds one K/V block at a time (two while the next arrives) instead of all n.

JAX returns the log-sum-exp in the input dtype: for bf16 attention the merge weights carry its
bf16 rounding. The sum is exact to fp32 round-off for fp32 inputs.

Shape letters: B batch, T tokens per device, N heads, D head width.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax


def rotate(kv_2btnd: jax.Array, axis: str, num_devices: int) -> jax.Array:
  """Every device's (K, V) block to the next device of the ring; device 0 receives device n−1's."""
  return lax.ppermute(kv_2btnd, axis, [(i, (i + 1) % num_devices) for i in range(num_devices)])


def attend(q_btnd: jax.Array, k_btnd: jax.Array, v_btnd: jax.Array, num_devices: int,
           rotate_block: Callable[[jax.Array], jax.Array]) -> jax.Array:
  """Attention of this device's queries over the K/V of all `num_devices` blocks, (B, T, N, D).

  `rotate_block` passes the (2, B, T, N, D) block it is given on around the ring (`rotate`). Each
  transfer depends only on the previous block, not on its attention, so XLA may overlap them.
  """
  block_2btnd = jnp.stack([k_btnd, v_btnd])
  out_btnd, lse_btn = _block_attention(q_btnd, block_2btnd)
  for _ in range(num_devices - 1):
    block_2btnd = rotate_block(block_2btnd)
    o_btnd, l_btn = _block_attention(q_btnd, block_2btnd)
    merged_btn = jnp.logaddexp(lse_btn, l_btn)
    out_btnd = (out_btnd * jnp.exp(lse_btn - merged_btn)[..., None]
                + o_btnd * jnp.exp(l_btn - merged_btn)[..., None])
    lse_btn = merged_btn
  return out_btnd.astype(q_btnd.dtype)  # B, T, N, D


def _block_attention(q_btnd: jax.Array, kv_2btnd: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One block's attention output and log-sum-exp, both fp32: (B, T, N, D), (B, T, N)."""
  o_btnd, lse_btn = jax.nn.dot_product_attention(q_btnd, kv_2btnd[0], kv_2btnd[1], return_residual=True)
  return o_btnd.astype(jnp.float32), lse_btn.astype(jnp.float32)
