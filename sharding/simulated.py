"""One device's share of N-device patch parallelism, run on one device without the others.

`SimulatedPatchContext` is `PatchContext` with each collective replaced by a local stand-in that
returns what an interior device of an N-device `patch` mesh would receive, in shape and dtype:
  halo     (B, r, W, C) rows from above and from below: this device's own edge rows, swapped;
  kv       (2, B, N, T, C) the K/V blocks of all N patches: this device's block, tiled N times;
  moments  (N, B, G, 2) every patch's GroupNorm moments: this device's own, repeated N times.
Everything else (attaching halos, replacing the own block, combining moments, the displaced
steps' stale inputs and records) is PatchContext's own code, so the UNet runs the per-device
program of the real mesh: its rows, its halo, K/V and moment shapes, its stale buffers.

Stand-in outputs pass through an optimisation barrier: like a collective's result, each is a
buffer of its own that XLA cannot fuse away into its consumers. Run the model under a
`shard_map` over a one-device mesh with the `patch` axis (size 1), as
`dfjax.bench.simulate` does: PatchContext reads the device's position with `lax.axis_index`.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from sharding import groupnorm, halo, kv
from sharding.groupnorm import GroupNormMode
from sharding.patch_context import PatchContext


def halo_standin(edges: halo.Halo) -> halo.Halo:
  """(top, bottom) edge rows → (from above, from below), each (B, r, W, C) like `halo.exchange`."""
  top, bottom = edges
  return lax.optimization_barrier((bottom, top))


def kv_standin(fresh_2btc: jax.Array, num_patches: int) -> jax.Array:
  """(2, B, T, C) → (2, B, N, T, C) like `kv.exchange` over N devices."""
  return lax.optimization_barrier(jnp.repeat(fresh_2btc[:, :, None], num_patches, axis=2))


def moments_standin(moments_bg2: jax.Array, num_patches: int) -> jax.Array:
  """(B, G, 2) → (N, B, G, 2) like `groupnorm.exchange` over N devices."""
  return lax.optimization_barrier(jnp.repeat(moments_bg2[None], num_patches, axis=0))


@dataclasses.dataclass(frozen=True)
class SimulatedPatchContext(PatchContext):
  """An interior device of `num_patches` row patches; `axis` must be a mesh axis of size 1."""

  def halo_rows(self, x_bhwc: jax.Array, rows: int, key: str) -> jax.Array:
    received = self._exchanged(key, halo.edge_rows(x_bhwc, rows), halo_standin)
    return halo.attach(x_bhwc, received)  # B, h+2r, W, C

  def attention_kv(self, k_btc: jax.Array, v_btc: jax.Array, key: str) -> tuple[jax.Array, jax.Array]:
    fresh = kv.stack(k_btc, v_btc)  # 2, B, T, C
    gathered = self._exchanged(key, fresh, lambda f: kv_standin(f, self.num_patches))  # 2, B, N, T, C
    return kv.attach(gathered, fresh, self.axis)  # B, N·T, C each

  def group_norm_moments(self, moments_bg2: jax.Array, key: str) -> jax.Array:
    mode = self.groupnorm if self.stale is not None else GroupNormMode.SYNC
    exchange = lambda m: moments_standin(m, self.num_patches)
    match self.groupnorm:
      case GroupNormMode.STALE | GroupNormMode.CORRECTED_ASYNC:
        gathered = self._exchanged(key, moments_bg2, exchange)
      case GroupNormMode.SYNC | GroupNormMode.SEPARATE:
        gathered = exchange(moments_bg2) if mode is GroupNormMode.SYNC else None
      case _:
        raise ValueError(f"unknown GroupNorm mode {self.groupnorm!r}; valid: {[m.value for m in GroupNormMode]}")
    return groupnorm.combine(gathered, moments_bg2, self.axis, mode)  # B, G, 2
