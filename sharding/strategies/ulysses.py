"""`ulysses`: DeepSpeed-Ulysses sequence parallelism, exact.

Each self-attention swaps its token-sharded q, k, v for head-sharded ones with an all-to-all over
`patch`, attends over every token for its heads/n heads, and swaps the output back
(sharding/exchange/alltoall.py). No device holds every token's K/V; every self-attention's head
count must be a multiple of the patch count. On a UNet the convs and GroupNorms exchange as in
`exact`.
"""

import dataclasses

from sharding.accounting import analytic
from sharding.axes import PATCH
from sharding.contexts.sequence import SimulatedUlyssesContext, UlyssesContext
from sharding.strategies.sequence import SequenceParallel


@dataclasses.dataclass(frozen=True)
class Ulysses(SequenceParallel):
  name = "ulysses"
  description = "Ulysses: all-to-all from token- to head-sharded attention and back, exact (heads split)"
  context = UlyssesContext
  simulated_context = SimulatedUlyssesContext
  attention = "alltoall"

  def validate(self, config, height, width, sizes):
    super().validate(config, height, width, sizes)
    patches = sizes[PATCH]
    heads = {site.key: site.heads for site in analytic.exchange_sites(config) if site.kind == "kv"}
    misfit = next((key for key, count in heads.items() if count % patches), None)
    if misfit is None:
      return
    valid = [n for n in config.valid_row_splits(height) if all(count % n == 0 for count in heads.values())]
    raise ValueError(
        f"ulysses splits every self-attention's heads over the patch devices, but patch={patches} does not "
        f"divide the {heads[misfit]} heads of {misfit!r} (this model's self-attention head counts: "
        f"{sorted(set(heads.values()))}): valid patch counts at latent height {height}: {valid}; "
        "or use ring, which takes any head count.")
