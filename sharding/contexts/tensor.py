"""The parallel context of tensor parallelism: another method's context, with channels split over `tensor`.

Megatron-style: the mesh axis `tensor` splits the inner widths (models/layers.py: INNER_WIDTHS,
attention heads, feed-forward and resnet hidden channels), so each device runs every layer on its
slice of those widths. Two requests need the other slices:
  reduce_partial_sums  a row-parallel layer's partial output, summed over `tensor` (all-reduce);
  norm_group_moments   GroupNorm moments of groups whose channels straddle devices.
Every other request (halo rows, K/V, image-wide GroupNorm moments, token extent) concerns the
image's rows, not its channels, and is answered by `inner`: the context of the method that splits
the image (patch, displaced, Ulysses, ring), or the single-device context. So `tensor` composes
with each of them, and its stale state, unchanged; both reductions are synchronous in every step.
"""

import dataclasses

from models.parallel import SINGLE_DEVICE, ParallelContext
from sharding.axes import TENSOR
from sharding.exchange import channels


@dataclasses.dataclass(frozen=True)
class TensorContext(ParallelContext):
  """`inner`'s answers for the image's rows; the channel slices reduced over `tensor` (`num_shards` devices)."""

  num_shards: int
  inner: ParallelContext = SINGLE_DEVICE

  def reduce_partial_sums(self, y, key):
    return channels.reduce(y, TENSOR), None

  def norm_group_moments(self, moments_bg2, parts, key):
    return channels.group_moments(moments_bg2, parts, TENSOR), None  # B, G, 2

  def conv_halo(self, x_bhwc, rows, key):
    return self.inner.conv_halo(x_bhwc, rows, key)

  def input_halo(self, x_bhwc, rows, key):
    return self.inner.input_halo(x_bhwc, rows, key)

  def norm_moments(self, moments_bg2, key):
    return self.inner.norm_moments(moments_bg2, key)

  def attend(self, q_btnd, k_btnd, v_btnd, key):
    return self.inner.attend(q_btnd, k_btnd, v_btnd, key)

  def token_extent(self, local_rows):
    return self.inner.token_extent(local_rows)


def over_tensor(inner: ParallelContext, sizes) -> ParallelContext:
  """`inner` with the mesh's `tensor` axis applied: itself when the axis has size 1."""
  return inner if sizes[TENSOR] == 1 else TensorContext(sizes[TENSOR], inner)
