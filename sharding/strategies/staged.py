"""What the pipeline strategies share: model segments cut into consecutive stages on the `stage` axis.

AsyncDiff, PipeFusion (and DiffusionPipe's training) cut a model at its segments (models/unet.py,
models/dit.py); stage s runs a consecutive range of them and holds only their params
(sharding/stage_params.py). This module holds the pieces they share: the cut, checked and
balanced by a cost model, and the synchronous pipeline step — every stage in order, the carry sent
to the next stage at each cut — which is the exact computation their warm-up steps run.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from models.build import segment_costs, segment_names
from models.layers import Workload
from models.parallel import call_recording
from sharding.axes import STAGE
from sharding.exchange.stages import broadcast_from_stage, deliver
from sharding.stage_carry import run_stage
from sharding.strategies.base import Strategy
from sharding.varying import varying_like


def segment_flops(config, height: int, width: int, text_tokens: int = 77) -> tuple[float, ...]:
  """Each segment's FLOPs per sample (all kinds summed) for an `height` × `width` latent and
  `text_tokens` text tokens, in call order (the cost model)."""
  latent = Workload(rows=height, cols=width, text_tokens=text_tokens)
  return tuple(float(sum(cost.flops.values())) for cost in segment_costs(config, latent).values())


def balanced_cuts(costs: Sequence[float], stages: int) -> tuple[int, ...]:
  """The `stages − 1` cut indices splitting `costs` into consecutive non-empty parts with the
  smallest largest part (a cut at i starts a part at segment i). Exact, by dynamic programming."""
  n = len(costs)
  if not 1 <= stages <= n:
    raise ValueError(f"cannot cut {n} segments into {stages} stages: use 1 to {n} stages.")
  prefix = [0.0]
  for c in costs:
    prefix.append(prefix[-1] + c)

  @functools.cache
  def best(first: int, parts: int) -> tuple[float, tuple[int, ...]]:
    """(largest part, cuts) of segments[first:] in `parts` parts."""
    if parts == 1:
      return prefix[n] - prefix[first], ()
    options = []
    for cut in range(first + 1, n - parts + 2):
      rest, cuts = best(cut, parts - 1)
      options.append((max(prefix[cut] - prefix[first], rest), (cut, *cuts)))
    return min(options)

  return best(0, stages)[1]


def stages_of(cuts: Sequence[int], segments: int) -> tuple[int, ...]:
  """The stage of each of `segments` segments for cut indices `cuts`."""
  return tuple(sum(i >= c for c in cuts) for i in range(segments))


def check_cuts(cuts: Sequence[int], segment_names: Sequence[str], stages: int) -> None:
  """Raises ValueError, naming the valid choices, unless `cuts` are `stages − 1` increasing segment indices."""
  n = len(segment_names)
  if (len(cuts) != stages - 1 or any(not isinstance(c, int) or isinstance(c, bool) for c in cuts)
      or list(cuts) != sorted(set(cuts)) or (cuts and (cuts[0] < 1 or cuts[-1] > n - 1))):
    named = ", ".join(f"{i} {name}" for i, name in enumerate(segment_names))
    raise ValueError(f"cuts={tuple(cuts)!r} must be {stages - 1} strictly increasing segment indices in 1..{n - 1} "
                     f"for {stages} stages (a cut at i starts a stage at segment i); the model's segments: {named}.")


@dataclasses.dataclass(frozen=True)
class Staged(Strategy):
  """The pipeline family's base: its `stage` axis; subclasses say where the cuts fall (`cuts_for`)."""

  axes = frozenset({STAGE})
  method_axis = STAGE

  def cuts_for(self, config, height: int, width: int, stages: int) -> tuple[int, ...]:
    """The cut indices for `stages` stages of this model at this latent size."""
    raise NotImplementedError

  def stage_count(self, sizes) -> int:
    """How many stages the model is cut into on a mesh of `sizes` (default: one per `stage` device)."""
    return sizes[STAGE]

  def stage_of_segment(self, config, height, width, sizes):
    return stages_of(self.cuts_for(config, height, width, self.stage_count(sizes)), len(segment_names(config)))


def on_stage(here, compute, *operands):
  """`compute(*operands)` on the devices where `here` (a traced bool) holds, zeros of its shapes elsewhere
  (`lax.cond`: each device runs one branch; the zeros marked varying as the result would be)."""
  shapes = jax.eval_shape(compute, *operands)
  idle = lambda *_: jax.tree.map(lambda s: varying_like(jnp.zeros(s.shape, s.dtype), s), shapes)  # noqa: E731
  return lax.cond(here, compute, idle, *operands)


def synchronous_forward(run, stage_of_segment: Sequence[int], x_in, t, cond: dict, ctx, *, record=None,
                        devices: Sequence[int] | None = None):
  """The model's output for `x_in` with every stage in order (see `synchronous_stages`), on every device;
  with `record`, (output, this device's own stage's record)."""
  out, _, kept = synchronous_stages(run, stage_of_segment, x_in, t, cond, ctx, record=record, devices=devices)
  return out if record is None else (out, kept)


def synchronous_stages(run, stage_of_segment: Sequence[int], x_in, t, cond: dict, ctx, *, record=None,
                       devices: Sequence[int] | None = None, cut=None):
  """Every stage in order: stage s runs its segments on the carry stage s − 1 sent, and sends its own on;
  the last stage's output is broadcast to every device.

  Exact (the same maths as one device), and every stage but one waits at each cut: the warm-up of
  the asynchronous methods. Each device runs only its own stage's branch (`lax.cond` on its index).

  Args:
    record: optional `record(stage, sent)` turning what stage `stage`'s layers sent (their context
      requests' `sent`, models/parallel.py) into one pytree shape shared by every stage.
    devices: the stage each device along `stage` runs (default: device s runs stage s); a stage on
      several devices runs on each, and the carry before it reaches each.
    cut: optional (send, receive): `send(carry)` is what a stage's output carry sends over its cut,
      `receive(sent)` the next stage's input carry from it (default: the whole carry crosses).
  Returns:
    (the model output's hidden state on every device; the carry each stage received: entry s is stage
    s's input carry, meaningful on its devices, entry 0 None; this device's own stage's record, or
    None without `record`).
  """
  stages = max(stage_of_segment) + 1
  devices = tuple(range(stages)) if devices is None else tuple(devices)
  mine = jnp.asarray(devices)[lax.axis_index(STAGE)]  # the stage this device runs
  send, receive = (lambda c: c, lambda c: c) if cut is None else cut
  carry = run.model(0).first_carry(x_in, t, **cond)  # no params: any stage's model builds it
  received, kept = [None], None
  for stage in range(stages):
    last = stage == stages - 1

    def compute(c, stage=stage, last=last):
      segments = lambda model, c: run_stage(model, c, stage_of_segment, stage, ctx)  # noqa: E731
      out, sent = call_recording(segments, run.model(stage), c)
      return (out if last else send(out)), (None if record is None else record(stage, sent))

    carry, recorded = on_stage(mine == stage, compute, carry)
    if record is not None:
      kept = recorded if kept is None else jax.tree.map(lambda k, r: jnp.where(mine == stage, r, k), kept, recorded)
    if not last:
      carry = receive(deliver(carry, devices.index(stage), [d for d, s in enumerate(devices) if s == stage + 1]))
      received.append(carry)
  return broadcast_from_stage(carry.h, devices.index(stages - 1)), tuple(received), kept
