"""What the sequence-parallel strategies share: synchronous steps whose context answers `attend` its way.

Tokens are split over the mesh axis `patch` (usp: over `patch` × `ulysses`) as for the row-patch
strategies (the same row check); every step runs one synchronous context
(sharding/contexts/sequence.py), so there is no warm-up and no stale state, and the traffic is
that of `exact` with self-attention's K/V gather replaced by the method's own exchange
(`attention`, a kind of sharding/accounting/analytic.py).
"""

import dataclasses
from collections.abc import Mapping
from typing import ClassVar

from sharding.accounting import analytic
from sharding.axes import PATCH, TENSOR
from sharding.contexts.sequence import SequenceContext
from sharding.contexts.tensor import over_tensor
from sharding.strategies.base import Phase, Strategy


@dataclasses.dataclass(frozen=True)
class SequenceParallel(Strategy):
  """A sequence method: its context (and its one-device simulation) and its attention traffic kind."""

  axes = frozenset({PATCH, TENSOR})  # a `tensor` axis composes (sharding/contexts/tensor.py)
  method_axis = PATCH
  context: ClassVar[type[SequenceContext]]
  simulated_context: ClassVar[type[SequenceContext]]
  attention: ClassVar[str]

  def token_blocks(self, sizes: Mapping[str, int]) -> int:
    """How many token blocks (devices) one image's tokens are split into."""
    return sizes[PATCH]

  def ulysses_degree(self, sizes: Mapping[str, int]) -> int:
    """Devices of one all-to-all group: each holds heads/this many heads while attending."""
    return 1

  def validate(self, config, height, width, sizes):
    super().validate(config, height, width, sizes)
    config.check_latent_size(height, width, row_splits=self.token_blocks(sizes))

  def _context(self, sizes, simulated: bool) -> SequenceContext:
    return over_tensor((self.simulated_context if simulated else self.context)(self.token_blocks(sizes)), sizes)

  def phases(self, num_steps, sizes, *, simulated=False):
    context = self._context(sizes, simulated)
    return [Phase(0, num_steps, lambda stale: context)]

  def expected_traffic(self, config, height, width, sizes, batch, activation_bytes):
    return analytic.bytes_per_step(config, height, width, self.token_blocks(sizes), batch, activation_bytes,
                                   attention=self.attention, tensor=sizes[TENSOR], ulysses=self.ulysses_degree(sizes))

  def collectives_per_step(self, config, kinds, sizes):
    return analytic.collectives_per_step(config, kinds, self.token_blocks(sizes), self.ulysses_degree(sizes))


def self_attention_heads(config) -> dict[str, int]:
  """{layer key: heads} of every self-attention of the model."""
  return {site.key: site.heads for site in analytic.exchange_sites(config) if site.kind == "kv"}


def check_head_split(config, strategy: str, axis: str, degree: int, valid: str, alternative: str) -> None:
  """Raises ValueError when `degree` devices of `axis` do not divide every self-attention's heads.

  `valid` names the degrees that fit (e.g. "valid patch counts at latent height 48: [1, 2, 4]"),
  `alternative` another way out (e.g. "or use ring, which takes any head count").
  """
  heads = self_attention_heads(config)
  misfit = next((key for key, count in heads.items() if count % degree), None)
  if misfit is not None:
    raise ValueError(
        f"{strategy} splits every self-attention's heads over the {axis} devices, but {axis}={degree} does not "
        f"divide the {heads[misfit]} heads of {misfit!r} (this model's self-attention head counts: "
        f"{sorted(set(heads.values()))}): {valid}; {alternative}.")


def divides_heads(config, degree: int) -> bool:
  """Whether `degree` devices split every self-attention's heads evenly."""
  return all(count % degree == 0 for count in self_attention_heads(config).values())
