"""`usp`: Unified Sequence Parallelism (Fang & Zhao 2024, xDiT's hybrid), Ulysses × ring, exact.

The tokens are split over `patch` × `ulysses` devices (patch outer: device (p, u) holds block
p·ulysses + u). Each self-attention runs Ulysses within the `ulysses` devices (all-to-alls give a
device its ring member's tokens for heads/ulysses heads), ring attention over the `patch` devices
on those (K/V blocks rotated, log-sum-exp merged) and an all-to-all back
(sharding/contexts/sequence.py). Only the Ulysses degree must divide the heads; the ring degree is
free, so any device count fits. With `ulysses` = 1 it is `ring`, with `patch` = 1 `ulysses`.
Ulysses' all-to-alls need the fast links: `make_mesh` puts `ulysses` inside `patch`.
On a UNet the convs and GroupNorms exchange as in `exact`, over both axes.
"""

import dataclasses

from jax.sharding import PartitionSpec as P

from sharding.axes import DATA, PATCH, SEQUENCE, ULYSSES
from sharding.contexts.sequence import SimulatedUspContext, UspContext
from sharding.strategies.sequence import SequenceParallel, check_head_split, divides_heads


@dataclasses.dataclass(frozen=True)
class Usp(SequenceParallel):
  name = "usp"
  description = ("USP: Ulysses all-to-alls within the ulysses axis × ring attention over patch, exact "
                 "(make_mesh(patch=R, ulysses=U))")
  axes = frozenset(SEQUENCE)
  method_axis = PATCH  # its outer sequence axis: the ring over `patch`
  context = UspContext
  simulated_context = SimulatedUspContext
  attention = "usp"

  def token_blocks(self, sizes):
    return sizes[PATCH] * sizes[ULYSSES]

  def ulysses_degree(self, sizes):
    return sizes[ULYSSES]

  def _context(self, sizes, simulated):
    return (self.simulated_context if simulated else self.context)(self.token_blocks(sizes),
                                                                    ulysses=self.ulysses_degree(sizes))

  def latent_spec(self):
    return P(DATA, SEQUENCE)

  def image_splits(self, num_devices):
    """The hybrids of `num_devices`: every ring × Ulysses factorisation with both degrees > 1."""
    return [{PATCH: num_devices // u, ULYSSES: u} for u in range(2, num_devices) if num_devices % u == 0]

  def validate(self, config, height, width, sizes):
    super().validate(config, height, width, sizes)
    blocks = self.token_blocks(sizes)
    valid = [u for u in range(1, blocks + 1) if blocks % u == 0 and divides_heads(config, u)]
    check_head_split(config, self.name, ULYSSES, sizes[ULYSSES],
                     f"valid ulysses degrees for patch × ulysses = {blocks} devices: {valid} (patch = {blocks} / "
                     "ulysses)", "the ring degree (patch) takes any head count")
