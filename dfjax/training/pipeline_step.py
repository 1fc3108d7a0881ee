"""DiffusionPipe's pipelined training step: one `jax.jit` over a (data D × stage S) mesh.

The class-conditional UNet's or DiT's segments (dfjax/training/pipeline_backbone.py) are cut into
S consecutive stages (`PipelinePlan`); each
device holds only its stage's params, AdamW moments and EMA, packed into its row of (S, n)
buffers sharded over `stage` (sharding/stage_params.py). A step is a `lax.scan` over the plan's
lock-step ticks (dfjax/training/pipeline_schedule.py): at each tick every device looks up its
action in a static (ticks, S) table and runs it with `lax.switch` —

  F(m)   the forward of micro-batch m through its segments (stage 0 builds the carry from the
         batch, the others read the activation they received; the last stage takes the loss);
  B(m)   the backward: `jax.vjp` of the stage, recomputed from the stashed input, with the
         gradient received from the next stage (the last stage starts from the loss);
  piece  one layer of a frozen part (the UNet's class tokens or text encoder, the VAE encoder:
         pipeline_frozen.py) on
         a run of samples of the NEXT step's batch, in a bubble (DiffusionPipe's cross-iteration
         overlap, partial batches);

— then every stage sends its activation to the next stage and its gradient to the previous one
(`ppermute`, outside the branches), and the pieces made this tick go to every stage: each stage
puts what its piece made into a fixed-size outbox, an `all_gather` over `stage` (on ticks that have
a piece) hands every stage all outboxes, and each writes them into its copy of the parts' per-layer
buffers (carried through the scan), so that a later layer's piece on any stage reads its input
there. Pieces the bubbles had no room for run after the scan, layer by layer, each shared by the
stages (a 1/S share each, then gathered). What crosses a cut is a model carry of a different pytree at
every cut, so each is flattened into one padded 1-D buffer of the longest cut's length, the same
shape everywhere. After the scan, the gradients are summed over `data`, and AdamW with global-norm
clipping (elementwise on the packed rows: the norm is the only reduction over `stage`) and the EMA
update the rows, exactly the optimiser `dfjax.training.loop` runs on one device.

The UNet's class tokens are frozen in pipeline mode (they keep their initial values): that is the
frozen part of this model, as the text and VAE encoders are for Stable Diffusion; with `--frozen-text`
a real one takes their place, the class captions' fixed-seed CLIP text encoder. The DiT embeds
its labels in its trainable "embed" segment, so all of it trains, as in `dfjax.training.loop`, and
its "condition" (what the previous step hands on) is the dropped labels themselves. What a step
hands the next is {"condition": …, "x0": what the backbone trains on (the images, or the frozen
encoder's latents)}.

Shape letters: B batch (global), b a data shard's batch, u a micro-batch, H, W, C what the backbone
trains on, T class tokens, D token width, L the padded cut length, k a buffer's slots, n a stage
row's length, O the outbox; `…` the condition's per-sample shape (T, D class tokens for the UNet,
none: a label, for the DiT).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dfjax.training.loop import FAST_COMPILE, TrainConfig, make_optimizer, noised_batch
from dfjax.training.pipeline_backbone import Backbone
from dfjax.training.pipeline_frozen import CONDITION, IMAGES, LABELS, X0
from dfjax.training.pipeline_plan import Piece, PipelinePlan
from models.parallel import SINGLE_DEVICE
from sharding.axes import DATA, STAGE
from sharding.exchange.stages import gather_from_stages, to_next_stage, to_previous_stage
from sharding.stage_params import StagedParams, params_by_segment
from sharding.strategies.staged import run_stage


# ---------------------------------------------------------------------------------- the batch

def step_key(cfg: TrainConfig, step) -> jax.Array:
  """The PRNG key of training step `step` (as `dfjax.training.loop` derives it)."""
  return jax.random.fold_in(jax.random.key(cfg.seed), step)


# ---------------------------------------------------------------------------------- flat cuts

@dataclasses.dataclass(frozen=True)
class _Flat:
  """A pytree of arrays ↔ one 1-D buffer of `length` (zero-padded): a cut's carry on the wire."""

  treedef: jax.tree_util.PyTreeDef
  shapes: tuple[tuple[int, ...], ...]
  dtypes: tuple[str, ...]

  @classmethod
  def of(cls, abstract) -> _Flat:
    leaves, treedef = jax.tree.flatten(abstract)
    return cls(treedef, tuple(tuple(a.shape) for a in leaves), tuple(np.dtype(a.dtype).name for a in leaves))

  @property
  def size(self) -> int:
    return sum(math.prod(s) for s in self.shapes)

  def pack(self, tree, length: int, dtype) -> jax.Array:
    flat = jnp.concatenate([jnp.ravel(a).astype(dtype) for a in jax.tree.leaves(tree)])  # size
    return jnp.pad(flat, (0, length - flat.shape[0]))  # L

  def unpack(self, buffer_l: jax.Array):
    leaves, start = [], 0
    for shape, dtype in zip(self.shapes, self.dtypes):
      size = math.prod(shape)
      leaves.append(buffer_l[start:start + size].reshape(shape).astype(dtype))
      start += size
    return jax.tree.unflatten(self.treedef, leaves)


# ---------------------------------------------------------------------------------- the executor

class PipelineExecutor:
  """The compiled pieces of pipelined training for one model, image size, batch and plan.

  Build it with `PipelineExecutor(cfg, plan)`; `init_state`, `frozen_outputs` and `step` are
  jitted. State: {"params": {"rows": {dtype: (S, n)}}, "opt_state", "ema", "step", "frozen": {part
  name: its params} (replicated)}, rows sharded over `stage`, replicated over `data`.
  """

  def __init__(self, cfg: TrainConfig, plan: PipelinePlan):
    self.cfg, self.plan = cfg.static(), plan
    self.mesh = plan.mesh()
    if plan.frozen_text != cfg.frozen_text:
      raise ValueError(f"the plan was made for frozen text {plan.frozen_text!r}, the run trains with "
                       f"{cfg.frozen_text!r}: make the plan with make_plan(..., frozen_text=cfg.frozen_text)")
    self.backbone = Backbone.of(cfg.model, cfg.frozen_text)
    abstract = self.backbone.abstract()
    self.denoiser_graphdef, denoiser_state = nnx.split(abstract.denoiser, nnx.Param)
    self.part_graphdefs = [nnx.split(part.abstract(abstract), nnx.Param)[0] for part in plan.frozen_parts]
    for part in plan.frozen_parts:  # a frozen encoder's fixed weights, made now: `fresh_state` runs in a trace
      part.params(abstract)
    u, (h, w, c) = plan.microbatch, plan.backbone_shape
    condition = self.backbone.condition_shape(u)
    x, t = np.zeros((u, h, w, c), np.float32), np.zeros((u,), np.int32)
    condition = np.zeros(condition.shape, condition.dtype)
    read = params_by_segment(abstract.denoiser, x, t, **self.backbone.condition_inputs(condition))
    self.staged = StagedParams.plan(denoiser_state, read, plan.stage_of_segment)
    if any(slot.stage is None for slot in self.staged.slots):
      raise ValueError(f"pipeline training needs every {self.backbone.kind} param read by exactly one segment; "
                       "this model shares or leaves unread some params")
    self.optimizer = make_optimizer(self.cfg)[0]
    # the carry crossing each cut, for one micro-batch
    carry = jax.eval_shape(lambda: self.backbone.first_carry(abstract.denoiser, x, t, condition))
    self.cuts: list[_Flat] = []
    for stage in range(plan.stages - 1):
      carry = jax.eval_shape(functools.partial(self._run_stage, stage), self._abstract_rows(), carry)
      self.cuts.append(_Flat.of(carry))
    self.length = max((cut.size for cut in self.cuts), default=1)
    # as dfjax.training.loop compiles the variant
    options = FAST_COMPILE if self.backbone.spec.fast_compile else None
    self.init_state = jax.jit(self.fresh_state, compiler_options=options)
    # placed as `step` hands the next batch's inputs on: the first step's, made here, must not compile
    # `step` a second time for another sharding
    self.frozen_outputs = jax.jit(self._frozen_outputs, out_shardings=self.batch_sharding(), compiler_options=options)
    self.step = jax.jit(self._step, donate_argnums=0, compiler_options=options)

  # -- layout helpers

  def _abstract_rows(self) -> dict:
    return {dtype: jax.ShapeDtypeStruct((1, n), dtype) for dtype, n in self.staged.row_lengths}

  def _denoiser(self, rows: dict, stage: int):
    return nnx.merge(self.denoiser_graphdef, self.staged.unpack({"rows": rows, "shared": {}}, stage))

  def _run_stage(self, stage: int, rows: dict, carry):
    return run_stage(self._denoiser(rows, stage), carry, self.plan.stage_of_segment, stage, SINGLE_DEVICE)

  def shardings(self) -> dict:
    """The state's placement: rows (and their moments) over `stage`, the rest replicated."""
    row = NamedSharding(self.mesh, P(STAGE))
    rep = NamedSharding(self.mesh, P())
    abstract = jax.eval_shape(self.fresh_state, jnp.int32(0))
    return jax.tree.map(lambda a: row if a.ndim == 2 and a.shape[0] == self.plan.stages and
                        a.shape[1] in dict(self.staged.row_lengths).values() else rep, abstract)

  def batch_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, P(DATA))

  # -- state

  def fresh_state(self, seed: jax.Array) -> dict:
    """The fresh training state of `seed` (traceable; `init_state` is it jitted)."""
    return self.state_from(self.backbone.build(rngs=nnx.Rngs(jax.random.key(seed))))

  def state_from(self, model: nnx.Module) -> dict:
    """Fresh training state from a joint model's params (traceable)."""
    packed = self.pack_params(nnx.state(model.denoiser, nnx.Param))
    frozen = {part.name: jax.tree.map(jnp.copy, part.params(model))  # copied: `step` donates the state
              for part in self.plan.frozen_parts}
    return {"params": packed, "opt_state": self.optimizer.init(packed), "ema": jax.tree.map(jnp.copy, packed),
            "step": jnp.zeros((), jnp.int32), "frozen": frozen}

  def pack_params(self, denoiser_params) -> dict:
    """Denoiser params → {"rows": {dtype: (S, n)}} (traceable: StagedParams.pack's layout)."""
    rows = {dtype: [[] for _ in range(self.plan.stages)] for dtype, _ in self.staged.row_lengths}
    for slot, leaf in zip(self.staged.slots, jax.tree.leaves(denoiser_params)):
      rows[slot.dtype][slot.stage].append(jnp.ravel(leaf))
    lengths = dict(self.staged.row_lengths)
    return {"rows": {dtype: jnp.stack([jnp.pad(jnp.concatenate(parts), (0, lengths[dtype] - sum(p.size for p in parts)))
                                       for parts in per_stage]) for dtype, per_stage in rows.items()}}

  def denoiser_params(self, packed: dict) -> nnx.State:
    """{"rows": …} → the denoiser's params as one state (on the host: gathers every stage)."""
    rows = jax.device_get(packed["rows"])
    values = []
    for slot in self.staged.slots:
      row = rows[slot.dtype][slot.stage]
      values.append(jnp.asarray(row[slot.start:slot.start + slot.size].reshape(slot.shape)))
    return jax.tree.unflatten(self.staged.treedef, values)

  def model(self, state: dict, *, ema: bool) -> nnx.Module:
    """The trained joint model (the denoiser from the rows, EMA or raw; the frozen class tokens)."""
    abstract = self.backbone.abstract()
    nnx.update(abstract.denoiser, self.denoiser_params(state["ema"] if ema else state["params"]))
    if "class_tokens" in state["frozen"]:
      nnx.update(abstract.class_tokens, jax.device_get(state["frozen"]["class_tokens"]))
    return abstract

  # -- the frozen parts

  def _part_modules(self, frozen: dict) -> list[nnx.Module]:
    return [nnx.merge(graphdef, frozen[part.name]) for graphdef, part in zip(self.part_graphdefs,
                                                                               self.plan.frozen_parts)]

  def _passed_through(self, dropped_b, images_bhwc) -> dict:
    """What a step hands the next where no frozen part makes it: the labels, the images."""
    return {CONDITION: dropped_b, X0: images_bhwc}

  def _frozen_outputs(self, state: dict, images_bhwc: jax.Array, labels_b: jax.Array) -> dict:
    """{"condition", "x0"} of step state["step"]'s batch (the frozen parts' outputs), computed up
    front: the first step's input (later steps get them from the previous step's bubbles)."""
    dropped_b = noised_batch(step_key(self.cfg, state["step"]), images_bhwc, labels_b, self.cfg)[3]
    out, sources = self._passed_through(dropped_b, images_bhwc), {LABELS: dropped_b, IMAGES: images_bhwc}
    for part, module in zip(self.plan.frozen_parts, self._part_modules(state["frozen"])):
      out[part.makes] = part.run(module, sources[part.reads])  # B, …
    return out

  # -- the step

  def _step(self, state: dict, inputs: dict, next_images_bhwc, next_labels_b):
    """One optimiser step: (state, this batch's {"condition", "x0"}, the next batch) →
    (state, loss, the next batch's {"condition", "x0"}). `state` is donated."""
    loss, grads, next_inputs = self._loss_and_grads(state, inputs, next_images_bhwc, next_labels_b)
    updates, opt_state = self.optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    step = state["step"].astype(jnp.float32)
    decay = jnp.minimum(self.cfg.ema_decay, (1.0 + step) / (10.0 + step))  # as loop._step
    ema = jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), state["ema"], params)
    new = {**state, "params": params, "opt_state": opt_state, "ema": ema, "step": state["step"] + 1}
    return new, loss, next_inputs

  def _loss_and_grads(self, state, inputs, next_images_bhwc, next_labels_b):
    """The pipelined forward and backward of one global batch: (loss, grads of the packed rows,
    the next batch's inputs)."""
    x0_bhwc = inputs[X0]
    x_bhwc, t_b, target_bhwc, _ = noised_batch(step_key(self.cfg, state["step"]), x0_bhwc,
                                               jnp.zeros(x0_bhwc.shape[:1], jnp.int32), self.cfg)
    next_dropped_b = noised_batch(step_key(self.cfg, state["step"] + 1), next_images_bhwc, next_labels_b,
                                  self.cfg)[3]
    scale = 1.0 / math.prod(x0_bhwc.shape)  # the loss is the mean over the global batch
    row, batch, rep = P(STAGE), P(DATA), P()
    rows = {"rows": {d: row for d, _ in self.staged.row_lengths}}
    run = jax.shard_map(functools.partial(self._on_device, scale=scale), mesh=self.mesh,
                        in_specs=(rows, rep, batch, batch, batch, batch, batch, batch),
                        out_specs=(rep, rows, batch), check_vma=False)
    on_data = lambda a: jax.reshard(a, NamedSharding(self.mesh, batch))  # noqa: E731
    return run(jax.reshard(state["params"], NamedSharding(self.mesh, row)),
               jax.reshard(state["frozen"], NamedSharding(self.mesh, rep)),
               *map(on_data, (inputs[CONDITION], x_bhwc, t_b, target_bhwc, next_dropped_b, next_images_bhwc)))

  def _on_device(self, params, frozen, condition_b, x_bhwc, t_b, target_bhwc, next_dropped_b, next_images_bhwc, *,
                 scale):
    """One device's share of the step: the scan over ticks, then the sums over `data` and `stage`."""
    plan, stages, u, length = self.plan, self.plan.stages, self.plan.microbatch, self.length
    rows = params["rows"]
    here = lax.axis_index(STAGE)
    wire = jnp.float32
    parts, pieces = plan.frozen_parts, plan.frozen_pieces
    modules = self._part_modules(frozen)
    sources = {LABELS: next_dropped_b, IMAGES: next_images_bhwc}
    outbox = max((p.samples * parts[p.part].layers[p.layer].sample_size for p in pieces), default=1)  # O

    def microbatch(a, m):
      return lax.dynamic_slice_in_dim(a, m * u, u)

    def stage_fn(stage):
      """(rows, input buffer, m) → output buffer (L,), or the loss on the last stage."""
      def run(rows, in_l, m):
        if stage == 0:
          carry = self.backbone.first_carry(self._denoiser(rows, 0), microbatch(x_bhwc, m), microbatch(t_b, m),
                                            microbatch(condition_b, m))
        else:
          carry = self.cuts[stage - 1].unpack(in_l)
        carry = self._run_stage(stage, rows, carry)
        if stage < stages - 1:
          return self.cuts[stage].pack(carry, length, wire)
        return scale * jnp.sum(jnp.square(carry.h.astype(jnp.float32) - microbatch(target_bhwc, m)))
      return run

    zero_l, zero_o = jnp.zeros((length,), wire), jnp.zeros((outbox,), wire)

    def piece_input(made, piece: Piece) -> jax.Array:
      """The piece's samples of its layer's input: the layer below's buffer (or the batch)."""
      part = parts[piece.part]
      below = sources[part.reads] if piece.layer == 0 else made[piece.part][piece.layer - 1]
      return below[piece.first:piece.first + piece.samples]

    def run_piece(made, piece: Piece) -> jax.Array:
      return parts[piece.part].run_layer(modules[piece.part], piece.layer, piece_input(made, piece))

    def run_split(made, piece: Piece) -> jax.Array:
      """A leftover piece shared by the stages, as the planner counts it: each runs ⌈samples / S⌉ of
      them (the last stage's share padded), and every stage gathers all."""
      share = -(-piece.samples // stages)
      x = piece_input(made, piece)
      x = jnp.pad(x, [(0, share * stages - piece.samples)] + [(0, 0)] * (x.ndim - 1))
      mine = parts[piece.part].run_layer(modules[piece.part], piece.layer,
                                         lax.dynamic_slice_in_dim(x, here * share, share))
      every = gather_from_stages(mine)  # S, share, …
      return every.reshape(stages * share, *every.shape[2:])[:piece.samples]

    # a branch gets the tick's stashed activation and received gradient (zeros where it has none) and
    # returns (work, to the next stage, to the previous stage, outbox)
    def idle(work, in_l, grad_l, m):
      return work, zero_l, zero_l, zero_o

    def forward(stage):
      def branch(work, in_l, grad_l, m):
        out = stage_fn(stage)(rows, in_l, m)
        if stage < stages - 1:
          return work, out, zero_l, zero_o
        return {**work, "loss": work["loss"] + out}, zero_l, zero_l, zero_o
      return branch

    def backward(stage):
      def branch(work, in_l, grad_l, m):
        out, pullback = jax.vjp(lambda r, x: stage_fn(stage)(r, x, m), rows, in_l)
        cotangent = grad_l if stage < stages - 1 else jnp.ones((), out.dtype)
        g_rows, g_in = pullback(cotangent)
        grads = jax.tree.map(jnp.add, work["grads"], g_rows)
        return {**work, "grads": grads}, zero_l, (g_in if stage > 0 else zero_l), zero_o
      return branch

    def frozen_piece(piece: Piece):
      def branch(work, in_l, grad_l, m):
        made = jnp.ravel(run_piece(work["made"], piece)).astype(wire)
        return work, zero_l, zero_l, jnp.pad(made, (0, outbox - made.shape[0]))
      return branch

    def write(piece: Piece):
      """Stores a gathered outbox holding `piece`'s output into the piece's layer buffer."""
      layer = parts[piece.part].layers[piece.layer]

      def store(made, outbox_o):
        value = outbox_o[:piece.samples * layer.sample_size].reshape(piece.samples, *layer.sample_shape)
        buffer = made[piece.part][piece.layer]
        made = [list(per_part) for per_part in made]
        made[piece.part][piece.layer] = lax.dynamic_update_slice_in_dim(buffer, value.astype(buffer.dtype),
                                                                       piece.first, 0)
        return made
      return store

    # numbered as PipelinePlan.branch_table numbers them
    branches = [idle] + [f(s) for s in range(stages) for f in (forward, backward)]
    branches += [frozen_piece(piece) for piece in pieces]
    writers = [lambda made, outbox_o: made] + [write(piece) for piece in pieces]
    table = jnp.asarray(plan.branch_table())  # ticks, S
    piece_at = jnp.asarray(plan.piece_table())  # ticks, S
    has_piece = jnp.any(piece_at >= 0, axis=1)  # ticks: the same on every device, so a collective may be in a cond
    micro = jnp.asarray(plan.microbatch_table())  # ticks, S
    # the buffers kept between ticks hold only what is in flight: 1F1B's stash ~S slots, GPipe's M
    activations, gradients = plan.activation_slots(), plan.gradient_slots()
    stash_at, read_stash = jnp.asarray(activations.store), jnp.asarray(activations.read)  # ticks, S
    received_at, read_received = jnp.asarray(gradients.store), jnp.asarray(gradients.read)  # ticks, S

    def share_pieces(made, made_o, k):
      """Tick k's pieces, from every stage's outbox, written into this stage's layer buffers."""
      gathered_so = gather_from_stages(made_o)  # S, O
      for origin in range(stages):
        made = lax.switch(piece_at[k, origin] + 1, writers, made, gathered_so[origin])
      return made

    def tick(carry, k):
      work, stash, received = carry  # slots, L each
      work, send_forward, send_backward, made_o = lax.switch(
          table[k, here], branches, work, stash[read_stash[k, here]], received[read_received[k, here]],
          jnp.maximum(micro[k, here], 0))
      arrived_forward = to_next_stage(send_forward, stages)  # L
      arrived_backward = to_previous_stage(send_backward, stages)  # L
      stash = _store(stash, arrived_forward, stash_at[k, here])
      received = _store(received, arrived_backward, received_at[k, here])
      if pieces:  # every stage's piece of this tick into every stage's buffers (ticks without one skip it)
        work = {**work, "made": lax.cond(has_piece[k], share_pieces, lambda made, *_: made, work["made"], made_o, k)}
      return (work, stash, received), None

    b = next_dropped_b.shape[0]
    made = [[jnp.zeros((b, *layer.sample_shape), layer.dtype) for layer in part.layers] for part in parts]
    work = {"grads": jax.tree.map(jnp.zeros_like, rows), "loss": jnp.zeros((), jnp.float32), "made": made}
    buffers = (jnp.zeros((activations.count, length), wire), jnp.zeros((gradients.count, length), wire))
    (work, _, _), _ = lax.scan(tick, (work, *buffers), jnp.arange(plan.ticks))
    grads = jax.tree.map(lambda g: lax.psum(g, DATA), work["grads"])
    loss = lax.psum(work["loss"], (DATA, STAGE))
    made = [list(per_part) for per_part in work["made"]]
    for piece in plan.leftover_pieces:  # frozen work the bubbles had no room for, in layer order
      made[piece.part][piece.layer] = made[piece.part][piece.layer].at[piece.first:piece.first + piece.samples].set(
          run_split(made, piece))
    next_inputs = self._passed_through(next_dropped_b, next_images_bhwc)
    for part, per_layer in zip(parts, made):
      next_inputs[part.makes] = per_layer[-1]  # the same on every stage: each piece was gathered by all
    return loss, {"rows": grads}, next_inputs


def _store(buffers_kl: jax.Array, value_l: jax.Array, slot: jax.Array) -> jax.Array:
  """Slot `slot` of `buffers_kl` set to `value_l` (slot < 0: nothing arrived, unchanged).

  The select over the whole buffer does not copy it: XLA updates the scan's carry in place. Measured
  (temporaries of the compiled step, tiny UNet, batch 16 of 8² images): S2 M8 GPipe 4.011 MiB, S4 M8
  1F1B 0.538 MiB; reading the kept slot and writing it back, to select one slot only, costs one slot
  more: 4.024 and 0.554 MiB."""
  updated = lax.dynamic_update_slice_in_dim(buffers_kl, value_l[None], jnp.maximum(slot, 0), 0)
  return jnp.where(slot >= 0, updated, buffers_kl)


@functools.lru_cache(maxsize=8)
def executor_for(cfg: TrainConfig, plan: PipelinePlan) -> PipelineExecutor:
  """The executor of (cfg's static settings, plan), built once: runs that share them share the
  compiled step (a resumed run, a benchmark's repeats)."""
  return PipelineExecutor(cfg.static(), plan)
