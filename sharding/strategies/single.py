"""`single`: the whole image on every device, no communication within an image.

The reference every exact strategy is checked against. The mesh may still split the batch
(`data`) and the guidance halves (`cfg`); it must not split the image.
"""

import dataclasses

from models.parallel import SINGLE_DEVICE
from sharding.strategies.base import Phase, Strategy


@dataclasses.dataclass(frozen=True)
class Single(Strategy):
  name = "single"
  description = "the whole image on each device (the reference of every exact strategy)"

  def phases(self, num_steps, sizes, *, simulated=False):
    return [Phase(0, num_steps, lambda stale: SINGLE_DEVICE)]
