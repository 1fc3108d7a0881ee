"""PipeFusion's parallel context: a patch's self-attention over a per-layer, full-sequence K/V buffer.

PipeFusion (Wang, Fang et al.) splits the image into M row patches that flow through the stages
one after another. Each stage keeps, for each of its self-attention layers, the K/V of the whole
sequence; a patch writes its fresh K/V into its own slice and attends over the whole buffer, in
which the patches before it are this step's and the ones after it the previous step's — so no
stage waits for the rest of the image. The buffers are the scan carry of the sampling loop.

Only image tokens live in the buffer (cross-attention to text never asks the context), so a
model that attends over text and image tokens together cannot shift the slices (xDiT #600).

Shape letters: B batch, T a patch's tokens, S the sequence (M·T tokens), N heads, D head width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
from jax import lax

from models.parallel import ParallelContext
from sharding.exchange import kv


@dataclasses.dataclass(frozen=True)
class PipeFusionContext(ParallelContext):
  """One patch of `num_patches` row patches, attending over stale-or-fresh full-sequence K/V.

  Attributes:
    num_patches: M, the row patches of the image.
    patch: which patch the layer's input is (may be traced).
    buffers: {layer key: (2, B, S, N, D) K/V of the whole sequence}; None when the input is the whole
      image (warm-up): attention is then exact and its K/V fills the buffers (sent).
  """

  num_patches: int
  patch: jax.Array | int = 0
  buffers: Mapping[str, jax.Array] | None = None

  def attend(self, q_btnd, k_btnd, v_btnd, key):
    fresh = kv.stack(k_btnd, v_btnd)  # 2, B, T, N, D
    if self.buffers is None:
      return jax.nn.dot_product_attention(q_btnd, k_btnd, v_btnd), fresh  # the whole image: exact
    if key not in self.buffers:
      raise ValueError(f"no K/V buffer for layer {key!r}: the model changed between steps.")
    tokens = fresh.shape[2]
    buffer = lax.dynamic_update_slice_in_dim(self.buffers[key], fresh, self.patch * tokens, axis=2)  # 2, B, S, N, D
    return jax.nn.dot_product_attention(q_btnd, buffer[0], buffer[1]), buffer  # B, T, N, D

  def token_extent(self, local_rows):
    if self.buffers is None:
      return 0, local_rows  # the whole image
    return self.patch * local_rows, local_rows * self.num_patches
