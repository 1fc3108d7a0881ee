"""The sequence-parallel contexts: self-attention by Ulysses or ring attention, everything else as patch.

Tokens (a DiT's, or a UNet level's rows × columns) are split row-major over the mesh axis `patch`
as for patch parallelism. Only `attend` differs from `PatchContext`'s synchronous answer:
  UlyssesContext  all-to-all from token- to head-sharded q, k, v, attention over the whole
                  sequence for heads/n heads, all-to-all back (sharding/exchange/alltoall.py);
  RingContext     K/V blocks rotated around the devices, merged by log-sum-exp
                  (sharding/exchange/ring.py).
Both give every query the exact full-image attention without any device holding every token's
K/V. Convs still get halo rows and GroupNorm image-wide moments (the UNet), synchronously: these
contexts have no stale state. The `Simulated…` variants stand in for every collective with a local
copy of the received shapes (sharding/contexts/simulated.py), for `bench simulate`.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from sharding.axes import PATCH
from sharding.contexts.patch import PatchContext
from sharding.contexts.simulated import SimulatedPatchContext
from sharding.exchange import alltoall, ring


@dataclasses.dataclass(frozen=True)
class SequenceContext(PatchContext):
  """`PatchContext`'s synchronous answers; subclasses answer `attend` their own way."""

  def __post_init__(self):
    if self.stale is not None or self.records:
      raise ValueError(f"{type(self).__name__} is synchronous: it takes no stale state and records nothing.")


@dataclasses.dataclass(frozen=True)
class UlyssesContext(SequenceContext):
  """Self-attention with the heads split over `patch` (the heads must be a multiple of the patch count)."""

  def _to_heads(self, x_btnd: jax.Array) -> jax.Array:
    return alltoall.to_heads(x_btnd, PATCH)

  def _to_tokens(self, x_bsnd: jax.Array) -> jax.Array:
    return alltoall.to_tokens(x_bsnd, PATCH)

  def attend(self, q_btnd, k_btnd, v_btnd, key):
    alltoall.check_heads(q_btnd.shape[2], self.num_patches, f"layer {key!r}")
    q_bsnd, k_bsnd, v_bsnd = (self._to_heads(a) for a in (q_btnd, k_btnd, v_btnd))  # B, n·T, N/n, D each
    return self._to_tokens(jax.nn.dot_product_attention(q_bsnd, k_bsnd, v_bsnd)), None  # B, T, N, D


@dataclasses.dataclass(frozen=True)
class RingContext(SequenceContext):
  """Self-attention over K/V blocks passed around the `patch` ring, any head count."""

  def _rotate(self, kv_2btnd: jax.Array) -> jax.Array:
    return ring.rotate(kv_2btnd, PATCH, self.num_patches)

  def attend(self, q_btnd, k_btnd, v_btnd, key):
    del key
    return ring.attend(q_btnd, k_btnd, v_btnd, self.num_patches, self._rotate), None  # B, T, N, D


@dataclasses.dataclass(frozen=True)
class SimulatedUlyssesContext(UlyssesContext, SimulatedPatchContext):
  """An interior device of `num_patches`, on a mesh whose `patch` axis has size 1."""

  def _to_heads(self, x_btnd):
    heads = x_btnd.shape[2] // self.num_patches  # this device's heads, every device's tokens
    return lax.optimization_barrier(jnp.tile(x_btnd[:, :, :heads], (1, self.num_patches, 1, 1)))

  def _to_tokens(self, x_bsnd):
    tokens = x_bsnd.shape[1] // self.num_patches  # this device's tokens, every device's heads
    return lax.optimization_barrier(jnp.tile(x_bsnd[:, :tokens], (1, 1, self.num_patches, 1)))


@dataclasses.dataclass(frozen=True)
class SimulatedRingContext(RingContext, SimulatedPatchContext):
  """An interior device of `num_patches`: each rotation brings back its own block, as a buffer of its own."""

  def _rotate(self, kv_2btnd):
    return lax.optimization_barrier(kv_2btnd)
