"""Collectives over channel-split activations (tensor parallelism, mesh axis `tensor`).

  partial sums    a row-parallel layer (attention's `to_out`, a feed-forward's `proj_out`, a
                  resnet's `conv2`) holds a slice of its input width, so its product is a partial
                  sum of the output: one all-reduce (psum) gives every device the whole output.
  group moments   a GroupNorm of a split width whose groups straddle devices (fewer channels per
                  device than per group) has moments of group parts only: the devices' parts are
                  gathered in device order (the width's order) and averaged per group.

Shape letters: B batch, G group parts on this device, n devices.
"""

import jax
import jax.numpy as jnp
from jax import lax

from models.parallel import merge_group_parts


def reduce(partial: jax.Array, axis: str) -> jax.Array:
  """The sum of every device's partial output (all-reduce); the result is the same on every device."""
  return lax.psum(partial, axis)


def group_moments(moments_bg2: jax.Array, parts: int, axis: str) -> jax.Array:
  """This device's group parts' moments (B, G, 2) → their groups' moments, with the parts other devices hold."""
  b, g, _ = moments_bg2.shape
  every_ngb2 = lax.all_gather(moments_bg2, axis)  # n, B, G, 2
  n = every_ngb2.shape[0]
  width_bg2 = jnp.moveaxis(every_ngb2, 0, 1).reshape(b, n * g, 2)  # B, n·G, 2 in the width's order
  merged_bg2 = merge_group_parts(width_bg2, parts)  # B, n·G, 2
  return lax.dynamic_slice_in_dim(merged_bg2, lax.axis_index(axis) * g, g, axis=1)  # B, G, 2
