"""`ring`: ring attention, exact.

Each self-attention passes K/V blocks around the `patch` devices (n−1 `ppermute`s), attends to
each block as it arrives and merges the blocks' results by log-sum-exp in fp32
(sharding/exchange/ring.py): any head count, one K/V block resident at a time instead of all n.
On a UNet the convs and GroupNorms exchange as in `exact`.
"""

import dataclasses

from sharding.contexts.sequence import RingContext, SimulatedRingContext
from sharding.strategies.sequence import SequenceParallel


@dataclasses.dataclass(frozen=True)
class Ring(SequenceParallel):
  name = "ring"
  description = "ring attention: K/V blocks rotated around the patch devices, log-sum-exp merged, exact"
  context = RingContext
  simulated_context = SimulatedRingContext
  attention = "ring"
