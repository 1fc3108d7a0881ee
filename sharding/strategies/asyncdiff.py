"""AsyncDiff (Chen et al., NeurIPS 2024): the model's components all compute at once, each on its
producers' outputs of the previous step.

The denoiser is cut at its segments into N consecutive components on the `stage` axis, by default
where the cost model balances their FLOPs (`cuts=` overrides); each device holds only its
component's params (sharding/stage_params.py), where the authors replicate the model.
  warm-up       the first `warmup_steps` steps run the components in order: exact
                (staged.synchronous_stages).
  asynchronous  at step t every component computes at once: component 0 on step t's latent, component
                n on what its producers made at step t − 1 (the scan carry), each with its own
                step's conditioning, which every device embeds itself (sharding/stage_carry.py).
                Each activation goes point to point to the component that reads it (a UNet skip
                straight to its up block's component), the model output is broadcast from the last
                component, and the scheduler applies it at the start of the next step: no collective
                a step issues has a consumer in that step. The last step's update runs after the
                loop (`Phase.finish`).
  stride 2      the first N − 1 components compute every other step, for the later step of the pair
                (the timestep advanced by one, as in the authors' code); the last component runs on
                two devices at once, device N − 1 for the later step and device N for the earlier,
                on the same inputs: devices = N + 1. In SPMD one scan iteration is a pair of steps
                (`Phase.stride`); both outputs are broadcast and applied in order at the start of the
                next pair. An odd number of asynchronous steps ends with a pair whose later half is
                dropped.
The prediction of step t is made from a latent N − 1 steps old (stride 2: 2(N − 1)), so after
warm-up the result differs from `single`; with every step in warm-up it equals `single`.
Unlike the authors' blocking broadcasts of every component's output to every rank, transfers are
point to point and carried, so XLA may overlap them; they are packed into rounds of one permute
(sharding/exchange/rounds.py), so each device carries one buffer per round, not every delivery.
The same code runs every family the segments describe (the UNet's blocks, a DiT's or PixArt's
transformer blocks): what crosses a cut is traced from the model (sharding/stage_carry.py).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from models.build import segment_names
from models.parallel import SINGLE_DEVICE
from sharding.accounting import stages as stage_accounting
from sharding.axes import STAGE
from sharding.exchange.rounds import exchange, packed, plan_rounds, unpacked
from sharding.exchange.stages import broadcast_from_stage
from sharding.stage_carry import run_stage
from sharding.strategies.base import Phase
from sharding.strategies.staged import (Staged, balanced_cuts, check_cuts, on_stage, segment_flops, stages_of,
                                        synchronous_stages)

STRIDES = (1, 2)


@dataclasses.dataclass(frozen=True)
class _Role:
  """What one device along `stage` runs: a component, for the step `offset` after the iteration's first."""

  component: int
  offset: int


@dataclasses.dataclass(frozen=True)
class AsyncDiff(Staged):
  """AsyncDiff on N + stride − 1 `stage` devices.

  Attributes:
    stride: 1, or 2 (the first N − 1 components compute every other step).
    warmup_steps: synchronous steps first (≥ 1; the authors' SD2.1 and SDXL examples use 9 of 50).
    cuts: the segment indices where components 2..N start (None: balanced by the cost model).
  """

  stride: int = 1
  warmup_steps: int = 9
  cuts: tuple[int, ...] | None = None

  name = "asyncdiff"
  stages_make_conditioning = True  # each component runs its own step's timestep
  description = "AsyncDiff: model components in parallel on the previous step's activations, after a warm-up"

  def __post_init__(self):
    if self.stride not in STRIDES or isinstance(self.stride, bool):
      raise ValueError(f"stride={self.stride!r}: AsyncDiff's stride is one of {', '.join(map(str, STRIDES))}.")
    if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 1:
      raise ValueError(f"warmup_steps={self.warmup_steps!r} must be an integer ≥ 1: the components' first inputs "
                       "come from a synchronous step.")
    if self.cuts is not None:
      object.__setattr__(self, "cuts", tuple(self.cuts))

  # ------------------------------------------------------------------------ the cut and the devices

  def components(self, sizes) -> int:
    """N: the components a `stage` axis of N + stride − 1 devices runs."""
    return sizes[STAGE] - self.stride + 1

  def stage_count(self, sizes) -> int:
    return self.components(sizes)

  def cuts_for(self, config, height, width, stages):
    if self.cuts is not None:
      check_cuts(self.cuts, segment_names(config), stages)
      return self.cuts
    return balanced_cuts(segment_flops(config, height, width), stages)

  def _roles(self, sizes) -> tuple[_Role, ...]:
    n = self.components(sizes)
    if self.stride == 1:
      return tuple(_Role(c, 0) for c in range(n))
    return (*(_Role(c, 1) for c in range(n)), _Role(n - 1, 0))

  def stage_of_device(self, sizes):
    return tuple(role.component for role in self._roles(sizes))

  def _predictors(self, sizes) -> tuple[int, ...]:
    """The devices running the last component, by the step they predict (earliest first)."""
    roles = self._roles(sizes)
    last = [d for d, role in enumerate(roles) if role.component == self.components(sizes) - 1]
    return tuple(sorted(last, key=lambda d: roles[d].offset))

  def _deliveries(self, layout, sizes) -> tuple[tuple[int, int], ...]:
    """(transfer index, receiving device) of every point-to-point send, the carry's order."""
    roles = self._roles(sizes)
    return tuple((k, d) for k, t in enumerate(layout.transfers) for d, role in enumerate(roles)
                 if role.component == t.destination)

  def _first_devices(self, sizes) -> dict[int, int]:
    """{component: the first device running it}, the one that sends its activations."""
    first = {}
    for d, role in enumerate(self._roles(sizes)):
      first.setdefault(role.component, d)
    return first

  def _senders(self, layout, sizes) -> tuple[int, ...]:
    """The device sending each delivery."""
    first = self._first_devices(sizes)
    return tuple(first[layout.transfers[k].source] for k, _ in self._deliveries(layout, sizes))

  def _rounds(self, layout, sizes):
    """The deliveries packed into rounds of one permute (sharding/exchange/rounds.py): the carry's buffers."""
    senders = self._senders(layout, sizes)
    return plan_rounds([(s, d, layout.transfers[k].dtype, int(np.prod(layout.transfers[k].shape, dtype=np.int64)))
                        for s, (k, d) in zip(senders, self._deliveries(layout, sizes))])

  def validate(self, config, height, width, sizes):
    super().validate(config, height, width, sizes)
    segments = len(segment_names(config))
    lo, hi = 2 + self.stride - 1, segments + self.stride - 1
    if self.cuts is not None and sizes[STAGE] != len(self.cuts) + self.stride:
      raise ValueError(f"cuts={self.cuts} make {len(self.cuts) + 1} components, which with stride {self.stride} "
                       f"need stage = N + S − 1 = {len(self.cuts) + self.stride} devices, but the mesh has "
                       f"stage={sizes[STAGE]}.")
    if not lo <= sizes[STAGE] <= hi:
      raise ValueError(f"asyncdiff with stride {self.stride} runs N components on stage = N + {self.stride - 1} "
                       f"devices, N from 2 to the model's {segments} segments: valid stage sizes {lo} to {hi}, "
                       f"but the mesh has stage={sizes[STAGE]}.")
    self.cuts_for(config, height, width, self.components(sizes))  # bad cuts name the segments

  # ------------------------------------------------------------------------ the steps

  def phases(self, num_steps, sizes, *, simulated=False):
    warm = min(num_steps, self.warmup_steps)
    synchronous = functools.partial(self._synchronous_step, sizes)
    if warm == num_steps:
      return [Phase(0, num_steps, step=functools.partial(synchronous, records=False))]
    last_start = warm + self.stride * ((num_steps - warm - 1) // self.stride)  # the last iteration's first step
    return [
        Phase(0, warm, step=functools.partial(synchronous, records=True), records=True),
        Phase(warm, num_steps, step=functools.partial(self._asynchronous_step, sizes, warm, num_steps),
              uses_stale=True, records=True, stride=self.stride,
              finish=functools.partial(self._finish, last_start, num_steps)),
    ]

  def _synchronous_step(self, sizes, run, x, sched_state, stale, i, *, records):
    """An exact step, the components in order; recording, what each device's component read (the
    asynchronous steps' first inputs) and room for the model outputs they defer."""
    layout = run.layout
    x_in, cond = run.model_inputs(run.sched.scale_model_input(x, i))
    out, received, _ = synchronous_stages(run, layout.stage_of_segment, x_in, run.sched.model_timestep(i), cond,
                                       SINGLE_DEVICE, devices=self.stage_of_device(sizes))
    x_next, sched_state = run.sched.step(sched_state, run.guided(out, x), i, x)
    if not records:
      return x_next, sched_state, {}
    values = {j: jax.tree.leaves(received[layout.transfers[k].destination])[layout.transfers[k].destination_leaf]
              for j, (k, _) in enumerate(self._deliveries(layout, sizes))}
    inputs = packed(self._rounds(layout, sizes), values, lax.axis_index(STAGE), by_receiver=True)
    return x_next, sched_state, {"inputs": inputs, "outputs": (jnp.zeros_like(out),) * self.stride}

  def _asynchronous_step(self, sizes, start, num_steps, run, x, sched_state, stale, i):
    """Steps i .. i + stride − 1: the previous iteration's outputs applied, then every component at once."""
    deferred = (x, sched_state)
    for k, out in enumerate(stale["outputs"]):  # the previous iteration's steps, in order
      deferred = run.sched.step(deferred[1], run.guided(out, deferred[0]), i - self.stride + k, deferred[0])
    first = i == start  # its inputs come from warm-up, which applied its own outputs
    x, sched_state = jax.tree.map(lambda now, late: jnp.where(first, now, late), (x, sched_state), deferred)

    layout, deliveries, roles = run.layout, self._deliveries(run.layout, sizes), self._roles(sizes)
    rounds = self._rounds(layout, sizes)
    x_in, cond = run.model_inputs(run.sched.scale_model_input(x, i))
    here = lax.axis_index(STAGE)
    made = []
    for device, role in enumerate(roles):
      t = run.sched.model_timestep(jnp.minimum(i + role.offset, num_steps - 1))
      compute = functools.partial(self._component, run, deliveries, rounds, role.component, device)
      made.append(on_stage(here == device, compute, stale["inputs"], x_in, t, cond))
    senders = self._senders(layout, sizes)
    values = {j: made[senders[j]][k] for j, (k, _) in enumerate(deliveries)}
    inputs = exchange(rounds, packed(rounds, values, here))
    outputs = tuple(broadcast_from_stage(made[d], d) for d in self._predictors(sizes))
    return x, sched_state, {"inputs": inputs, "outputs": outputs}

  def _component(self, run, deliveries, rounds, component, device, received, x_in, t, cond):
    """One device's component on what it received: the model output if it is the last, else what it sends."""
    layout = run.layout
    model = run.model(component)
    if component == 0:
      carry = model.first_carry(x_in, t, **cond)
    else:
      shapes = {j: layout.transfers[k].shape for j, (k, _) in enumerate(deliveries)}
      buffers = unpacked(rounds, received, device, shapes)
      mine = {deliveries[j][0]: buffer for j, buffer in buffers.items()}
      carry = layout.stage_input(component, mine, layout.conditioning(model, x_in, t, cond))
    carry = run_stage(model, carry, layout.stage_of_segment, component, SINGLE_DEVICE)
    return layout.prediction(carry) if component == layout.stages - 1 else layout.sent(component, carry)

  def _finish(self, last_start, stop, run, x, sched_state, stale):
    """The last iteration's outputs applied (only its steps before `stop`)."""
    for k, out in enumerate(stale["outputs"][:stop - last_start]):
      x, sched_state = run.sched.step(sched_state, run.guided(out, x), last_start + k, x)
    return x, sched_state

  # ------------------------------------------------------------------------ accounting and reports

  def _analytic_rounds(self, config, height, width, sizes):
    """The rounds `_rounds` packs the deliveries into, from the analytic transfers (values per sample)."""
    stage_of = stages_of(self.cuts_for(config, height, width, self.components(sizes)), len(segment_names(config)))
    roles, first = self._roles(sizes), self._first_devices(sizes)
    return plan_rounds([(first[source], d, "activation", values)
                        for _, source, reader, values in stage_accounting.transfers(config, height, width, stage_of)
                        for d, role in enumerate(roles) if role.component == reader])

  def expected_traffic(self, config, height, width, sizes, batch, activation_bytes):
    """Per step (per iteration with stride 2): each round's buffer (one permute: the activations one
    device receives from one sender, padded to the round's largest), and the broadcast model outputs."""
    activations = sum(r.size for r in self._analytic_rounds(config, height, width, sizes))
    prediction = self.stride * stage_accounting.prediction_values(config, height, width)
    return {"activations": batch * activation_bytes * activations, "prediction": batch * activation_bytes * prediction}

  def overlapped_kinds(self):
    return frozenset({"activations", "prediction"})

  def stale_bytes(self, config, height, width, sizes, batch, activation_bytes, text_tokens=0):
    """Every device carries each round's buffer (what it receives in it, or zeros) and the deferred model outputs."""
    del text_tokens  # every stage makes its own conditioning
    return self.expected_traffic(config, height, width, sizes, batch, activation_bytes)

  def options(self):
    cuts = f", cuts {','.join(map(str, self.cuts))}" if self.cuts is not None else ""
    return f"stride {self.stride}, warm-up {self.warmup_steps}{cuts}"

  def detail(self, config, height, width, sizes):
    n = self.components(sizes)
    cuts = self.cuts_for(config, height, width, n)
    names, flops = segment_names(config), segment_flops(config, height, width)
    per = [sum(f for f, s in zip(flops, stages_of(cuts, len(names))) if s == c) for c in range(n)]
    starts = ", ".join(f"{c} {names[c]}" for c in cuts)
    return (f"N{n}S{self.stride}: components start at {starts}; GFLOPs per sample "
            f"{' / '.join(f'{f / 1e9:.3g}' for f in per)} (max/min {max(per) / min(per):.2f})")
