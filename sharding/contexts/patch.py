"""The parallel context of row-patch parallelism (exact and DistriFusion's displaced).

Rows are split over the mesh axis `patch` into equal patches. Each request (halo rows, K/V,
GroupNorm moments) is answered in one of two ways:
  synchronous (`stale is None`): exchange this step's values and use them at once;
  displaced (`stale` given): use what the previous step exchanged, and exchange this step's
    values for the next step only, so no collective has a consumer inside the step and XLA can
    overlap them all with compute.
What a step exchanges for the next one is the `sent` part of each request's answer
(models/parallel.py): the sampling loop collects it and makes it the carry of its `lax.scan`.
The model's input conv (`input_halo`) is the one exchange that is synchronous in every step: its
few latent channels are cheap, and fresh input rows are what DistriFusion's authors' code uses.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
from jax import lax

from models.parallel import ParallelContext, Sent
from sharding.axes import PATCH
from sharding.exchange import groupnorm, halo, kv
from sharding.exchange.groupnorm import GroupNormMode


@dataclasses.dataclass(frozen=True)
class PatchContext(ParallelContext):
  """Rows split over mesh axis `patch` into `num_patches` equal patches.

  Attributes:
    groupnorm: how displaced steps combine GroupNorm moments (synchronous steps are exact).
    stale: displaced steps: {layer key: what the previous step sent}; None for synchronous steps.
    records: synchronous steps send their exchanges for the next step too (the warm-up before
      displaced steps); displaced steps always do.
    axis: the mesh axis (or axes, outer first, as one) the rows are split over.
  """

  axis: ClassVar[str | tuple[str, ...]] = PATCH

  num_patches: int
  groupnorm: GroupNormMode = GroupNormMode.SYNC
  stale: Mapping[str, Any] | None = None
  records: bool = False

  def __post_init__(self):
    if self.stale is not None and not self.records:
      raise ValueError("a displaced PatchContext (stale given) sends its exchanges for the next step: "
                       "pass records=True.")

  def _exchanged(self, key: str, fresh, exchange: Callable[[Any], Any]) -> tuple[Any, Sent | None]:
    """(this layer's exchanged values to use, what it sends for the next step)."""
    if self.stale is None:
      gathered = exchange(fresh)
      return gathered, gathered if self.records else None
    if key not in self.stale:
      raise ValueError(f"no stale activations for layer {key!r}: the model changed between steps.")
    return self.stale[key], exchange(fresh)

  # The three collectives; `SimulatedPatchContext` replaces just these with local stand-ins.
  def _exchange_halo(self, edges: halo.Halo) -> halo.Halo:
    return halo.exchange(edges, self.axis, self.num_patches)

  def _exchange_kv(self, fresh_2btnd: jax.Array) -> jax.Array:
    return kv.exchange(fresh_2btnd, self.axis)

  def _exchange_moments(self, moments_bg2: jax.Array) -> jax.Array:
    return groupnorm.exchange(moments_bg2, self.axis)

  def conv_halo(self, x_bhwc, rows, key):
    received, sent = self._exchanged(key, halo.edge_rows(x_bhwc, rows), self._exchange_halo)
    return halo.attach(x_bhwc, received), sent  # B, h+2r, W, C

  def input_halo(self, x_bhwc, rows, key):
    received = self._exchange_halo(halo.edge_rows(x_bhwc, rows))  # this step's rows, in every step
    return halo.attach(x_bhwc, received), None  # B, h+2r, W, C

  def attend(self, q_btnd, k_btnd, v_btnd, key):
    fresh = kv.stack(k_btnd, v_btnd)  # 2, B, T, N, D
    gathered, sent = self._exchanged(key, fresh, self._exchange_kv)
    k_bsnd, v_bsnd = kv.attach(gathered, fresh, self.axis)  # B, n·T, N, D each
    return jax.nn.dot_product_attention(q_btnd, k_bsnd, v_bsnd), sent  # B, T, N, D

  def norm_moments(self, moments_bg2, key):
    # Synchronous steps (warm-up, exact) are exact whatever the mode.
    mode = self.groupnorm if self.stale is not None else GroupNormMode.SYNC
    match self.groupnorm:
      case GroupNormMode.STALE | GroupNormMode.CORRECTED_ASYNC:
        gathered, sent = self._exchanged(key, moments_bg2, self._exchange_moments)
      case GroupNormMode.SYNC | GroupNormMode.SEPARATE:
        gathered, sent = (self._exchange_moments(moments_bg2) if mode is GroupNormMode.SYNC else None), None
    return groupnorm.combine(gathered, moments_bg2, self.axis, mode), sent  # B, G, 2

  def token_extent(self, local_rows):
    return lax.axis_index(self.axis) * local_rows, local_rows * self.num_patches
