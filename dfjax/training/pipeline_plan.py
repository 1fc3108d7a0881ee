"""What a pipelined training run executes: the stage cut, the schedule's ticks, the bubble pieces.

`make_plan` turns a `PipelineConfig` (stages S, micro-batches M, data parallel D, schedule) and the
model into a `PipelinePlan`: per-segment forward and backward costs (analytic FLOPs, `segment_flops`,
the backward at twice the forward; or each timed once, `PipelineConfig.calibrate`), the DP partition
and the schedule's timeline (dfjax/training/pipeline_schedule.py), and the static tables the
executor's `lax.scan` indexes by (tick, stage): which branch runs, on which micro-batch, what
arrives from the neighbouring stages, and which buffer slot holds it (`Slots`: as many as are in
flight at once).

The backbone is a UNet or a DiT (dfjax/training/pipeline_backbone.py); in front of it are its frozen
parts (dfjax/training/pipeline_frozen.py): the UNet's class-token table (with `frozen_text`, the
class captions' frozen CLIP text encoder in its place), and with `frozen_encoder` a VAE encoder whose
latents the backbone trains on. Each is a chain of `FrozenJob` layers over a
data shard's batch, costed per layer by the models' cost model: DiffusionPipe's filler places
pieces (a layer on a run of whole samples, after the pieces of the layer below that made them) into
the bubbles, for the next step's batch; what does not fit, and all of it under GPipe / 1F1B, runs
after the pipeline (`leftover_pieces`, layer by layer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax

from dfjax.training import pipeline_schedule as ps
from dfjax.training.pipeline_backbone import Backbone
from dfjax.training.pipeline_calibrate import timed_costs
from dfjax.training.pipeline_frozen import FROZEN_ENCODERS, FrozenPart, backbone_shape, frozen_parts
from models.build import segment_costs
from models.build import segment_names as model_segment_names
from sharding.mesh import make_mesh
from sharding.strategies.staged import stages_of

@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """How `dfjax train` pipelines: `--pipeline-stages`, `--micro-batches`, `--data`, `--schedule`.

  Attributes:
    stages: pipeline stages S (consecutive segments of the UNet or DiT each).
    microbatches: micro-batches M per data shard's batch.
    data: data-parallel degree D (the mesh is D × S devices).
    schedule: "gpipe", "1f1b" or "diffusionpipe" (1F1B with the frozen work in its bubbles).
    calibrate: plan with each segment's forward and backward timed once on this device
      (dfjax/training/pipeline_calibrate.py) instead of the analytic FLOPs.
    frozen_encoder: "none", or a frozen VAE encoder (`FROZEN_ENCODERS`) in front of the backbone,
      which then trains on its latents.
  """

  stages: int = 1
  microbatches: int = 1
  data: int = 1
  schedule: str = "diffusionpipe"
  calibrate: bool = False
  frozen_encoder: str = "none"

  def __post_init__(self):
    for name in ("stages", "microbatches", "data"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    ps.Schedule.parse(self.schedule)
    if self.frozen_encoder != "none" and self.frozen_encoder not in FROZEN_ENCODERS:
      raise ValueError(f"unknown frozen encoder {self.frozen_encoder!r}; valid: none, {', '.join(FROZEN_ENCODERS)}")


@dataclasses.dataclass(frozen=True)
class Piece:
  """Samples `first` … `first + samples − 1` of frozen part `part`'s layer `layer`."""

  part: int
  layer: int
  first: int
  samples: int


@dataclasses.dataclass(frozen=True)
class Slots:
  """A stage buffer's layout over the ticks (the same on every stage: SPMD shapes).

  Attributes:
    count: the slots the buffer has, the peak number of values any stage holds at once.
    store: [tick][stage] the slot the value arriving after that tick goes into (−1: none arrives).
    read: [tick][stage] the slot the tick's forward or backward reads (0 where it reads none).
  """

  count: int
  store: tuple[tuple[int, ...], ...]
  read: tuple[tuple[int, ...], ...]


@dataclasses.dataclass(frozen=True)
class PipelinePlan:
  """A pipelined step, fully decided (hashable; the executor's tables come from here).

  Attributes:
    config: the PipelineConfig.
    batch: the global batch B; image_shape: the images' (H, W, C); backbone_shape: what the backbone
      trains on (the images, or the frozen encoder's latents).
    segment_names: the backbone's segments; stage_of_segment: the stage running each.
    forward, backward: each segment's cost per micro-batch (FLOPs, or seconds when timed).
    frozen_parts: the frozen models in front of the backbone.
    timeline: the schedule's ticked timeline (with the frozen pieces for DiffusionPipe).
    frozen_pieces: the pieces in the bubbles, in the timeline's order (the branch table's numbering).
    leftover_pieces: the frozen work run after the pipeline, in dependency order.
    frozen_text: the UNet's frozen text encoder (`TrainConfig.frozen_text`; "none": its class tokens).
  """

  config: PipelineConfig
  batch: int
  image_shape: tuple[int, int, int]
  backbone_shape: tuple[int, int, int]
  segment_names: tuple[str, ...]
  stage_of_segment: tuple[int, ...]
  forward: tuple[float, ...]
  backward: tuple[float, ...]
  frozen_parts: tuple[FrozenPart, ...]
  timeline: ps.Timeline
  frozen_pieces: tuple[Piece, ...]
  leftover_pieces: tuple[Piece, ...]
  frozen_text: str = "none"

  @property
  def stages(self) -> int:
    return self.config.stages

  @property
  def microbatches(self) -> int:
    return self.config.microbatches

  @property
  def shard_batch(self) -> int:
    return self.batch // self.config.data

  @property
  def microbatch(self) -> int:
    return self.shard_batch // self.config.microbatches

  @property
  def ticks(self) -> int:
    return self.timeline.ticks()

  def mesh(self):
    return make_mesh(data=self.config.data, stage=self.stages, patch=1,
                     devices=jax.devices()[:self.config.data * self.stages])

  def describe_partition(self) -> str:
    """One line per stage: its segments and its share of the forward cost."""
    total = sum(self.forward) or 1.0
    lines = []
    for stage in range(self.stages):
      names = [n for n, s in zip(self.segment_names, self.stage_of_segment) if s == stage]
      cost = sum(f for f, s in zip(self.forward, self.stage_of_segment) if s == stage)
      lines.append(f"stage {stage}: {', '.join(names)} ({100 * cost / total:.1f} % of the forward)")
    return "\n".join(lines)

  # -- the executor's tables: branch 0 idle, 1 + 2s forward on stage s, 2 + 2s backward, 1 + 2S + p piece p

  def _grid(self, fill: int) -> list[list[int]]:
    return [[fill] * self.stages for _ in range(self.ticks)]

  def branch_table(self) -> list[list[int]]:
    table, piece = self._grid(0), 0
    for timed in self.timeline.actions:  # in placement order: the frozen pieces' order
      a = timed.action
      if a.kind == ps.FROZEN:
        table[timed.tick][a.stage] = 1 + 2 * self.stages + piece
        piece += 1
      else:
        table[timed.tick][a.stage] = 1 + 2 * a.stage + (a.kind == ps.BACKWARD)
    return table

  def piece_table(self) -> list[list[int]]:
    """[tick][stage]: the index in `frozen_pieces` of the piece run there (−1: none)."""
    first = 1 + 2 * self.stages
    return [[code - first if code >= first else -1 for code in row] for row in self.branch_table()]

  def microbatch_table(self) -> list[list[int]]:
    table = self._grid(-1)
    for timed in self.timeline.actions:
      if timed.action.kind != ps.FROZEN:
        table[timed.tick][timed.action.stage] = timed.action.microbatch
    return table

  def receives_forward(self) -> list[list[int]]:
    """[tick][s]: the micro-batch whose activation stage s receives after that tick (−1: none)."""
    return self._arrivals(ps.FORWARD, +1)

  def receives_backward(self) -> list[list[int]]:
    """[tick][s]: the micro-batch whose gradient stage s receives after that tick (−1: none)."""
    return self._arrivals(ps.BACKWARD, -1)

  def _arrivals(self, kind: str, direction: int) -> list[list[int]]:
    table = self._grid(-1)
    for timed in self.timeline.actions:
      a = timed.action
      if a.kind == kind and 0 <= a.stage + direction < self.stages:
        table[timed.tick][a.stage + direction] = a.microbatch
    return table

  # -- the buffers a stage keeps between ticks: as many slots as micro-batches it holds at once

  def activation_slots(self) -> Slots:
    """Where each stage stashes a received activation: from its arrival until its micro-batch's
    backward (which recomputes the forward from it). GPipe holds all M at once; 1F1B about S − s."""
    return self._slots(self.receives_forward(), ps.FORWARD)

  def gradient_slots(self) -> Slots:
    """Where each stage keeps a received gradient until its micro-batch's backward uses it."""
    return self._slots(self.receives_backward(), ps.BACKWARD)

  def _slots(self, arrivals: list[list[int]], first_reader: str) -> Slots:
    """Interval colouring of each stage's buffers: a value occupies a slot from the end of the tick it
    arrives in to the backward tick that last reads it; a value arriving in that same tick may take
    the slot (the branch reads before the arrival is stored). Slots are taken lowest free first, in
    arrival order, which needs exactly the peak number of values held at once."""
    backward_tick = {(t.action.stage, t.action.microbatch): t.tick for t in self.timeline.actions
                     if t.action.kind == ps.BACKWARD}
    readers = {ps.FORWARD: (ps.FORWARD, ps.BACKWARD), ps.BACKWARD: (ps.BACKWARD,)}[first_reader]
    store, read = self._grid(-1), self._grid(0)
    count = 1  # at least one slot, so the buffers have a shape where nothing arrives (the first stage)
    for stage in range(self.stages):
      slot_of, release = {}, {}  # micro-batch → slot; slot → the tick it is last read in
      for tick in range(self.ticks):
        m = arrivals[tick][stage]
        if m < 0:
          continue
        slot = min(k for k in range(len(release) + 1) if release.get(k, -1) <= tick)
        slot_of[m], release[slot] = slot, backward_tick[(stage, m)]
        store[tick][stage] = slot
      count = max(count, len(release))
      for timed in self.timeline.actions:
        a = timed.action
        if a.stage == stage and a.kind in readers and a.microbatch in slot_of:
          read[timed.tick][stage] = slot_of[a.microbatch]
    return Slots(count, tuple(map(tuple, store)), tuple(map(tuple, read)))


def segment_names(model: str) -> tuple[str, ...]:
  return model_segment_names(Backbone.of(model).config)


def analytic_costs(model: str, image_shape: Sequence[int], microbatch: int, frozen_text: str = "none"
                   ) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(forward, backward) FLOPs per micro-batch of each segment; the backward at twice the forward
  (`frozen_text`: the UNet's cross-attention reads the captions' tokens)."""
  backbone = Backbone.of(model, frozen_text)
  backbone.config.check_latent_size(*image_shape[:2])
  costs = segment_costs(backbone.config, backbone.workload(image_shape))
  forward = tuple(float(microbatch * sum(cost.flops.values())) for cost in costs.values())
  return forward, tuple(2.0 * f for f in forward)


def make_plan(pipeline: PipelineConfig, model: str, batch: int, image_shape: Sequence[int], *,
              costs: tuple[Sequence[float], Sequence[float]] | None = None, frozen_text: str = "none"
              ) -> PipelinePlan:
  """The plan of a pipelined step for `model` on a global batch of `batch` images of `image_shape`.

  Args:
    frozen_text: the UNet's frozen text encoder of the class captions, a frozen part in its class tokens'
      place (`TrainConfig.frozen_text`).
    costs: (forward, backward) per segment and micro-batch; default `timed_costs` when
      `pipeline.calibrate`, else `analytic_costs`.
  Raises:
    ValueError: a batch the data × micro-batch split does not divide, more stages than segments,
      or a mesh larger than the devices — each naming the valid choices; frozen text for a DiT.
  """
  backbone = Backbone.of(model, frozen_text)
  names = segment_names(model)
  s, m, d = pipeline.stages, pipeline.microbatches, pipeline.data
  if s > len(names):
    listed = ", ".join(f"{i} {n}" for i, n in enumerate(names))
    raise ValueError(f"--pipeline-stages {s}: the {model!r} {backbone.kind} has {len(names)} segments "
                     f"({listed}); use 1 to {len(names)} stages")
  if batch % (d * m):
    valid = [k for k in range(1, batch // d + 1) if batch % (d * k) == 0] if batch % d == 0 else []
    raise ValueError(f"a batch of {batch} does not split into {d} data shard(s) × {m} micro-batches; "
                     + (f"valid --micro-batches for --data {d}: {valid}" if valid else
                        f"--data must divide the batch ({[k for k in range(1, batch + 1) if batch % k == 0]})"))
  devices = len(jax.devices())
  if s * d > devices:
    raise ValueError(f"--pipeline-stages {s} × --data {d} = {s * d} devices, but {devices} are available; "
                     f"choose stages × data ≤ {devices} (on a CPU, --cpu-devices N)")
  micro, shard = batch // (d * m), batch // d
  parts = frozen_parts(backbone.spec, pipeline.frozen_encoder, tuple(image_shape))
  x_shape = backbone_shape(parts, image_shape)
  flops = analytic_costs(model, x_shape, micro, frozen_text)
  if costs is None:
    costs = timed_costs(model, x_shape, micro, frozen_text) if pipeline.calibrate else flops
  forward, backward = map(tuple, costs)
  # the frozen layers' FLOPs in the backbone's cost unit: seconds at the backbone's timed FLOP rate
  unit = sum(forward) / sum(flops[0])
  jobs = [ps.FrozenJob(part.name, tuple(unit * shard * layer.flops for layer in part.layers), shard)
          for part in parts]
  timeline = ps.plan(pipeline.schedule, forward, backward, s, m, frozen=jobs)
  part_of = {part.name: i for i, part in enumerate(parts)}
  pieces = tuple(Piece(part_of[t.action.job], t.action.layer, t.action.first, t.action.samples)
                 for t in timeline.actions if t.action.kind == ps.FROZEN)
  leftover = []
  for i, part in enumerate(parts):
    for layer in range(len(part.layers)):
      done = sum(p.samples for p in pieces if (p.part, p.layer) == (i, layer))  # the layer's first samples
      if done < shard:
        leftover.append(Piece(i, layer, done, shard - done))
  return PipelinePlan(pipeline, batch, tuple(image_shape), x_shape, names, stages_of(timeline.cuts, len(names)),
                      forward, backward, parts, timeline, pieces, tuple(leftover), frozen_text)
