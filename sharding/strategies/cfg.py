"""Classifier-free guidance, optionally split over the `cfg` axis.

The unconditional and conditional halves of the batch form a leading "pair" axis of size 2; a
mesh with cfg=2 puts each half on its own device group. Every image strategy composes with it:
after the model call each device holds its share of the pair, and one all-gather per step gives
every device both noise predictions. Unguided runs (guidance scale 1) carry a pair of one.

Shape letters: P pair share, B batch, h rows, W columns, C channels.
"""

import dataclasses
from collections.abc import Mapping

import jax
from jax import lax
from jax.sharding import PartitionSpec as P

from sharding.axes import CFG, DATA


@dataclasses.dataclass(frozen=True)
class Guidance:
  """Whether the run is guided, and over how many `cfg` device groups the pair is split."""

  guided: bool
  groups: int = 1

  @classmethod
  def for_mesh(cls, guided: bool, sizes: Mapping[str, int]) -> "Guidance":
    if not guided and sizes[CFG] > 1:
      raise ValueError(f"the mesh splits guidance over cfg={sizes[CFG]} devices, but guidance_scale=1 runs "
                       "no unconditional half: use a mesh with cfg=1 or a guidance_scale ≠ 1.")
    return cls(guided, sizes[CFG])

  @property
  def pair_size(self) -> int:
    return 2 if self.guided else 1

  def pair_spec(self) -> P:
    """The (pair, batch, …) conditioning's layout: halves over cfg when it splits them, batch over data."""
    return P(CFG if self.groups > 1 else None, DATA)

  def combine(self, eps_pbhwc: jax.Array, guidance_scale: jax.Array) -> jax.Array:
    """This device's share of the (uncond, cond) predictions → the guided prediction (B, h, W, C)."""
    if not self.guided:
      return eps_pbhwc[0]
    if self.groups > 1:  # the other half was computed by the other `cfg` device group
      # Invariant over `cfg`: both groups then hold, and update, the same latents.
      eps_pbhwc = lax.all_gather(eps_pbhwc, CFG, axis=0, tiled=True, to="invarying")  # 2, B, h, W, C
    uncond, cond = eps_pbhwc[0], eps_pbhwc[1]
    return uncond + guidance_scale * (cond - uncond)  # B, h, W, C

  def expected_traffic(self, prediction_values: int, activation_bytes: int) -> dict[str, int]:
    """Bytes a device receives per step: the other group's prediction of its (B, h, W, C) share."""
    return {"guidance": prediction_values * activation_bytes} if self.groups > 1 else {}
