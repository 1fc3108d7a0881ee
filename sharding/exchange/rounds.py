"""Point-to-point deliveries packed into rounds, so that each device carries only what it receives.

A pipeline's components send activations to the devices that read them next step, as scan carry.
Under `shard_map` every device's carry has the same shapes, so one buffer per delivery would sit on
every device of `stage` although one device sends it and one reads it. Instead the deliveries
between one (sender, receiver) pair are flattened into one buffer, and the pairs are grouped into
rounds in which each device sends at most one buffer and receives at most one: a round is one
`ppermute` over several pairs, and its buffer (the largest pair's size, smaller ones zero-padded)
is all a device carries for it. A chain of components (a DiT's tokens 0 → 1 → 2 → 3) is one round:
each device carries one token grid instead of N − 1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from jax import lax

from sharding.axes import STAGE


@dataclasses.dataclass(frozen=True)
class Round:
  """One `ppermute`: each pair's deliveries, flattened and concatenated, in a buffer of `size` elements.

  Attributes:
    dtype: the buffer's (deliveries of another dtype go in other rounds).
    size: elements of the buffer (the largest pair's total).
    pairs: (sender, receiver) devices along `stage`; no device twice on either side.
    contents: per pair, the ids of the deliveries it carries, in buffer order.
  """

  dtype: str
  size: int
  pairs: tuple[tuple[int, int], ...]
  contents: tuple[tuple[int, ...], ...]


def plan_rounds(deliveries: Sequence[tuple[int, int, str, int]]) -> tuple[Round, ...]:
  """Rounds for `deliveries` (sender, receiver, dtype, elements), which are identified by their index.

  Greedy: the pairs, largest first, each join the first round of its dtype where neither of its
  devices is busy (pairs of similar size share rounds, so little is padding).
  """
  totals: dict[tuple[int, int, str], list] = {}  # (sender, receiver, dtype) → [elements, ids]
  for k, (sender, receiver, dtype, size) in enumerate(deliveries):
    if sender == receiver:
      raise ValueError(f"delivery {k} goes from device {sender} to itself: only other devices need a permute.")
    entry = totals.setdefault((sender, receiver, dtype), [0, []])
    entry[0] += size
    entry[1].append(k)
  rounds: list[dict] = []
  for (sender, receiver, dtype), (size, ids) in sorted(totals.items(), key=lambda item: (-item[1][0], item[0])):
    free = (r for r in rounds if r["dtype"] == dtype and all(sender != s and receiver != d for s, d in r["pairs"]))
    chosen = next(free, None)
    if chosen is None:
      chosen = {"dtype": dtype, "pairs": [], "contents": [], "size": 0}
      rounds.append(chosen)
    chosen["pairs"].append((sender, receiver))
    chosen["contents"].append(tuple(ids))
    chosen["size"] = max(chosen["size"], size)
  return tuple(Round(r["dtype"], r["size"], tuple(r["pairs"]), tuple(r["contents"])) for r in rounds)


def packed(rounds: Sequence[Round], values: Mapping[int, jnp.ndarray], here, *, by_receiver: bool = False):
  """Each round's buffer on this device (`here`, its traced index along `stage`): the deliveries it
  sends in that round (`by_receiver`: those it received), from `values` {delivery id: array}, which
  hold them on the devices that do; zeros on a device without a pair in the round."""
  buffers = []
  for round_ in rounds:
    buffer = jnp.zeros((round_.size,), round_.dtype)
    for (sender, receiver), ids in zip(round_.pairs, round_.contents):
      flat = jnp.concatenate([jnp.ravel(values[k]) for k in ids])
      mine = here == (receiver if by_receiver else sender)
      buffer = jnp.where(mine, jnp.pad(flat, (0, round_.size - flat.size)), buffer)
    buffers.append(buffer)
  return tuple(buffers)


def exchange(rounds: Sequence[Round], buffers: Sequence[jnp.ndarray]):
  """Every round's buffer sent to its receivers: one `ppermute` each (devices without a sender get zeros)."""
  return tuple(lax.ppermute(b, STAGE, list(r.pairs)) for r, b in zip(rounds, buffers))


def unpacked(rounds: Sequence[Round], buffers: Sequence[jnp.ndarray], device: int,
             shapes: Mapping[int, tuple[int, ...]]) -> dict[int, jnp.ndarray]:
  """{delivery id: array of `shapes[id]`} of what `device` (static) received in `buffers`."""
  received = {}
  for round_, buffer in zip(rounds, buffers):
    for (_, receiver), ids in zip(round_.pairs, round_.contents):
      if receiver != device:
        continue
      offset = 0
      for k in ids:
        n = int(np.prod(shapes[k], dtype=np.int64))
        received[k] = buffer[offset:offset + n].reshape(shapes[k])
        offset += n
  return received
