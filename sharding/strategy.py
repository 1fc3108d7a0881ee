"""Strategies: which parallel context each denoising step runs with.

A strategy turns a number of steps into phases: consecutive steps that share one parallel
context and so one `lax.scan` body. `displaced` has two: synchronous warm-up steps that record
what they exchange, then displaced steps that use the previous step's exchanges.
"""

import dataclasses
import enum
from collections.abc import Callable
from typing import Any

from sharding.context import SINGLE_DEVICE, ParallelContext
from sharding.groupnorm import GroupNormMode
from sharding.patch_context import PatchContext

PATCH_AXIS = "patch"


class StrategyKind(enum.Enum):
  SINGLE = "single"        # the whole image on each device (data/cfg axes may still split)
  EXACT = "exact"          # synchronous patch parallelism: the same maths as one device
  DISPLACED = "displaced"  # DistriFusion: stale neighbour activations after a warm-up
  NAIVE = "naive"          # independent patches, no communication: the quality baseline


@dataclasses.dataclass(frozen=True)
class Phase:
  """Steps [start, stop) and the context they run with.

  Attributes:
    context: (stale, record) → the step's parallel context.
    uses_stale: the steps consume the previous step's exchanges (the scan carry).
    records: the steps produce exchanges for the next step.
  """

  start: int
  stop: int
  context: Callable[[Any, dict | None], ParallelContext]
  uses_stale: bool = False
  records: bool = False


@dataclasses.dataclass(frozen=True)
class Strategy:
  """How one image's denoising is spread over the `patch` axis. Build with the classmethods."""

  kind: StrategyKind
  warmup_steps: int = 0
  groupnorm: GroupNormMode = GroupNormMode.SYNC

  def __post_init__(self):
    if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
      raise ValueError(f"warmup_steps={self.warmup_steps!r} must be an integer ≥ 0.")
    if self.kind is not StrategyKind.DISPLACED and (self.warmup_steps or self.groupnorm is not GroupNormMode.SYNC):
      raise ValueError(f"warmup_steps and groupnorm apply to the displaced strategy only, not {self.kind.value!r}.")

  @classmethod
  def single(cls) -> "Strategy":
    return cls(StrategyKind.SINGLE)

  @classmethod
  def exact(cls) -> "Strategy":
    return cls(StrategyKind.EXACT)

  @classmethod
  def naive(cls) -> "Strategy":
    return cls(StrategyKind.NAIVE)

  @classmethod
  def displaced(cls, warmup_steps: int = 4, groupnorm: GroupNormMode | str = "corrected_async") -> "Strategy":
    """DistriFusion: after the first step and `warmup_steps` synchronous ones, use stale values."""
    return cls(StrategyKind.DISPLACED, warmup_steps, GroupNormMode.parse(groupnorm))

  @classmethod
  def from_name(cls, name: str, **options) -> "Strategy":
    """Strategy by name ("single", "exact", "displaced", "naive"); options go to its constructor."""
    constructors = {k.value: getattr(cls, k.value) for k in StrategyKind}
    if name not in constructors:
      raise ValueError(f"unknown strategy {name!r}; valid strategies: {', '.join(constructors)}.")
    return constructors[name](**options)

  @property
  def name(self) -> str:
    return self.kind.value

  def check_patches(self, num_patches: int) -> None:
    if self.kind is StrategyKind.SINGLE and num_patches > 1:
      raise ValueError(
          f"strategy 'single' runs the whole image on each device, but the mesh splits rows over "
          f"patch={num_patches} devices: use a mesh with patch=1, or strategy exact/displaced/naive.")

  def phases(self, num_steps: int, num_patches: int) -> list[Phase]:
    """The phases of a `num_steps` run over `num_patches` row patches."""
    self.check_patches(num_patches)

    def patch_context(groupnorm=GroupNormMode.SYNC):
      return lambda stale, record: PatchContext(PATCH_AXIS, num_patches, groupnorm, stale, record)

    match self.kind:
      case StrategyKind.SINGLE | StrategyKind.NAIVE:
        return [Phase(0, num_steps, lambda stale, record: SINGLE_DEVICE)]
      case StrategyKind.EXACT:
        return [Phase(0, num_steps, patch_context())]
      case StrategyKind.DISPLACED:
        synchronous = min(num_steps, 1 + self.warmup_steps)
        if synchronous == num_steps:
          return [Phase(0, num_steps, patch_context(self.groupnorm))]
        return [
            Phase(0, synchronous, patch_context(self.groupnorm), records=True),
            Phase(synchronous, num_steps, patch_context(self.groupnorm), uses_stale=True, records=True),
        ]
      case _:
        raise ValueError(f"unknown strategy kind {self.kind!r}; valid: {[k.value for k in StrategyKind]}")
