"""Pipeline training plans (dfjax/training/pipeline_schedule.py): the DP partition is the best cut
(brute force), GPipe and 1F1B timelines match their closed forms on uniform stages, every action
waits for its inputs, the bubble filler places all the frozen work that fits without overlapping
anything or breaking layer order, and ticks keep every dependency."""

import itertools

import numpy as np
import pytest
from PIL import Image

from dfjax.training.pipeline_chart import describe, draw
from dfjax.training.pipeline_schedule import (BACKWARD, FORWARD, FROZEN, FrozenJob, Schedule, fill_bubbles,
                                              partition, plan, simulate, stage_costs)


def _iteration_time(step, cut_costs, cuts, microbatches):
  parts = stage_costs(step, cuts)
  return sum(step) + sum(cut_costs[c] for c in cuts) + (microbatches - 1) * max(parts)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("stages,microbatches", [(2, 1), (2, 4), (3, 8), (4, 2)])
def test_partition_is_the_best_cut(seed, stages, microbatches):
  rng = np.random.default_rng(seed)
  forward = list(rng.uniform(0.1, 3.0, 8))
  backward = [2 * f for f in forward]
  cut_costs = [0.0] + list(rng.uniform(0.0, 1.0, 7))
  step = [f + b for f, b in zip(forward, backward)]
  cuts = partition(forward, backward, stages, microbatches, cut_costs=cut_costs)
  best = min(_iteration_time(step, cut_costs, c, microbatches) for c in itertools.combinations(range(1, 8), stages - 1))
  assert _iteration_time(step, cut_costs, cuts, microbatches) == pytest.approx(best)


@pytest.mark.parametrize("schedule", [Schedule.GPIPE, Schedule.ONE_F_ONE_B])
@pytest.mark.parametrize("stages,microbatches", [(2, 1), (2, 4), (4, 4), (4, 8)])
def test_uniform_stages_take_the_textbook_time(schedule, stages, microbatches):
  f, b = 1.0, 2.0  # (M + S − 1)(f + b), bubbles (S − 1)/(M + S − 1): GPipe paper / PipeDream-flush
  timeline = simulate(schedule, [f] * stages, [b] * stages, microbatches)
  assert timeline.makespan == pytest.approx((microbatches + stages - 1) * (f + b))
  assert timeline.bubble_fraction == pytest.approx((stages - 1) / (microbatches + stages - 1))


def _in_flight_peak(timeline, stage):
  """Most micro-batches whose forward ran on `stage` and whose backward has not (activations held)."""
  peak = held = 0
  for timed in timeline.on_stage(stage):
    held += 1 if timed.action.kind == FORWARD else -1
    peak = max(peak, held)
  return peak


def test_1f1b_holds_fewer_activations_than_gpipe():
  gpipe = simulate("gpipe", [1.0] * 4, [2.0] * 4, 8)
  one_f_one_b = simulate("1f1b", [1.0] * 4, [2.0] * 4, 8)
  assert _in_flight_peak(gpipe, 0) == 8
  assert [_in_flight_peak(one_f_one_b, s) for s in range(4)] == [4, 3, 2, 1]


def _by_key(timeline):
  return {(t.action.kind, t.action.stage, t.action.microbatch): t for t in timeline.actions if t.action.kind != FROZEN}


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_every_pass_waits_for_its_input_and_its_stage(schedule):
  rng = np.random.default_rng(1)
  forward = list(rng.uniform(0.5, 2, 3))
  timeline = simulate(schedule, forward, [2 * f for f in forward], 5, transfer=[0.3, 0.2])
  done = _by_key(timeline)
  for (kind, s, m), t in done.items():
    if kind == FORWARD and s > 0:
      assert t.start >= done[(FORWARD, s - 1, m)].end + [0.3, 0.2][s - 1] - 1e-9
      assert t.tick > done[(FORWARD, s - 1, m)].tick
    if kind == BACKWARD:
      assert t.start >= done[(FORWARD, s, m)].end - 1e-9
      if s < 2:
        assert t.start >= done[(BACKWARD, s + 1, m)].end + [0.3, 0.2][s] - 1e-9
        assert t.tick > done[(BACKWARD, s + 1, m)].tick
  for s in range(3):
    row = timeline.on_stage(s)
    assert all(a.end <= b.start + 1e-9 and a.tick < b.tick for a, b in zip(row, row[1:]))


def _check_filled(timeline, jobs):
  for s in range(timeline.stages):
    row = timeline.on_stage(s)
    assert all(a.end <= b.start + 1e-9 for a, b in zip(row, row[1:])), "work overlaps on one device"
  for job in jobs:
    pieces = [t for t in timeline.actions if t.action.job == job.name]
    for piece in pieces:  # a layer's samples start only after as many finished the layer before
      if piece.action.layer > 0:
        before = sum(p.action.samples for p in pieces
                     if p.action.layer == piece.action.layer - 1 and p.end <= piece.start + 1e-9)
        started = sum(p.action.samples for p in pieces if p.action.layer == piece.action.layer and p.start <= piece.start)
        assert started <= before
    placed = sum(job.layer_costs[p.action.layer] * p.action.samples / job.samples for p in pieces)
    yield job, placed


def test_frozen_work_that_fits_fills_bubbles_without_lengthening_the_iteration():
  pipeline = plan("1f1b", [1.0] * 8, [2.0] * 8, 4, 4)
  jobs = [FrozenJob("text_encoder", (0.5, 0.5, 0.5), 8), FrozenJob("vae_encoder", (1.0, 1.0), 8)]
  filled = plan("diffusionpipe", [1.0] * 8, [2.0] * 8, 4, 4, frozen=jobs)
  baseline = plan("1f1b", [1.0] * 8, [2.0] * 8, 4, 4, frozen=jobs)
  assert filled.leftover == pytest.approx(0.0)
  assert filled.makespan == pytest.approx(pipeline.makespan)
  assert baseline.makespan == pytest.approx(pipeline.makespan + sum(j.cost for j in jobs) / 4)
  assert filled.bubble_fraction < pipeline.bubble_fraction
  for job, placed in _check_filled(filled, jobs):
    assert placed == pytest.approx(job.cost)


def test_frozen_work_too_big_for_the_bubbles_is_left_over_in_partial_batches():
  jobs = [FrozenJob("text_encoder", (8.0, 8.0), 16)]  # 0.5 per sample and layer; ~6 idle
  timeline = fill_bubbles(simulate("1f1b", [1.0] * 2, [2.0] * 2, 2), jobs)
  (job, placed), = list(_check_filled(timeline, jobs))
  assert 0 < placed < job.cost
  assert timeline.leftover == pytest.approx(job.cost - placed)
  assert any(t.action.samples < 16 for t in timeline.actions if t.action.kind == FROZEN)  # a partial batch


def test_charts_show_every_device(tmp_path):
  timeline = plan("diffusionpipe", [1.0] * 6, [2.0] * 6, 3, 4, frozen=[FrozenJob("text_encoder", (1.0,), 4)])
  text = describe(timeline)
  assert [line.split("|")[0].strip() for line in text.splitlines()[1:4]] == ["device 0", "device 1", "device 2"]
  assert "a = text_encoder" in text and "bubbles" in text
  image = Image.open(draw(timeline, tmp_path / "timeline.png"))
  assert image.size[0] == 1200 and len(set(image.getdata())) > 3  # white, text and the kinds' colours


def test_bad_plans_name_the_fix():
  with pytest.raises(ValueError, match="cannot cut 3 segments into 4 stages: use 1 to 3"):
    partition([1.0] * 3, [2.0] * 3, 4, 2)
  with pytest.raises(ValueError, match="unknown pipeline schedule 'zb'; valid: gpipe, 1f1b, diffusionpipe"):
    plan("zb", [1.0] * 3, [2.0] * 3, 2, 2)
