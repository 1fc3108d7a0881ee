"""The row-patch strategies: `exact`, `displaced` (DistriFusion) and `naive`.

The latent's rows are split over the mesh axis `patch`; every patch must keep whole rows at the
model's coarsest resolution (`config.row_granularity`).
  exact      synchronous patch parallelism: every layer exchanges this step's halos, K/V and
             GroupNorm moments and uses them at once; the same maths as one device.
  displaced  DistriFusion: after the first step and `warmup_steps` synchronous ones, every layer
             uses the previous step's exchanges (the scan carry) and sends this step's for the
             next, so no collective but the input conv's small halo (this step's latent rows, as
             in the authors' code) has a consumer inside the step.
  naive      independent patches, no communication: the quality baseline.
Each composes with tensor parallelism on the same mesh (a `tensor` axis, sharding/contexts/tensor.py).
"""

import dataclasses

from models.parallel import SINGLE_DEVICE
from sharding.accounting import analytic
from sharding.axes import PATCH, TENSOR
from sharding.contexts.patch import PatchContext
from sharding.contexts.simulated import SimulatedPatchContext
from sharding.contexts.tensor import over_tensor
from sharding.exchange.groupnorm import GroupNormMode
from sharding.strategies.base import Phase, Strategy

_STALE_MOMENT_MODES = (GroupNormMode.STALE, GroupNormMode.CORRECTED_ASYNC)  # modes that carry moments


@dataclasses.dataclass(frozen=True)
class RowPatches(Strategy):
  """What the row-patch strategies share: the `patch` axis (and `tensor`) and its row-split check."""

  axes = frozenset({PATCH, TENSOR})
  method_axis = PATCH

  def validate(self, config, height, width, sizes):
    super().validate(config, height, width, sizes)
    config.check_latent_size(height, width, row_splits=sizes[PATCH])


def _patch_context(sizes, simulated: bool, groupnorm: GroupNormMode = GroupNormMode.SYNC, records: bool = False):
  """stale → the patch context of a mesh of `sizes` (or its one-device simulation)."""
  context = SimulatedPatchContext if simulated else PatchContext
  return lambda stale: over_tensor(context(sizes[PATCH], groupnorm, stale, records or stale is not None), sizes)


@dataclasses.dataclass(frozen=True)
class Exact(RowPatches):
  name = "exact"
  description = "synchronous patch parallelism: every exchange used at once, the same maths as one device"

  def phases(self, num_steps, sizes, *, simulated=False):
    return [Phase(0, num_steps, _patch_context(sizes, simulated))]

  def expected_traffic(self, config, height, width, sizes, batch, activation_bytes):
    return analytic.bytes_per_step(config, height, width, sizes[PATCH], batch, activation_bytes,
                                   tensor=sizes[TENSOR])


@dataclasses.dataclass(frozen=True)
class Displaced(RowPatches):
  """DistriFusion. After the first step and `warmup_steps` synchronous ones, use stale values.

  Attributes:
    warmup_steps: synchronous steps after the first (which is always synchronous).
    groupnorm: how displaced steps combine GroupNorm moments (sharding/exchange/groupnorm.py).
  """

  warmup_steps: int = 4
  groupnorm: GroupNormMode | str = GroupNormMode.CORRECTED_ASYNC

  name = "displaced"
  description = "DistriFusion: stale neighbour activations after a synchronous warm-up, communication overlapped"

  def __post_init__(self):
    if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
      raise ValueError(f"warmup_steps={self.warmup_steps!r} must be an integer ≥ 0.")
    object.__setattr__(self, "groupnorm", GroupNormMode.parse(self.groupnorm))

  def phases(self, num_steps, sizes, *, simulated=False):
    synchronous = min(num_steps, 1 + self.warmup_steps)
    if synchronous == num_steps:
      return [Phase(0, num_steps, _patch_context(sizes, simulated, self.groupnorm))]
    return [
        Phase(0, synchronous, _patch_context(sizes, simulated, self.groupnorm, records=True), records=True),
        Phase(synchronous, num_steps, _patch_context(sizes, simulated, self.groupnorm), uses_stale=True, records=True),
    ]

  def expected_traffic(self, config, height, width, sizes, batch, activation_bytes):
    volume = analytic.bytes_per_step(config, height, width, sizes[PATCH], batch, activation_bytes,
                                     tensor=sizes[TENSOR])
    if self.groupnorm is GroupNormMode.SEPARATE:
      volume.pop("moments", None)
    return volume

  def overlapped_kinds(self):
    return frozenset({"halo", "kv"} | ({"moments"} if self.groupnorm in _STALE_MOMENT_MODES else set()))

  def stale_bytes(self, config, height, width, sizes, batch, activation_bytes, text_tokens=0):
    del text_tokens  # nothing of the text is stale
    return analytic.stale_bytes(config, height, width, sizes[PATCH], batch, activation_bytes,
                                stale_moments=self.groupnorm in _STALE_MOMENT_MODES, tensor=sizes[TENSOR])

  def options(self):
    return f"warm-up {self.warmup_steps}, {self.groupnorm.value}"


@dataclasses.dataclass(frozen=True)
class Naive(RowPatches):
  name = "naive"
  description = "independent patches, no communication: the quality baseline"

  def phases(self, num_steps, sizes, *, simulated=False):
    return [Phase(0, num_steps, lambda stale: over_tensor(SINGLE_DEVICE, sizes))]  # each patch is its own image

  def expected_traffic(self, config, height, width, sizes, batch, activation_bytes):  # only the tensor reduces
    if sizes[TENSOR] == 1:
      return {}
    return analytic.tensor_bytes(config, height, width, sizes[PATCH], batch, activation_bytes, sizes[TENSOR])
