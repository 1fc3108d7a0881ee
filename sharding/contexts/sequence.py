"""The sequence-parallel contexts: self-attention by Ulysses or ring attention, everything else as patch.

Tokens (a DiT's, or a UNet level's rows × columns) are split row-major over the mesh axis `patch`
as for patch parallelism. Only `attend` differs from `PatchContext`'s synchronous answer:
  UlyssesContext  all-to-all from token- to head-sharded q, k, v, attention over the whole
                  sequence for heads/n heads, all-to-all back (sharding/exchange/alltoall.py);
  RingContext     K/V blocks rotated around the devices, merged by log-sum-exp
                  (sharding/exchange/ring.py);
  UspContext      both (xDiT's USP): tokens split over (patch, ulysses); Ulysses all-to-alls within
                  `ulysses` give each device its `patch` block's tokens for 1/ulysses of the heads,
                  ring attention over `patch` brings the other blocks' K/V, an all-to-all returns.
All give every query the exact full-image attention without any device holding every token's
K/V. Convs still get halo rows and GroupNorm image-wide moments (the UNet), synchronously: these
contexts have no stale state. The `Simulated…` variants stand in for every collective with a local
copy of the received shapes (sharding/contexts/simulated.py), for `bench simulate`.
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax import lax

from sharding.axes import PATCH, SEQUENCE, ULYSSES
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

  ulysses_axis: ClassVar[str] = PATCH  # the axis the all-to-alls run over

  @property
  def ulysses_degree(self) -> int:
    return self.num_patches

  def _to_heads(self, x_btnd: jax.Array) -> jax.Array:
    return alltoall.to_heads(x_btnd, self.ulysses_axis)

  def _to_tokens(self, x_bsnd: jax.Array) -> jax.Array:
    return alltoall.to_tokens(x_bsnd, self.ulysses_axis)

  def _attend_all_tokens(self, q_bsnd, k_bsnd, v_bsnd) -> jax.Array:
    """Attention of this device's heads once it holds them for every token (of its Ulysses group)."""
    return jax.nn.dot_product_attention(q_bsnd, k_bsnd, v_bsnd)

  def attend(self, q_btnd, k_btnd, v_btnd, key):
    alltoall.check_heads(q_btnd.shape[2], self.ulysses_degree, f"layer {key!r}", self.ulysses_axis)
    q_bsnd, k_bsnd, v_bsnd = (self._to_heads(a) for a in (q_btnd, k_btnd, v_btnd))  # B, u·T, N/u, D each
    return self._to_tokens(self._attend_all_tokens(q_bsnd, k_bsnd, v_bsnd)), None  # B, T, N, D


@dataclasses.dataclass(frozen=True)
class RingContext(SequenceContext):
  """Self-attention over K/V blocks passed around the `patch` ring, any head count."""

  @property
  def ring_degree(self) -> int:
    return self.num_patches

  def _rotate(self, kv_2btnd: jax.Array) -> jax.Array:
    return ring.rotate(kv_2btnd, PATCH, self.ring_degree)

  def _ring_attend(self, q_btnd, k_btnd, v_btnd) -> jax.Array:
    return ring.attend(q_btnd, k_btnd, v_btnd, self.ring_degree, self._rotate)  # B, T, N, D

  def attend(self, q_btnd, k_btnd, v_btnd, key):
    del key
    return self._ring_attend(q_btnd, k_btnd, v_btnd), None  # B, T, N, D


@dataclasses.dataclass(frozen=True)
class UspContext(UlyssesContext, RingContext):
  """Ulysses within `ulysses` × ring over `patch`: `num_patches` = ring degree × `ulysses` token blocks.

  Device (p, u) holds token block p·ulysses + u. The all-to-alls over `ulysses` give it blocks
  p·ulysses … p·ulysses + ulysses − 1 (its ring member's share) for heads/ulysses heads; ring
  attention over `patch` then visits every other ring member's share for the same heads.
  """

  ulysses: int = 1

  axis = SEQUENCE  # halos, GroupNorm moments and token positions over both axes (as one, patch outer)
  ulysses_axis = ULYSSES

  def __post_init__(self):
    super().__post_init__()
    if self.num_patches % self.ulysses:
      raise ValueError(f"UspContext: num_patches={self.num_patches} is not a multiple of ulysses={self.ulysses}.")

  @property
  def ulysses_degree(self) -> int:
    return self.ulysses

  @property
  def ring_degree(self) -> int:
    return self.num_patches // self.ulysses

  def _attend_all_tokens(self, q_bsnd, k_bsnd, v_bsnd):
    return self._ring_attend(q_bsnd, k_bsnd, v_bsnd)  # the ring members' shares merged by log-sum-exp

  attend = UlyssesContext.attend


@dataclasses.dataclass(frozen=True)
class SimulatedUlyssesContext(UlyssesContext, SimulatedPatchContext):
  """An interior device of `num_patches`, on a mesh whose `patch` axis has size 1."""

  def _to_heads(self, x_btnd):
    degree = self.ulysses_degree
    heads = x_btnd.shape[2] // degree  # this device's heads, every device's tokens
    return lax.optimization_barrier(jnp.tile(x_btnd[:, :, :heads], (1, degree, 1, 1)))

  def _to_tokens(self, x_bsnd):
    degree = self.ulysses_degree
    tokens = x_bsnd.shape[1] // degree  # this device's tokens, every device's heads
    return lax.optimization_barrier(jnp.tile(x_bsnd[:, :tokens], (1, 1, degree, 1)))


@dataclasses.dataclass(frozen=True)
class SimulatedRingContext(RingContext, SimulatedPatchContext):
  """An interior device of `num_patches`: each rotation brings back its own block, as a buffer of its own."""

  def _rotate(self, kv_2btnd):
    return lax.optimization_barrier(kv_2btnd)


@dataclasses.dataclass(frozen=True)
class SimulatedUspContext(UspContext, SimulatedUlyssesContext, SimulatedRingContext):
  """An interior device of a ring degree × `ulysses` USP mesh, on a mesh whose token axes have size 1."""
