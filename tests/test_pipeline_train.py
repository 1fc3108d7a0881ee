"""DiffusionPipe's pipelined training step (dfjax/training/pipeline_step.py) on 8 CPU devices, fp32:
one pipelined step, under every schedule, with and without data parallelism, of the UNet and of the
DiT, equals the single-device step of `dfjax.training.loop` (its `_loss` on the whole batch, the
UNet's class tokens or `--frozen-text` encoder frozen, its optimiser on the denoiser): loss, gradients (read from AdamW's first moment, so one compiled
step serves the whole comparison), and the params and EMA after two steps; the
frozen parts' outputs (class tokens or text encoder context, VAE latents) computed in the bubbles for the next
batch are bit-identical to computing them up front. Plans that do not fit are refused with the valid choices; a pipelined `dfjax train` run
stopped and resumed gives the uninterrupted run's loss curve and weights."""

import csv
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dfjax import commands
from dfjax.training import TrainConfig, load_trained
from dfjax.data import class_names
from dfjax.training.captions import CaptionEncoder
from dfjax.training.fixed_weights import fixed_seed_params
from dfjax.training.loop import FAST_COMPILE, _graphdef, _loss, make_optimizer, noised_batch
from dfjax.training.model import run_spec
from dfjax.training.pipeline_calibrate import describe_costs
from dfjax.training.pipeline_frozen import CONDITION, ENCODER_SEED, FROZEN_ENCODERS, X0, encoder_part
from dfjax.training.pipeline_plan import Piece, PipelineConfig, analytic_costs, make_plan
from dfjax.training.pipeline_schedule import BACKWARD, FORWARD, FROZEN
from dfjax.training.pipeline_step import executor_for, step_key
from dfjax.training.pipeline_train import train_pipelined
from models.layers import Workload
from models.vae import Encoder
from sharding.accounting import comm

BATCH, IMAGE = 16, (8, 8, 3)
CFG = TrainConfig(out="", model="tiny", batch=BATCH, warmup_steps=1, weight_decay=0.01)
# what the backbone trains on: the UNet's 8² (2 levels), the DiT's 16² (8×8 patches: 2 × 2 tokens); the
# frozen VAE encoder halves the images into latents of those sizes
IMAGES = {("tiny", "none"): IMAGE, ("dit-tiny", "none"): (16, 16, 3), ("tiny", "vae"): (16, 16, 3),
          ("dit-tiny", "vae"): (32, 32, 3)}


def _cfg(model, text="none"):
  return dataclasses.replace(CFG, model=model, frozen_text=text)


@functools.cache
def _batches(model, encoder="none"):
  rng = np.random.default_rng(0)
  return [(rng.uniform(-1, 1, (BATCH, *IMAGES[model, encoder])).astype(np.float32),
           rng.integers(0, 4, BATCH).astype(np.int32)) for _ in range(3)]


def _encoded(images, encoder, *, whole_batch=False):
  """The backbone's training input: the images, or the frozen encoder's latents (its scaled posterior
  mean) of them, from its fixed weights: one sample at a time as the executor runs it (the same
  latents: what the single-device reference trains on), or `whole_batch`, `models.vae.Encoder` called
  on the batch at once (independent of the pipeline code; equal up to rounding)."""
  if encoder == "none":
    return images
  params = fixed_seed_params(Encoder, FROZEN_ENCODERS[encoder], ENCODER_SEED)
  return np.asarray(_encode(encoder, images.shape[1:], whole_batch)(params, images))


@functools.cache
def _encode(encoder, image_shape, whole_batch):
  config = FROZEN_ENCODERS[encoder]
  graphdef = nnx.split(nnx.eval_shape(lambda: Encoder(config, rngs=nnx.Rngs(0))), nnx.Param)[0]
  if whole_batch:
    return jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)[..., :config.latent_channels] * config.scaling_factor)
  part = encoder_part(encoder, image_shape)
  return jax.jit(lambda p, x: part.run(nnx.merge(graphdef, p), x))


@functools.cache
def _model(model, text="none"):
  """The variant at seed 0 (with `text`, the UNet's class tokens given way to that frozen text encoder of
  the captions, which has no params), initialised in one fast-compiled program (built eagerly, each
  initialiser compiles on its own: minutes for the tiny UNet on a loaded 2-core machine)."""
  spec = run_spec(model, text)
  graphdef = nnx.split(nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0))))[0]
  state = jax.jit(lambda: nnx.split(spec.build(rngs=nnx.Rngs(jax.random.key(0))))[1],
                  compiler_options=FAST_COMPILE)()
  return nnx.merge(graphdef, state)


def _state_from(ex, model, text="none"):
  """The executor's training state of `_model(model, text)`, packed in one fast-compiled program."""
  graphdef, state = nnx.split(_model(model, text))
  return jax.jit(lambda s: ex.state_from(nnx.merge(graphdef, s)), compiler_options=FAST_COMPILE)(state)


def _first_moment(opt_state):
  """AdamW's first moment: after the first step, 0.1 × the clipped gradient (and the clipping
  factor is the gradient's own global norm), so matching it matches the gradient."""
  return optax.tree_utils.tree_get(opt_state, "mu")


def _denoiser_key(model):
  return "unet" if "unet" in nnx.state(_model(model), nnx.Param) else "dit"


@functools.cache
def _reference(model, encoder="none", text="none"):
  """Two single-device steps: loop._loss on the whole batch (of images, or of the frozen encoder's
  latents of them; the UNet's context its class tokens or, with `text`, the frozen text encoder's of
  the captions), gradients of the denoiser's params only (the UNet's class tokens frozen; the DiT has
  none), loop's optimiser (global-norm clipping, AdamW) and EMA on them."""
  full, key, cfg = nnx.state(_model(model, text), nnx.Param), _denoiser_key(model), _cfg(model, text)
  frozen = {name: part for name, part in full.items() if name != key}
  optimizer = make_optimizer(cfg)[0]

  def loss_of(denoiser, images, labels, step):
    params = nnx.State({key: denoiser, **frozen})
    return _loss(params, _graphdef(model, text), images, labels, step_key(cfg, step), cfg.static())

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def one_step(unet, opt_state, ema, images, labels, step):
    loss, g = jax.value_and_grad(loss_of)(unet, images, labels, step)
    updates, opt_state = optimizer.update(g, opt_state, unet)
    unet = optax.apply_updates(unet, updates)
    decay = jnp.minimum(cfg.ema_decay, (1.0 + step) / (10.0 + step))
    return loss, unet, opt_state, jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), ema, unet)

  unet = full[key]
  opt_state, ema, losses = optimizer.init(unet), unet, []
  for step, (images, labels) in enumerate(_batches(model, encoder)[:2]):
    loss, unet, opt_state, ema = one_step(unet, opt_state, ema, _encoded(images, encoder), labels, jnp.int32(step))
    losses.append(loss)
    if step == 0:
      moment = _first_moment(opt_state)
  return jax.device_get((losses, moment, unet, ema))


@functools.cache
def _pipelined(stages, microbatches, data, schedule, model="tiny", encoder="none", text="none"):
  """Two pipelined steps (one compile): their losses, the first moment after the first step, the
  params and EMA after both, the next batch's inputs (from the bubbles, and up front), and the compiled
  step's HLO."""
  plan = make_plan(PipelineConfig(stages, microbatches, data, schedule, frozen_encoder=encoder), model, BATCH,
                   IMAGES[model, encoder], frozen_text=text)
  ex = executor_for(_cfg(model, text), plan)
  batches = _batches(model, encoder)
  state = jax.device_put(_state_from(ex, model, text), ex.shardings())
  inputs = ex.frozen_outputs(state, *batches[0])
  compiled = ex.step.lower(state, inputs, *batches[1]).compile()
  losses, carried, up_front = [], [], []
  for step in range(2):
    state, loss, inputs = compiled(state, inputs, *batches[step + 1])
    losses.append(float(loss))
    carried.append(jax.device_get(inputs))
    up_front.append(jax.device_get(ex.frozen_outputs(state, *batches[step + 1])))
    if step == 0:
      moment = ex.denoiser_params(_first_moment(state["opt_state"]))  # read before the next step donates it
  return {"losses": losses, "moment": moment, "params": ex.denoiser_params(state["params"]),
          "ema": ex.denoiser_params(state["ema"]), "carried": carried, "up_front": up_front, "plan": plan,
          "row": state["params"]["rows"]["float32"], "hlo": compiled.as_text()}


@functools.cache
def _caption_context():
  encoder = CaptionEncoder(class_names, run_spec("tiny").token_dim)
  return jax.jit(lambda labels: encoder(labels))


def _captioned(labels):
  """The frozen text encoder's context of `labels`' captions: `CaptionEncoder` on the whole batch at once."""
  return np.asarray(_caption_context()(jnp.asarray(labels)))


def _close(actual, expected, rtol):
  """Every leaf within rtol of its own largest magnitude (fp32 sums in another order)."""
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    a, e = np.asarray(a), np.asarray(e)
    scale = max(float(np.max(np.abs(e))), 1e-30)
    assert float(np.max(np.abs(a - e))) <= rtol * scale, (float(np.max(np.abs(a - e))), scale)


def _close_after_adamw(actual, expected, moment, rtol, model):
  """Params (or their EMA) after the two steps: each element within rtol of its leaf's largest magnitude,
  plus what AdamW's per-element normalisation makes of the gradient's own tolerance. The first moment
  (0.1 × the gradient) matches to rtol of its leaf's largest |m|; AdamW divides each element's moment
  by that element's own magnitude, so an element with |m_i| ≪ max |m| turns a relative error of up to
  rtol · max|m| / |m_i| into its update, which is at most the learning rate (summed over the steps).
  Measured where this matters: UNet S1 M1 D2 1F1B with the encoder, an up-block GroupNorm bias whose
  first moment is 2.3e-6, 111× below its leaf's largest: 5.1e-8 off in an update of 6.1e-4 (2.5e-5 of
  the leaf's largest param; the bound allows 2.2e-6)."""
  lr = sum(float(make_optimizer(_cfg(model))[1](step)) for step in range(2))
  for a, e, m in zip(*map(jax.tree.leaves, (actual, expected, moment)), strict=True):
    a, e, m = np.asarray(a), np.asarray(e), np.abs(np.asarray(m))
    amplified = np.minimum(1.0, rtol * np.max(m) / np.maximum(m, 1e-30))
    bound = rtol * max(float(np.max(np.abs(e))), 1e-30) + lr * amplified
    assert np.all(np.abs(a - e) <= bound), float(np.max(np.abs(a - e) - bound))


# the default suite's compiles: the UNet's (with the frozen text encoder of the captions and the frozen VAE
# encoder: both in the bubbles, the VAE encoder's last two layers partly left over, shared by the stages after
# the pipeline) and the DiT's smallest pipelined case; the grids are slow
CASES = [(2, 4, 2, "diffusionpipe", "tiny", "vae", "clip"), (2, 2, 1, "diffusionpipe", "dit-tiny", "none", "none")]
GRID = [(s, m, d, sched, "tiny", "none", "none") for sched in ("diffusionpipe", "1f1b", "gpipe") for s in (2, 4)
        for m in (1, 2, 4, 8) for d in (1, 2)]
# dit-tiny has 3 segments (embed, its one block, out): S = 2 and 3
DIT_GRID = [(s, m, d, sched, "dit-tiny", "none", "none") for sched in ("diffusionpipe", "1f1b", "gpipe")
            for s in (2, 3) for m in (1, 4) for d in (1, 2) if (s, m, d, sched, "dit-tiny", "none", "none") not in CASES]
# the frozen encoder under the other schedules (all of it after the pipeline), with DP, and with the DiT
ENCODER_GRID = [(2, 2, 2, "diffusionpipe", "tiny", "vae", "none"), (2, 4, 1, "diffusionpipe", "tiny", "vae", "none"),
                (4, 8, 1, "diffusionpipe", "tiny", "vae", "none"), (2, 2, 2, "1f1b", "tiny", "vae", "none"),
                (2, 4, 2, "gpipe", "tiny", "vae", "none"), (1, 1, 2, "1f1b", "tiny", "vae", "none"),
                (3, 4, 1, "diffusionpipe", "dit-tiny", "vae", "none")]
# the frozen text encoder alone (its pieces in the bubbles, partial batches, leftover after them), and under 1F1B
TEXT_GRID = [(2, 2, 2, "diffusionpipe", "tiny", "none", "clip"), (4, 8, 1, "diffusionpipe", "tiny", "none", "clip"),
             (2, 4, 1, "1f1b", "tiny", "none", "clip")]


@pytest.mark.parametrize("case", CASES + [pytest.param(c, marks=pytest.mark.slow)
                                          for c in GRID + DIT_GRID + ENCODER_GRID + TEXT_GRID],
                         ids=lambda c: "{4}-S{0}-M{1}-D{2}-{3}-{5}-{6}".format(*c))
def test_pipelined_step_equals_single_device(case):
  model, encoder, text = case[-3:]
  got, ref_losses, ref_moment, ref_params, ref_ema = _pipelined(*case), *_reference(model, encoder, text)
  np.testing.assert_allclose(got["losses"], np.asarray(ref_losses), rtol=1e-5)
  _close(got["moment"], ref_moment, 1e-5)
  _close_after_adamw(got["params"], ref_params, ref_moment, 1e-5, model)
  _close_after_adamw(got["ema"], ref_ema, ref_moment, 1e-5, model)
  # the parameters moved (the comparison is not of two copies of the init)
  init = nnx.state(_model(model).denoiser, nnx.Param)
  assert max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(init))) > 1e-4
  # the frozen parts' outputs from the bubbles (cross-iteration) = computing them up front, bit for bit
  for carried, up_front in zip(got["carried"], got["up_front"], strict=True):
    for name in carried:
      np.testing.assert_array_equal(carried[name], up_front[name])
  # and those latents are the encoder's (run on the whole batch at once: equal up to rounding)
  for carried, (images, _) in zip(got["carried"], _batches(model, encoder)[1:]):
    _close(carried[X0], _encoded(images, encoder, whole_batch=True), 1e-5)
  # and the context is the text encoder's (models.clip's whole model on the batch's captions at once) of the
  # next step's dropped labels
  if text != "none":
    for step, (carried, (images, labels)) in enumerate(zip(got["carried"], _batches(model, encoder)[1:]), start=1):
      dropped = noised_batch(step_key(_cfg(model, text), step), images, labels, _cfg(model, text))[3]
      _close(carried[CONDITION], _captioned(dropped), 1e-5)
  # each device holds its own stage's row of the params, not the model
  assert got["row"].addressable_shards[0].data.shape[0] == 1


def test_frozen_work_crosses_the_stages_as_planned():
  """The compiled step's all-gathers over `stage`, read by the HLO reader (sharding/accounting/comm.py): one
  per tick of the outbox (S × O floats; inside a conditional taken only on the ticks that have a piece, which
  the reader, reading no predicate, counts on every tick: its figure is ticks × (S − 1) × O × 4 bytes), and
  per leftover piece one of the stages' 1/S shares of its samples: the work after the pipeline is split.
  (The step the exactness test ran: its compile is shared.)"""
  pipelined = _pipelined(*CASES[0])
  plan = pipelined["plan"]
  assert plan.frozen_pieces and plan.leftover_pieces  # the case has both
  traffic = comm.run_traffic(pipelined["hlo"])
  layers = [[layer.sample_size for layer in part.layers] for part in plan.frozen_parts]
  outbox = max(p.samples * layers[p.part][p.layer] for p in plan.frozen_pieces)
  shares = [-(-p.samples // plan.stages) * layers[p.part][p.layer] for p in plan.leftover_pieces]
  received = (plan.stages - 1) * 4  # bytes of a float32 from each other stage
  assert traffic.by_kind["all-gather"] == (plan.ticks + len(shares),
                                           received * (plan.ticks * outbox + sum(shares)))


def test_diffusionpipe_puts_the_class_tokens_in_a_bubble():
  plan = make_plan(PipelineConfig(2, 2, 2, "diffusionpipe"), CFG.model, BATCH, IMAGE)
  assert plan.frozen_pieces and not plan.leftover_pieces
  assert sum(p.samples for p in plan.frozen_pieces) == plan.shard_batch
  baseline = make_plan(PipelineConfig(2, 2, 2, "1f1b"), CFG.model, BATCH, IMAGE)
  assert not baseline.frozen_pieces and baseline.leftover_pieces == (Piece(0, 0, 0, plan.shard_batch),)


def _encoder_plan(stages=2, microbatches=2, data=2, schedule="diffusionpipe"):
  return make_plan(PipelineConfig(stages, microbatches, data, schedule, frozen_encoder="vae"), CFG.model, BATCH,
                   IMAGES["tiny", "vae"])


def test_frozen_encoder_layer_costs_match_xla_cost_analysis():
  """The filler's per-layer jobs are the encoder's real work: each layer's analytic FLOPs (what the
  plan gives the filler, per sample) against XLA's count of that layer compiled on one sample."""
  plan, config = _encoder_plan(), FROZEN_ENCODERS["vae"]
  encoder = nnx.eval_shape(lambda: Encoder(config, rngs=nnx.Rngs(0)))  # FLOPs need shapes only
  graphdef, params = nnx.split(encoder)
  part = plan.frozen_parts[1]
  assert [layer.name for layer in part.layers] == ["conv_in", "down_blocks.0", "down_blocks.1", "mid_block",
                                                   "conv_out"]
  x = jnp.zeros((1, *IMAGES["tiny", "vae"]), jnp.float32)
  unpadded = encoder.layer_costs(Workload(*x.shape[1:3], 0, padded=False))
  for index, layer in enumerate(part.layers):
    run = jax.jit(lambda p, x, index=index: nnx.merge(graphdef, p).run_layer(index, x), compiler_options=FAST_COMPILE)
    cost = run.lower(params, x).compile().cost_analysis()  # of abstract params and input
    xla = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
    inside = sum(unpadded[layer.name].flops.values())  # the taps inside the image, as XLA counts them
    assert 1.0 <= xla / inside < 1.15, (layer.name, xla, inside)  # XLA also counts the elementwise work
    assert inside <= layer.flops  # the plan counts the zero padding's taps too, as published figures do
    x = jax.eval_shape(run, params, x)
  assert x.shape[1:] == (*part.layers[-1].sample_shape[:-1], 2 * config.latent_channels)


def test_frozen_encoder_pieces_fill_the_bubbles_layer_by_layer():
  """Every (layer, sample) of both frozen parts runs exactly once, in a bubble or after the pipeline;
  a piece of layer l runs at a later tick than every piece of layer l − 1 that made its samples;
  the pieces' time is what the bubbles lose: the bubble fraction falls by it, from 1F1B's."""
  plan, baseline = _encoder_plan(), _encoder_plan(schedule="1f1b")
  pieces = plan.piece_table()
  tick_of = {index: tick for tick, row in enumerate(pieces) for index in row if index >= 0}
  assert sorted(tick_of) == list(range(len(plan.frozen_pieces)))
  layers = {(0, 0)} | {(1, layer) for layer in range(5)}
  for part, layer in layers:
    covered = sorted((p.first, p.first + p.samples) for p in plan.frozen_pieces + plan.leftover_pieces
                     if (p.part, p.layer) == (part, layer))
    assert covered[0][0] == 0 and covered[-1][1] == plan.shard_batch
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))  # no gap, no overlap
  assert {(p.part, p.layer) for p in plan.frozen_pieces} == layers  # here every layer found room
  for index, piece in enumerate(plan.frozen_pieces):
    for below, other in enumerate(plan.frozen_pieces):
      if (other.part, other.layer) == (piece.part, piece.layer - 1) and \
         other.first < piece.first + piece.samples and piece.first < other.first + other.samples:
        assert tick_of[below] < tick_of[index]
  frozen_time = sum(t.end - t.start for t in plan.timeline.actions if t.action.kind == FROZEN)
  per_sample = {(i, l): layer.flops for i, part in enumerate(plan.frozen_parts) for l, layer in enumerate(part.layers)}
  assert frozen_time == pytest.approx(sum(per_sample[p.part, p.layer] * p.samples for p in plan.frozen_pieces))
  span = plan.timeline.makespan * plan.stages
  assert plan.timeline.makespan == pytest.approx(baseline.timeline.makespan - baseline.timeline.leftover / plan.stages
                                                 + plan.timeline.leftover / plan.stages)
  assert plan.timeline.bubble_fraction == pytest.approx(
      1 - (sum(plan.forward) + sum(plan.backward)) * plan.microbatches / span - frozen_time / span)
  assert plan.timeline.bubble_fraction < 0.5 * make_plan(PipelineConfig(2, 2, 2, "diffusionpipe"), CFG.model, BATCH,
                                                         IMAGE).timeline.bubble_fraction


def test_frozen_encoder_needs_images_it_downsamples():
  with pytest.raises(ValueError, match=r"sides divide by 2; got 15×16×3"):
    make_plan(PipelineConfig(2, 2, 1, frozen_encoder="vae"), CFG.model, 8, (15, 16, 3))
  with pytest.raises(ValueError, match="unknown frozen encoder 'clip'; valid: none, vae"):
    PipelineConfig(2, 1, 1, frozen_encoder="clip")


@pytest.mark.parametrize("stages,microbatches,schedule", [(2, 4, "gpipe"), (4, 4, "1f1b"), (3, 2, "diffusionpipe")])
def test_tables_run_every_pass_once_after_its_input_arrived(stages, microbatches, schedule):
  """Read independently of the planner: per (stage, micro-batch) one forward and one backward; a
  forward on stage s > 0 comes after the activation arrived (receives_forward at an earlier tick),
  a backward after its own forward and, below the last stage, after the gradient arrived."""
  plan = make_plan(PipelineConfig(stages, microbatches, 1, schedule), CFG.model, 8, IMAGE)
  branch, micro = plan.branch_table(), plan.microbatch_table()
  arrived_f, arrived_b = plan.receives_forward(), plan.receives_backward()
  seen = {}
  for tick, row in enumerate(branch):
    for stage, code in enumerate(row):
      if 1 <= code <= 2 * stages:
        assert (code - 1) // 2 == stage
        kind, m = (FORWARD, BACKWARD)[(code - 1) % 2], micro[tick][stage]
        assert (kind, stage, m) not in seen
        seen[(kind, stage, m)] = tick
        if kind == FORWARD and stage > 0:
          assert any(arrived_f[k][stage] == m for k in range(tick))
        if kind == BACKWARD:
          assert seen[(FORWARD, stage, m)] < tick
          if stage < stages - 1:
            assert any(arrived_b[k][stage] == m for k in range(tick))
  assert len(seen) == 2 * stages * microbatches


@pytest.mark.parametrize("stages,microbatches,schedule", [(2, 8, "gpipe"), (4, 8, "1f1b"), (4, 8, "diffusionpipe")])
def test_buffer_slots_hold_each_value_until_its_last_reader(stages, microbatches, schedule):
  """Replays every stage's stash and gradient buffer over the ticks (read, then store the arrival):
  each forward and backward finds its own micro-batch's value in the slot it reads. 1F1B keeps at
  most S activations in flight, GPipe all M (its last forward precedes its first backward)."""
  plan = make_plan(PipelineConfig(stages, microbatches, 1, schedule), CFG.model, 8, IMAGE)
  branch, micro = plan.branch_table(), plan.microbatch_table()
  for slots, arrivals, readers in ((plan.activation_slots(), plan.receives_forward(), (FORWARD, BACKWARD)),
                                   (plan.gradient_slots(), plan.receives_backward(), (BACKWARD,))):
    for stage in range(stages):
      receives = stage > 0 if readers[0] == FORWARD else stage < stages - 1  # the ends receive nothing
      held, reads = [None] * slots.count, 0
      for tick, row in enumerate(branch):
        code = row[stage]
        if receives and 1 <= code <= 2 * stages and (FORWARD, BACKWARD)[(code - 1) % 2] in readers:
          assert held[slots.read[tick][stage]] == micro[tick][stage]
          reads += 1
        if arrivals[tick][stage] >= 0:
          held[slots.store[tick][stage]] = arrivals[tick][stage]
      assert reads == (len(readers) * microbatches if receives else 0)
  peak = plan.activation_slots().count
  assert peak == microbatches if schedule == "gpipe" else peak <= stages


def test_plans_that_do_not_fit_name_the_valid_choices():
  with pytest.raises(ValueError, match=r"has 7 segments \(0 embed, 1 down_blocks.0.*use 1 to 7 stages"):
    make_plan(PipelineConfig(8, 1, 1), CFG.model, 8, IMAGE)
  with pytest.raises(ValueError, match=r"valid --micro-batches for --data 2: \[1, 2, 4\]"):
    make_plan(PipelineConfig(2, 3, 2), CFG.model, 8, IMAGE)
  with pytest.raises(ValueError, match=r"--data must divide the batch"):
    make_plan(PipelineConfig(2, 1, 3), CFG.model, 8, IMAGE)
  with pytest.raises(ValueError, match=r"4 × --data 4 = 16 devices, but 8 are available"):
    make_plan(PipelineConfig(4, 1, 4), CFG.model, 16, IMAGE)
  with pytest.raises(ValueError, match="unknown pipeline schedule 'zb'; valid: gpipe, 1f1b, diffusionpipe"):
    PipelineConfig(2, 1, 1, "zb")
  with pytest.raises(ValueError, match="microbatches must be a positive int"):
    PipelineConfig(2, 0, 1)


def _loss_csv(folder):
  with open(folder / "loss.csv", newline="") as f:
    return list(csv.DictReader(f))


@pytest.mark.slow
def test_pipelined_run_resumes_exactly(tmp_path, capsys):
  """`dfjax train --pipeline-stages 2 --micro-batches 2` for 3 steps, and the same run stopped after
  step 1 (inside a logging interval) and resumed: the same loss curve and weights."""
  flags = ["--model", "tiny", "--steps", "3", "--batch", "4", "--save-every", "2", "--log-every", "2",
           "--warmup-steps", "2", "--pipeline-stages", "2", "--micro-batches", "2", "--schedule", "diffusionpipe"]
  whole, split = tmp_path / "whole", tmp_path / "split"
  assert commands.main(["train", "--out", str(whole), *flags]) == 0
  printed = capsys.readouterr().out
  assert "stage 0: embed" in printed and "device 1 |" in printed and "bubbles" in printed
  assert (whole / "pipeline.png").stat().st_size > 0
  cfg = TrainConfig(out=str(split), model="tiny", steps=3, batch=4, save_every=2, log_every=2, warmup_steps=2)
  pipeline = PipelineConfig(2, 2, 1, "diffusionpipe")
  assert train_pipelined(cfg, pipeline, stop_at=1, progress=False, echo=lambda _: None) is None
  resumed = train_pipelined(cfg, pipeline, resume=True, progress=False, echo=lambda _: None)
  assert _loss_csv(whole / "model") == _loss_csv(resumed)
  a, b = load_trained(whole / "model"), load_trained(resumed)
  for x, y in zip(jax.tree.leaves(nnx.state(a.denoiser)), jax.tree.leaves(nnx.state(b.denoiser)), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  with pytest.raises(ValueError, match="its run was pipelined as"):
    train_pipelined(cfg, PipelineConfig(2, 1, 1, "gpipe"), resume=True, progress=False, echo=lambda _: None)


@pytest.mark.slow
def test_calibrated_plan_times_every_segment():
  """`--calibrate`: each segment's forward and backward timed once (the backward recomputes the
  forward, so it costs more in total), planned with, and printed beside the analytic FLOPs."""
  plan = make_plan(PipelineConfig(2, 2, 1, "diffusionpipe", calibrate=True), CFG.model, 8, IMAGE)
  assert len(plan.forward) == len(plan.backward) == len(plan.segment_names) == 7
  assert all(0 < f < 10 for f in plan.forward) and all(0 < b < 10 for b in plan.backward)  # seconds, not FLOPs
  assert sum(plan.backward) > sum(plan.forward)
  table = describe_costs(plan.segment_names, analytic_costs(CFG.model, IMAGE, plan.microbatch)[0],
                         (plan.forward, plan.backward))
  assert all(name in table for name in plan.segment_names) and "timed backward ms" in table


def test_calibrated_costs_decide_the_partition(monkeypatch):
  """`calibrate`: the plan is made with the timed costs, not the FLOPs. Timings skewed as on a device
  where the first segment is slow (here injected in place of the timing) move the cut: the slow
  segment gets a stage of its own, where the analytic FLOPs put more segments with it."""
  from dfjax.training import pipeline_plan

  names = pipeline_plan.segment_names(CFG.model)
  timed = ([50.0] + [1.0] * (len(names) - 1), [100.0] + [2.0] * (len(names) - 1))
  asked = []
  monkeypatch.setattr(pipeline_plan, "timed_costs", lambda *args: asked.append(args) or timed)
  calibrated = make_plan(PipelineConfig(2, 2, 1, "diffusionpipe", calibrate=True), CFG.model, 8, IMAGE)
  analytic = make_plan(PipelineConfig(2, 2, 1, "diffusionpipe"), CFG.model, 8, IMAGE)
  assert asked == [(CFG.model, IMAGE, 4, "none")]  # timed once, for the plan's micro-batch of 4 (class tokens)
  assert (calibrated.forward, calibrated.backward) == tuple(map(tuple, timed))
  assert calibrated.stage_of_segment == (0,) + (1,) * (len(names) - 1)
  assert analytic.stage_of_segment.count(0) > 1
  assert calibrated.describe_partition().startswith("stage 0: embed (89.3 % of the forward)")  # 50 / (50 + 6)


def _percent_column(line, index):
  return float([part for part in line.split() if part.endswith("%")][index].rstrip("%"))


@pytest.mark.slow
def test_dfjax_train_calibrate_plans_with_the_printed_timings(tmp_path, capsys):
  """`dfjax train --calibrate` end to end: the printed table's timed forward shares are the shares the
  printed partition reports (so the plan used the timed costs), and the run trains."""
  out = tmp_path / "run"
  assert commands.main(["train", "--out", str(out), "--model", "tiny", "--steps", "1", "--batch", "4",
                        "--pipeline-stages", "2", "--micro-batches", "2", "--calibrate"]) == 0
  printed = capsys.readouterr().out.splitlines()
  names = make_plan(PipelineConfig(2, 2), CFG.model, 4, (64, 64, 3)).segment_names
  table = {line.split()[0]: line for line in printed if line.split() and line.split()[0] in names}
  timed_share = {name: _percent_column(line, 1) for name, line in table.items()}  # columns: FLOPs, forward, backward
  stages = [line for line in printed if line.startswith("stage ")]
  assert len(stages) == 2 and len(table) == len(names)
  for line in stages:
    members = line.split(": ", 1)[1].split(" (")[0].split(", ")
    assert float(line.split("(")[-1].split(" %")[0]) == pytest.approx(sum(timed_share[n] for n in members), abs=0.5)
  assert _loss_csv(out / "model")


@pytest.mark.slow
def test_bench_train_calibrate(capsys):
  """`dfjax bench train --calibrate`: every method planned with the timed costs, printed with the table."""
  assert commands.main(["bench", "train", "--devices", "2", "--micro-batches", "2", "--batch", "4",
                        "--image-size", "8", "--iters", "1", "--calibrate"]) == 0
  printed = capsys.readouterr().out
  assert "timed backward ms" in printed and "planned with the timed ones" in printed
  assert "under segment costs timed on this device" in printed
  for method in ("data", "gpipe", "1f1b", "diffusionpipe"):
    assert any(line.startswith(method) for line in printed.splitlines())
