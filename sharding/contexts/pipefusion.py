"""PipeFusion's parallel context: a patch's self-attention over a per-layer, full-sequence K/V buffer.

PipeFusion (Wang, Fang et al.) splits the image into M row patches that flow through the stages
one after another. Each stage keeps, for each of its self-attention layers, the K/V of the whole
sequence; a patch writes its fresh K/V into its own slice and attends over the whole buffer, in
which the patches before it are this step's and the ones after it the previous step's — so no
stage waits for the rest of the image. The buffers are the scan carry of the sampling loop.

Inside a stage, a patch's tokens may be split again over sequence ranks (`SequenceSplit`):
`ulysses` devices swap tokens for heads with all-to-alls (sharding/exchange/alltoall.py) and
`patch` devices (the ring degree) gather the fresh K/V blocks. Either way every rank writes the
*whole* patch's fresh K/V into its buffer (for its heads): a buffer holding only the rank's own
tokens would miss the other ranks' fresh K/V of this step (xDiT's note on hybrid PipeFusion).

Only image tokens live in the buffer (cross-attention asks the context only for the text's K/V,
which the stage computes in the run's first step and keeps: the text does not change), so a
model that attends over text and image tokens together cannot shift the slices (xDiT #600).

Shape letters: B batch, T a patch's tokens, S the sequence (M·T tokens), N heads, D head width,
R sequence ranks, U of them Ulysses ranks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
from jax import lax

from models.parallel import ParallelContext
from sharding.axes import PATCH, SEQUENCE, ULYSSES
from sharding.exchange import alltoall, kv


@dataclasses.dataclass(frozen=True)
class SequenceSplit:
  """How a stage's tokens are split over its sequence ranks: `ring` devices on `patch` × `ulysses` on
  `ulysses` (patch outer, as USP lays them out: rank p·ulysses + u holds the (p·ulysses + u)-th rows)."""

  ring: int = 1
  ulysses: int = 1

  @property
  def ranks(self) -> int:
    return self.ring * self.ulysses

  @property
  def axes(self) -> tuple[str, ...]:
    """The sequence axes that split (size > 1), outer first: what the stage's tokens vary over."""
    return tuple(axis for axis, size in zip(SEQUENCE, (self.ring, self.ulysses)) if size > 1)

  def rank(self) -> jax.Array | int:
    return lax.axis_index(self.axes) if self.axes else 0

  def local_rows(self, x_bhwc: jax.Array) -> jax.Array:
    """This rank's rows of `x` (B, h, W, C) → (B, h/R, W, C)."""
    if self.ranks == 1:
      return x_bhwc
    rows = x_bhwc.shape[1] // self.ranks
    return lax.dynamic_slice_in_dim(x_bhwc, self.rank() * rows, rows, axis=1)

  def gather_rows(self, x_bhwc: jax.Array) -> jax.Array:
    """Every rank's rows, in order (B, h/R, W, C) → (B, h, W, C), the same on every rank."""
    if self.ranks == 1:
      return x_bhwc
    return lax.all_gather(x_bhwc, self.axes, axis=1, tiled=True, to="invarying")

  def attention_operands(self, q_btnd, k_btnd, v_btnd):
    """(q for this rank's heads, the fresh K/V of every rank's tokens for those heads: 2, B, R·T, N/U, D)."""
    if self.ulysses > 1:  # every token of the ring member's share, N/U heads
      alltoall.check_heads(q_btnd.shape[2], self.ulysses, "a PipeFusion stage's self-attention", ULYSSES)
      q_btnd, k_btnd, v_btnd = (alltoall.to_heads(a, ULYSSES) for a in (q_btnd, k_btnd, v_btnd))
    fresh = kv.stack(k_btnd, v_btnd)  # 2, B, T·U, N/U, D
    if self.ring > 1:  # the other ring members' shares: the whole patch
      fresh = lax.all_gather(fresh, PATCH, axis=2, tiled=True)  # 2, B, R·T, N/U, D
    return q_btnd, fresh

  def attention_output(self, o_btnd):
    return alltoall.to_tokens(o_btnd, ULYSSES) if self.ulysses > 1 else o_btnd  # B, T, N, D


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TextKV:
  """What a cross-attention layer sends in the run's first step: its K/V of the text (2, B, S, N, D),
  the same at every later step, so the stage keeps it for the run (self-attention sends plain buffers)."""

  kv_2bsnd: jax.Array


@dataclasses.dataclass(frozen=True)
class PipeFusionContext(ParallelContext):
  """One patch of `num_patches` row patches, attending over stale-or-fresh full-sequence K/V.

  Attributes:
    num_patches: M, the row patches of the image.
    patch: which patch the layer's input is (may be traced).
    buffers: {layer key: (2, B, S, N/U, D) K/V of the whole sequence}; None when the input is the whole
      image (warm-up): attention is then exact and its K/V fills the buffers (sent).
    sequence: how the stage's tokens are split over its sequence ranks (default: not at all).
    text_kv: {cross-attention layer key: (2, B, S_text, N, D) its K/V of the text}, kept from the run's
      first step; None in that step: the layers compute them and send them (`TextKV`).
  """

  num_patches: int
  patch: jax.Array | int = 0
  buffers: Mapping[str, jax.Array] | None = None
  sequence: SequenceSplit = SequenceSplit()
  text_kv: Mapping[str, jax.Array] | None = None

  def cross_kv(self, context_bse, project, key):
    if self.text_kv is None:  # the run's first step: computed once, kept by the stage for the rest
      k_bsnd, v_bsnd = project(context_bse)
      return (k_bsnd, v_bsnd), TextKV(kv.stack(k_bsnd, v_bsnd))
    if key not in self.text_kv:
      raise ValueError(f"no kept text K/V for cross-attention layer {key!r}: the model changed between steps.")
    kept_2bsnd = self.text_kv[key]
    return (kept_2bsnd[0], kept_2bsnd[1]), None  # the projection (and the text it reads) is not computed

  def attend(self, q_btnd, k_btnd, v_btnd, key):
    q_btnd, fresh = self.sequence.attention_operands(q_btnd, k_btnd, v_btnd)  # fresh: 2, B, T, N/U, D
    if self.buffers is None:
      buffer = fresh  # the whole image: exact
    elif key not in self.buffers:
      raise ValueError(f"no K/V buffer for layer {key!r}: the model changed between steps.")
    else:
      tokens = fresh.shape[2]
      buffer = lax.dynamic_update_slice_in_dim(self.buffers[key], fresh, self.patch * tokens, axis=2)  # 2, B, S, ..
    out = jax.nn.dot_product_attention(q_btnd, buffer[0], buffer[1])
    return self.sequence.attention_output(out), buffer  # B, T, N, D

  def token_extent(self, local_rows):
    ranks = self.sequence.ranks
    first = self.sequence.rank() * local_rows  # within the image (warm-up) or within the patch
    if self.buffers is None:
      return first, local_rows * ranks  # the whole image
    return self.patch * local_rows * ranks + first, local_rows * ranks * self.num_patches
