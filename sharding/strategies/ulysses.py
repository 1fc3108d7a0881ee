"""`ulysses`: DeepSpeed-Ulysses sequence parallelism, exact.

Each self-attention swaps its token-sharded q, k, v for head-sharded ones with an all-to-all over
`patch`, attends over every token for its heads/n heads, and swaps the output back
(sharding/exchange/alltoall.py). No device holds every token's K/V; every self-attention's head
count must be a multiple of the patch count. On a UNet the convs and GroupNorms exchange as in
`exact`.
"""

import dataclasses

from sharding.axes import PATCH
from sharding.contexts.sequence import SimulatedUlyssesContext, UlyssesContext
from sharding.strategies.sequence import SequenceParallel, check_head_split, divides_heads


@dataclasses.dataclass(frozen=True)
class Ulysses(SequenceParallel):
  name = "ulysses"
  description = "Ulysses: all-to-all from token- to head-sharded attention and back, exact (heads split)"
  context = UlyssesContext
  simulated_context = SimulatedUlyssesContext
  attention = "alltoall"

  def ulysses_degree(self, sizes):
    return sizes[PATCH]

  def validate(self, config, height, width, sizes):
    super().validate(config, height, width, sizes)
    valid = [n for n in config.valid_row_splits(height) if divides_heads(config, n)]
    check_head_split(config, self.name, PATCH, sizes[PATCH], f"valid patch counts at latent height {height}: {valid}",
                     "or use ring, which takes any head count")
