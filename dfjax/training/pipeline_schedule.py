"""Pipeline-parallel training schedules: GPipe, 1F1B and DiffusionPipe's, as timelines.

DiffusionPipe (Tian et al., MLSys 2024) trains the backbone of a diffusion model over S pipeline
stages with M micro-batches and fills the pipeline's idle periods (bubbles) with the frozen
parts' work — the text encoder's and VAE encoder's forward passes for the *next* iteration's
batch (cross-iteration overlap), a batch split into pieces when a whole one does not fit
(partial batches). This module plans, it does not run: from per-segment forward/backward costs
(seconds) it chooses the stage partition, orders each stage's work under a schedule, simulates
the timeline, fills the bubbles greedily, and numbers every action with a tick — the lock-step
slot the SPMD executor runs it in.

Costs are per micro-batch. Time is whatever unit the costs are in (seconds when calibrated).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence

FORWARD, BACKWARD, FROZEN = "F", "B", "frozen"


class Schedule(enum.Enum):
  """How each stage orders its micro-batches' forward and backward passes."""

  GPIPE = "gpipe"  # every forward, then every backward (most activation memory)
  ONE_F_ONE_B = "1f1b"  # warm-up forwards, then one forward / one backward, then the rest (PipeDream-flush)
  DIFFUSIONPIPE = "diffusionpipe"  # 1F1B with the frozen parts' work in its bubbles

  @classmethod
  def parse(cls, value: Schedule | str) -> Schedule:
    if isinstance(value, Schedule):
      return value
    try:
      return cls(value)
    except ValueError:
      raise ValueError(f"unknown pipeline schedule {value!r}; valid: {', '.join(s.value for s in cls)}.") from None


@dataclasses.dataclass(frozen=True)
class FrozenJob:
  """A non-trainable model's work for one iteration's batch, layer by layer.

  Attributes:
    name: e.g. "text_encoder", "vae_encoder".
    layer_costs: each layer's cost for the whole batch, in order.
    samples: the batch, the unit a piece may be cut at (partial-batch processing).
  """

  name: str
  layer_costs: tuple[float, ...]
  samples: int

  @property
  def cost(self) -> float:
    return sum(self.layer_costs)


@dataclasses.dataclass(frozen=True)
class Action:
  """One piece of work on one stage: a micro-batch's forward or backward through the stage's
  segments, or samples `first` … `first + samples − 1` of a frozen job's `layer`."""

  kind: str
  stage: int
  microbatch: int = -1
  job: str = ""
  layer: int = -1
  samples: int = 0
  first: int = 0


@dataclasses.dataclass(frozen=True)
class Timed:
  action: Action
  start: float
  end: float
  tick: int = -1


@dataclasses.dataclass(frozen=True)
class Timeline:
  """A simulated iteration: every stage's actions with their times (and ticks), the schedule and cuts."""

  schedule: Schedule
  stages: int
  microbatches: int
  cuts: tuple[int, ...]
  actions: tuple[Timed, ...]
  leftover: float = 0.0  # frozen work that did not fit in the bubbles, run data-parallel after them

  @property
  def makespan(self) -> float:
    """The iteration time: the last action's end, plus the leftover frozen work spread over the stages."""
    return max((a.end for a in self.actions), default=0.0) + self.leftover / self.stages

  def busy(self, stage: int) -> float:
    return sum(a.end - a.start for a in self.actions if a.action.stage == stage)

  @property
  def bubble_fraction(self) -> float:
    """Idle device-time over all device-time in the iteration."""
    total = self.makespan * self.stages
    return 1.0 - sum(self.busy(s) for s in range(self.stages)) / total if total else 0.0

  def on_stage(self, stage: int) -> list[Timed]:
    return sorted((a for a in self.actions if a.action.stage == stage), key=lambda a: a.start)

  def ticks(self) -> int:
    return 1 + max((a.tick for a in self.actions), default=-1)


# ---------------------------------------------------------------------------------- partition

def partition(forward: Sequence[float], backward: Sequence[float], stages: int, microbatches: int, *,
              cut_costs: Sequence[float] | None = None) -> tuple[int, ...]:
  """The stage cuts minimising a synchronous pipeline's iteration time, by dynamic programming.

  With per-stage time p_s = Σ (forward + backward) of its segments and a transfer cost c_i at each
  cut i (forward activation + backward gradient), a GPipe/1F1B iteration takes
  Σ_s p_s + Σ_cuts c + (M − 1) · max_s p_s. For every candidate bound on max p_s the DP finds the
  cuts of least transfer cost under it; the best (bound, cuts) pair wins.

  Args:
    forward, backward: each segment's cost per micro-batch.
    cut_costs: cut_costs[i] is the cost of cutting before segment i (index 0 unused); default 0.
  Returns:
    `stages − 1` increasing cut indices (a cut at i starts a stage at segment i).
  """
  n = len(forward)
  if len(backward) != n:
    raise ValueError(f"{n} forward costs but {len(backward)} backward costs: give one of each per segment.")
  if not 1 <= stages <= n:
    raise ValueError(f"cannot cut {n} segments into {stages} stages: use 1 to {n} stages.")
  cut_costs = [0.0] * n if cut_costs is None else list(cut_costs)
  step = [f + b for f, b in zip(forward, backward)]
  prefix = [0.0]
  for p in step:
    prefix.append(prefix[-1] + p)
  span = lambda a, b: prefix[b] - prefix[a]  # noqa: E731
  bounds = sorted({span(a, b) for a in range(n) for b in range(a + 1, n + 1)})
  best: tuple[float, tuple[int, ...]] | None = None
  for bound in bounds:
    cuts = _cheapest_cuts_under(span, cut_costs, n, stages, bound)
    if cuts is None:
      continue
    largest = max(span(a, b) for a, b in zip((0, *cuts), (*cuts, n)))
    time = prefix[n] + sum(cut_costs[c] for c in cuts) + (microbatches - 1) * largest
    if best is None or time < best[0] - 1e-12:
      best = (time, cuts)
  return best[1]


def _cheapest_cuts_under(span, cut_costs, n: int, stages: int, bound: float) -> tuple[int, ...] | None:
  """The cuts of least total transfer cost with every stage's time ≤ bound (None: impossible)."""
  inf = float("inf")
  # cost[k][j]: least transfer cost splitting segments[:j] into k stages; back[k][j]: the last cut
  cost = [[inf] * (n + 1) for _ in range(stages + 1)]
  back = [[-1] * (n + 1) for _ in range(stages + 1)]
  cost[0][0] = 0.0
  for k in range(1, stages + 1):
    for j in range(k, n + 1):
      for i in range(k - 1, j):
        if cost[k - 1][i] == inf or span(i, j) > bound + 1e-12:
          continue
        c = cost[k - 1][i] + (cut_costs[i] if i > 0 else 0.0)
        if c < cost[k][j]:
          cost[k][j], back[k][j] = c, i
  if cost[stages][n] == inf:
    return None
  cuts, j = [], n
  for k in range(stages, 0, -1):
    j = back[k][j]
    cuts.append(j)
  return tuple(reversed(cuts[:-1]))


def stage_costs(costs: Sequence[float], cuts: Sequence[int]) -> tuple[float, ...]:
  """Each stage's total of `costs` under `cuts`."""
  edges = (0, *cuts, len(costs))
  return tuple(sum(costs[a:b]) for a, b in zip(edges[:-1], edges[1:]))


# ---------------------------------------------------------------------------------- schedules

def stage_order(schedule: Schedule, stage: int, stages: int, microbatches: int) -> list[Action]:
  """The order stage `stage` runs its micro-batches' forward and backward passes in."""
  f = [Action(FORWARD, stage, m) for m in range(microbatches)]
  b = [Action(BACKWARD, stage, m) for m in range(microbatches)]
  if schedule is Schedule.GPIPE:
    return f + b[::-1]
  warm = min(stages - 1 - stage, microbatches)  # forwards in flight before the first backward
  order = f[:warm]
  for m in range(microbatches - warm):
    order += [f[warm + m], b[m]]
  return order + b[microbatches - warm:]


def simulate(schedule: Schedule | str, stage_forward: Sequence[float], stage_backward: Sequence[float],
             microbatches: int, *, transfer: Sequence[float] | None = None,
             cuts: Sequence[int] = ()) -> Timeline:
  """Times every stage's passes: an action starts when its stage is free and its input has arrived
  (a forward needs the previous stage's forward of its micro-batch, a backward the next stage's
  backward, each plus the cut's `transfer` cost), then ticks them (see `assign_ticks`)."""
  schedule = Schedule.parse(schedule)
  stages = len(stage_forward)
  transfer = [0.0] * stages if transfer is None else list(transfer)  # transfer[s]: between s and s + 1
  orders = [stage_order(schedule, s, stages, microbatches) for s in range(stages)]
  done: dict[tuple[str, int, int], float] = {}
  timed: list[Timed] = []
  position, free = [0] * stages, [0.0] * stages
  while any(position[s] < len(orders[s]) for s in range(stages)):
    progressed = False
    for s in range(stages):
      if position[s] == len(orders[s]):
        continue
      action = orders[s][position[s]]
      ready = _input_ready(action, stages, done, transfer)
      if ready is None:
        continue
      start = max(free[s], ready)
      cost = stage_forward[s] if action.kind == FORWARD else stage_backward[s]
      free[s] = start + cost
      done[(action.kind, s, action.microbatch)] = free[s]
      timed.append(Timed(action, start, free[s]))
      position[s] += 1
      progressed = True
    if not progressed:
      raise AssertionError("the schedule deadlocks")  # a bug in stage_order, not bad input
  return assign_ticks(Timeline(schedule, stages, microbatches, tuple(cuts), tuple(timed)))


def _input_ready(action: Action, stages: int, done, transfer) -> float | None:
  s, m = action.stage, action.microbatch
  if action.kind == FORWARD:
    if s == 0:
      return 0.0
    end = done.get((FORWARD, s - 1, m))
    return None if end is None else end + transfer[s - 1]
  if s == stages - 1:
    return done.get((FORWARD, s, m))
  end = done.get((BACKWARD, s + 1, m))
  return None if end is None else end + transfer[s]


# ---------------------------------------------------------------------------------- bubble filling

def bubbles(timeline: Timeline) -> list[tuple[int, float, float]]:
  """Every idle interval (stage, start, end) inside the iteration, in start-time order."""
  end = max((a.end for a in timeline.actions), default=0.0)
  gaps = []
  for s in range(timeline.stages):
    t = 0.0
    for a in timeline.on_stage(s):
      if a.start > t + 1e-12:
        gaps.append((s, t, a.start))
      t = max(t, a.end)
    if end > t + 1e-12:
      gaps.append((s, t, end))
  return sorted(gaps, key=lambda g: (g[1], g[0]))


def fill_bubbles(timeline: Timeline, jobs: Sequence[FrozenJob]) -> Timeline:
  """DiffusionPipe's greedy filler: the next iteration's frozen work placed into this one's bubbles.

  Bubbles are taken in time order; each gets as much of the frozen jobs as fits, layer by layer
  (samples of layer l only once layer l − 1 has finished them, on any stage), the batch cut into
  partial pieces of whole samples where a layer of the whole batch does not fit. A layer's pieces
  take its samples in order. What is left runs after the pipeline, data-parallel over the stages
  (`Timeline.leftover`).
  """
  state = [_JobProgress(job) for job in jobs]
  placed = []
  for stage, start, end in bubbles(timeline):
    t = start
    for progress in state:
      while True:
        piece = progress.next_piece(t, end - t)
        if piece is None:
          break
        layer, samples, cost = piece
        first = progress.done(layer)
        placed.append(Timed(Action(FROZEN, stage, job=progress.job.name, layer=layer, samples=samples, first=first),
                            t, t + cost))
        progress.record(layer, samples, t + cost)
        t += cost
  leftover = sum(p.remaining_cost() for p in state)
  filled = dataclasses.replace(timeline, schedule=Schedule.DIFFUSIONPIPE, actions=timeline.actions + tuple(placed),
                               leftover=leftover)
  return assign_ticks(filled)


class _JobProgress:
  """How far a frozen job has got: per layer, its pieces in sample order, with their end times."""

  def __init__(self, job: FrozenJob):
    self.job = job
    self.finished: list[list[tuple[float, int]]] = [[] for _ in job.layer_costs]  # per layer: (end, samples)

  def done(self, layer: int) -> int:
    """Samples of `layer` placed so far (they are its first ones)."""
    return sum(n for _, n in self.finished[layer])

  def _ready(self, layer: int, by: float) -> int:
    """The first samples of `layer` all finished by `by`: a later piece may end before an earlier one."""
    count = 0
    for end, n in self.finished[layer]:
      if end > by + 1e-12:
        break
      count += n
    return count

  def next_piece(self, at: float, room: float) -> tuple[int, int, float] | None:
    """(layer, samples, cost) of the largest piece startable at `at` that fits in `room`, or None."""
    for layer, layer_cost in enumerate(self.job.layer_costs):
      todo = self.job.samples - self.done(layer)
      if todo == 0:
        continue
      ready = self.job.samples if layer == 0 else self._ready(layer - 1, by=at)
      startable = min(todo, ready - self.done(layer))
      per_sample = layer_cost / self.job.samples
      fits = startable if per_sample == 0 else min(startable, int(room / per_sample + 1e-9))
      return (layer, fits, fits * per_sample) if fits > 0 else None  # layers run in order
    return None

  def record(self, layer: int, samples: int, end: float) -> None:
    self.finished[layer].append((end, samples))

  def remaining_cost(self) -> float:
    return sum(cost * (1 - self.done(layer) / self.job.samples) for layer, cost in enumerate(self.job.layer_costs))


# ---------------------------------------------------------------------------------- ticks

def assign_ticks(timeline: Timeline) -> Timeline:
  """Numbers every action with the lock-step slot the SPMD executor runs it in.

  Each tick every device runs at most one action, and then the stages exchange activations and
  gradients; so an action's tick is after its stage's previous action and after the action whose
  output it consumes. Actions are ticked in time order, so ticks keep the simulated order.
  """
  last_on_stage: dict[int, int] = {}
  tick_of: dict[tuple[str, int, int], int] = {}
  frozen_ticks: dict[tuple[str, int], list[tuple[int, int, int]]] = {}  # (job, layer) → (first, end, tick)
  ticked = []
  for timed in sorted(timeline.actions, key=lambda a: (a.start, a.action.stage)):
    a = timed.action
    after = last_on_stage.get(a.stage, -1)
    if a.kind == FORWARD and a.stage > 0:
      after = max(after, tick_of[(FORWARD, a.stage - 1, a.microbatch)])
    elif a.kind == BACKWARD:
      after = max(after, tick_of[(FORWARD, a.stage, a.microbatch)])
      if a.stage < timeline.stages - 1:
        after = max(after, tick_of[(BACKWARD, a.stage + 1, a.microbatch)])
    elif a.kind == FROZEN and a.layer > 0:  # after the pieces of the layer below that made its samples
      after = max([after] + [tick for first, end, tick in frozen_ticks.get((a.job, a.layer - 1), ())
                             if first < a.first + a.samples and a.first < end])
    tick = after + 1
    last_on_stage[a.stage] = tick
    if a.kind == FROZEN:
      frozen_ticks.setdefault((a.job, a.layer), []).append((a.first, a.first + a.samples, tick))
    else:
      tick_of[(a.kind, a.stage, a.microbatch)] = tick
    ticked.append(dataclasses.replace(timed, tick=tick))
  return dataclasses.replace(timeline, actions=tuple(ticked))


def plan(schedule: Schedule | str, forward: Sequence[float], backward: Sequence[float], stages: int,
         microbatches: int, *, frozen: Sequence[FrozenJob] = (), cut_costs: Sequence[float] | None = None,
         cuts: Sequence[int] | None = None) -> Timeline:
  """The whole plan: the partition (`cuts`, or the DP's), the schedule's timeline, and for
  DiffusionPipe its bubbles filled with `frozen`; the baselines run `frozen` before the pipeline,
  data-parallel (`Timeline.leftover`)."""
  schedule = Schedule.parse(schedule)
  cuts = tuple(partition(forward, backward, stages, microbatches, cut_costs=cut_costs) if cuts is None else cuts)
  cut_costs = [0.0] * len(forward) if cut_costs is None else list(cut_costs)
  transfer = [cut_costs[c] / 2 for c in cuts]  # a cut's cost is its forward send plus its backward send
  timeline = simulate(Schedule.ONE_F_ONE_B if schedule is Schedule.DIFFUSIONPIPE else schedule,
                      stage_costs(forward, cuts), stage_costs(backward, cuts), microbatches,
                      transfer=transfer, cuts=cuts)
  if schedule is Schedule.DIFFUSIONPIPE:
    return fill_bubbles(timeline, frozen)
  return dataclasses.replace(timeline, leftover=sum(job.cost for job in frozen))
