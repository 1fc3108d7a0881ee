"""The parallel context of row-patch parallelism (exact and DistriFusion's displaced).

Each request (halo rows, K/V, GroupNorm moments) is answered in one of two ways:
  synchronous (`stale is None`): exchange this step's values and use them at once;
  displaced (`stale` given): use what the previous step exchanged, and exchange this step's
    values for the next step only, so no collective has a consumer inside the step and XLA can
    overlap them all with compute.
Whatever a step exchanges for the next one goes into `record`, a dict the caller creates and
reads after the model call: the sampling loop makes it the carry of its `lax.scan`.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from sharding import groupnorm, halo, kv
from sharding.context import ParallelContext
from sharding.groupnorm import GroupNormMode


@dataclasses.dataclass(frozen=True)
class PatchContext(ParallelContext):
  """Rows split over mesh axis `axis` into `num_patches` equal patches.

  Attributes:
    stale: for displaced steps, {layer key: what the previous step exchanged}; None for
      synchronous steps.
    record: when not None, filled with {layer key: exchanged values} for the next step.
  """

  axis: str
  num_patches: int
  groupnorm: GroupNormMode = GroupNormMode.SYNC
  stale: dict[str, Any] | None = None
  record: dict[str, Any] | None = None

  def __post_init__(self):
    if self.stale is not None and self.record is None:
      raise ValueError("a displaced PatchContext needs `record`: its exchanges feed the next step.")

  def _exchanged(self, key: str, fresh, exchange: Callable[[Any], Any]):
    """This layer's exchanged values: this step's (synchronous) or the previous step's."""
    if key in (self.record or {}):
      raise ValueError(f"layer key {key!r} was used twice in one model call; keys must be unique.")
    if self.stale is None:
      gathered = exchange(fresh)
      if self.record is not None:
        self.record[key] = gathered
      return gathered
    if key not in self.stale:
      raise ValueError(f"no stale activations for layer {key!r}: the model changed between steps.")
    self.record[key] = exchange(fresh)
    return self.stale[key]

  # The three collectives; `SimulatedPatchContext` replaces just these with local stand-ins.
  def _exchange_halo(self, edges: halo.Halo) -> halo.Halo:
    return halo.exchange(edges, self.axis, self.num_patches)

  def _exchange_kv(self, fresh_2btc: jax.Array) -> jax.Array:
    return kv.exchange(fresh_2btc, self.axis)

  def _exchange_moments(self, moments_bg2: jax.Array) -> jax.Array:
    return groupnorm.exchange(moments_bg2, self.axis)

  def halo_rows(self, x_bhwc: jax.Array, rows: int, key: str) -> jax.Array:
    received = self._exchanged(key, halo.edge_rows(x_bhwc, rows), self._exchange_halo)
    return halo.attach(x_bhwc, received)  # B, h+2r, W, C

  def attention_kv(self, k_btc: jax.Array, v_btc: jax.Array, key: str) -> tuple[jax.Array, jax.Array]:
    fresh = kv.stack(k_btc, v_btc)  # 2, B, T, C
    gathered = self._exchanged(key, fresh, self._exchange_kv)
    return kv.attach(gathered, fresh, self.axis)  # B, n·T, C each

  def group_norm_moments(self, moments_bg2: jax.Array, key: str) -> jax.Array:
    # Synchronous steps (warm-up, exact) are exact whatever the mode.
    mode = self.groupnorm if self.stale is not None else GroupNormMode.SYNC
    exchange = self._exchange_moments
    match self.groupnorm:
      case GroupNormMode.STALE | GroupNormMode.CORRECTED_ASYNC:
        gathered = self._exchanged(key, moments_bg2, exchange)
      case GroupNormMode.SYNC | GroupNormMode.SEPARATE:
        gathered = exchange(moments_bg2) if mode is GroupNormMode.SYNC else None
    return groupnorm.combine(gathered, moments_bg2, self.axis, mode)  # B, G, 2
