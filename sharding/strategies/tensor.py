"""`tensor`: Megatron-style tensor parallelism, exact.

Every device holds the whole image and a slice of every inner width (models/layers.py:
INNER_WIDTHS): its share of each attention's heads, of each feed-forward's inner width and of
each UNet resnet's hidden channels, placed by Megatron's rule table (`AxisRules.tensor()`). Each
column-parallel / row-parallel pair (q/k/v → to_out, proj_in → proj_out, conv1 → conv2) ends in
one all-reduce of the row-parallel layer's partial output (sharding/contexts/tensor.py), so a
UNet transformer block reduces three times and a resnet once; a DiT block twice. The mesh's
`tensor` size must divide every head count and inner width (`validate` names the valid sizes).

Tensor parallelism composes with the other image strategies on one mesh: exact, displaced,
naive, ulysses and ring take a `tensor` axis too (their contexts wrapped by `over_tensor`), as
every strategy takes `data` and `cfg`; this one is the pure method, rows unsplit.
"""

import dataclasses

from models.parallel import SINGLE_DEVICE
from sharding.accounting import analytic
from sharding.axes import TENSOR
from sharding.contexts.tensor import over_tensor
from sharding.strategies.base import Phase, Strategy


@dataclasses.dataclass(frozen=True)
class Tensor(Strategy):
  name = "tensor"
  description = "Megatron tensor parallelism: heads and inner channels split, partial sums all-reduced, exact"
  axes = frozenset({TENSOR})
  method_axis = TENSOR

  def phases(self, num_steps, sizes, *, simulated=False):
    context = over_tensor(SINGLE_DEVICE, sizes)
    return [Phase(0, num_steps, lambda stale: context)]

  def expected_traffic(self, config, height, width, sizes, batch, activation_bytes):
    return analytic.bytes_per_step(config, height, width, 1, batch, activation_bytes, tensor=sizes[TENSOR])
