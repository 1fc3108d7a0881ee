"""One device's share of N-device patch parallelism, run on one device without the others.

`SimulatedPatchContext` is `PatchContext` with each collective replaced by a local stand-in that
returns what an interior device of an N-device `patch` mesh would receive, in shape and dtype:
  halo     (B, r, W, C) rows from above and from below: this device's own edge rows, swapped;
  kv       (2, B, N, T, heads, D) the K/V blocks of all N patches: this device's block, tiled N times;
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

from sharding.contexts.patch import PatchContext
from sharding.exchange import halo


def halo_standin(edges: halo.Halo) -> halo.Halo:
  """(top, bottom) edge rows → (from above, from below), each (B, r, W, C) like `halo.exchange`."""
  top, bottom = edges
  return lax.optimization_barrier((bottom, top))


def kv_standin(fresh_2btnd: jax.Array, num_patches: int) -> jax.Array:
  """(2, B, T, heads, D) → (2, B, N, T, heads, D) like `kv.exchange` over N devices."""
  return lax.optimization_barrier(jnp.repeat(fresh_2btnd[:, :, None], num_patches, axis=2))


def moments_standin(moments_bg2: jax.Array, num_patches: int) -> jax.Array:
  """(B, G, 2) → (N, B, G, 2) like `groupnorm.exchange` over N devices."""
  return lax.optimization_barrier(jnp.repeat(moments_bg2[None], num_patches, axis=0))


@dataclasses.dataclass(frozen=True)
class SimulatedPatchContext(PatchContext):
  """An interior device of `num_patches` row patches, run on a mesh whose `patch` axis has size 1."""

  def _exchange_halo(self, edges: halo.Halo) -> halo.Halo:
    return halo_standin(edges)

  def _exchange_kv(self, fresh_2btnd: jax.Array) -> jax.Array:
    return kv_standin(fresh_2btnd, self.num_patches)

  def _exchange_moments(self, moments_bg2: jax.Array) -> jax.Array:
    return moments_standin(moments_bg2, self.num_patches)
