"""Transfers along the `stage` axis: a carry handed to the next stage(s), a value broadcast from one stage.

Pipeline methods run different model segments on different stages; what crosses a cut is a
pytree of activations (the UNet's hidden state and skips, a DiT's tokens), sent point to point.
"""

import jax
import jax.numpy as jnp
from jax import lax

from sharding.axes import STAGE


def to_next_stage(tree, stages: int, *, wrap: bool = False):
  """Every stage's `tree` sent to the stage after it; the first stage receives zeros (or, `wrap`,
  the last stage's: a ring)."""
  pairs = [(s, s + 1) for s in range(stages - 1)] + ([(stages - 1, 0)] if wrap else [])
  return jax.tree.map(lambda a: lax.ppermute(a, STAGE, pairs), tree)


def send(tree, source: int, destination: int):
  """`tree` of stage `source` delivered to stage `destination` (every other stage receives zeros)."""
  return jax.tree.map(lambda a: lax.ppermute(a, STAGE, [(source, destination)]), tree)


def deliver(tree, source: int, destinations):
  """`tree` of stage `source` delivered to each of `destinations` (one permute each; every other stage
  receives zeros)."""
  first, *rest = destinations
  received = send(tree, source, first)
  for destination in rest:  # a permute has one destination per source: the others' arrive apart
    received = jax.tree.map(jnp.add, received, send(tree, source, destination))
  return received


def broadcast_from_stage(tree, source: int):
  """Stage `source`'s `tree` on every stage (an all-reduce of it masked to that stage)."""
  mine = lax.axis_index(STAGE) == source
  return jax.tree.map(lambda a: lax.psum(jnp.where(mine, a, jnp.zeros_like(a)), STAGE), tree)


def to_previous_stage(tree, stages: int):
  """Every stage's `tree` sent to the stage before it (a backward pass's gradients); the last
  stage receives zeros."""
  pairs = [(s + 1, s) for s in range(stages - 1)]
  return jax.tree.map(lambda a: lax.ppermute(a, STAGE, pairs), tree)


def gather_from_stages(tree):
  """Every stage's `tree` on every stage, stacked in stage order (S, …): what each stage made this tick,
  for any stage to read later (DiffusionPipe's frozen-layer pieces)."""
  return jax.tree.map(lambda a: lax.all_gather(a, STAGE), tree)
