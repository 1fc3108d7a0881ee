"""What the sequence-parallel strategies share: synchronous steps whose context answers `attend` its way.

Tokens are split over the mesh axis `patch` as for the row-patch strategies (the same row check);
every step runs one synchronous context (sharding/contexts/sequence.py), so there is no warm-up
and no stale state, and the traffic is that of `exact` with self-attention's K/V gather replaced
by the method's own exchange (`attention`, a kind of sharding/accounting/analytic.py).
"""

import dataclasses
from typing import ClassVar

from sharding.accounting import analytic
from sharding.axes import PATCH, TENSOR
from sharding.contexts.sequence import SequenceContext
from sharding.contexts.tensor import over_tensor
from sharding.strategies.base import Phase
from sharding.strategies.patch import RowPatches


@dataclasses.dataclass(frozen=True)
class SequenceParallel(RowPatches):
  """A sequence method: its context (and its one-device simulation) and its attention traffic kind."""

  context: ClassVar[type[SequenceContext]]
  simulated_context: ClassVar[type[SequenceContext]]
  attention: ClassVar[str]

  def phases(self, num_steps, sizes, *, simulated=False):
    context = over_tensor((self.simulated_context if simulated else self.context)(sizes[PATCH]), sizes)
    return [Phase(0, num_steps, lambda stale: context)]

  def expected_traffic(self, config, height, width, sizes, batch, activation_bytes):
    return analytic.bytes_per_step(config, height, width, sizes[PATCH], batch, activation_bytes,
                                   attention=self.attention, tensor=sizes[TENSOR])
