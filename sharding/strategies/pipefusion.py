"""`pipefusion`: displaced patch pipeline parallelism for diffusion transformers (Wang, Fang et al.).

The transformer's blocks are cut into N contiguous stages on the mesh axis `stage` (stage 0 also
embeds, the last also runs the final layer; each device holds only its stage's params), and the
latent into M row patches that flow through the stages as a pipeline. Each stage keeps a K/V
buffer over the whole sequence per self-attention layer (sharding/contexts/pipefusion.py): a
patch attends over this step's K/V of the patches before it and the previous step's of those
after it, so no stage waits for the rest of the image. Only patch activations cross a cut.

A step is K = max(M, N) micro-steps (a `lax.scan`): at micro-step τ stage s runs patch τ − s of
this step, or — while it is still behind — patch τ − s + K of the previous one, so the pipeline
runs on across steps without refilling. The last stage steps the scheduler for each finished
patch (its multistep history kept full-image) and sends the patch's new latent back to stage 0:
a ring, in time for stage 0 to read it (when M ≥ N; with fewer patches some stages wait).
The first `1 + warmup_steps` steps run the whole image through the stages synchronously (exact),
filling the K/V buffers; the first pipelined step starts the pipeline, the last one drains it.

Everything that lives across steps — K/V buffers, the activation in flight, the ring's patch,
the latents and scheduler state being updated patch by patch, and the run's constant conditioning
each stage received in the synchronous step (PixArt's text states and mask, which so cross a cut
only there, not with every patch) — is the scan carry; the sampling
loop's own latents pass through untouched until the drain broadcasts the result.

Shape letters: P·B the guidance pair's batch, h a patch's latent rows, W columns, C channels,
L blocks per stage (the most of any stage), S the sequence's tokens, N heads, D head width.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from jax.sharding import PartitionSpec as P

from models.dit_config import DiTConfig, PixArtConfig, TransformerConfig
from models.parallel import call_recording
from sharding.axes import CFG, DATA, PATCH, SEQUENCE, STAGE, ULYSSES
from sharding.contexts.pipefusion import PipeFusionContext, SequenceSplit, TextKV
from sharding.exchange.stages import broadcast_from_stage, send, to_next_stage
from sharding.strategies.base import Phase
from sharding.strategies.sequence import check_head_split, divides_heads
from sharding.stage_carry import run_constant_leaves
from sharding.strategies.staged import Staged, run_stage, synchronous_stages
from sharding.varying import axes_varying, varying_over


def _positive_int(value, name: str) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name}={value!r} must be a positive integer.")


@dataclasses.dataclass(frozen=True)
class PipeFusion(Staged):
  """PipeFusion. Options as in the authors' code.

  Attributes:
    num_patches: M row patches (default: the stage count N; the best measured M is N…2N).
    warmup_steps: synchronous steps after the first (which is always synchronous: it fills the
      K/V buffers); default 0, the authors' one warm-up step.
    stage_layers: blocks per stage, summing to the model's; default ⌈L/N⌉ each, the last the rest.
  """

  num_patches: int | None = None
  warmup_steps: int = 0
  stage_layers: tuple[int, ...] | None = None

  name = "pipefusion"
  axes = frozenset({STAGE, *SEQUENCE})  # its stages, and each stage's sequence ranks (`sequence`)
  families = frozenset({DiTConfig, PixArtConfig})  # it cuts a transformer's blocks into stages
  description = ("PipeFusion: DiT blocks in stages, row patches pipelined through them over stale "
                 "per-layer K/V buffers; only patch activations cross a stage")

  def __post_init__(self):
    if self.num_patches is not None:
      _positive_int(self.num_patches, "num_patches")
    if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
      raise ValueError(f"warmup_steps={self.warmup_steps!r} must be an integer ≥ 0.")
    if self.stage_layers is not None:
      object.__setattr__(self, "stage_layers", tuple(self.stage_layers))
      for count in self.stage_layers:
        _positive_int(count, "each of stage_layers")

  # -------------------------------------------------------------------------- the cut and its checks

  def patches(self, sizes) -> int:
    return sizes[STAGE] if self.num_patches is None else self.num_patches

  def sequence(self, sizes) -> SequenceSplit:
    """Each stage's sequence ranks: the mesh's `patch` (fresh K/V gathered, any head count) × `ulysses`
    (all-to-alls, heads split) devices."""
    return SequenceSplit(ring=sizes[PATCH], ulysses=sizes[ULYSSES])

  def image_splits(self, num_devices):
    """All of an image's devices on `stage` (sequence ranks inside the stages: a hybrid mesh's)."""
    return [{STAGE: num_devices}]

  def latent_spec(self):
    return P(DATA)  # every device holds the whole latents; a stage's sequence ranks each take their rows

  def layers_per_stage(self, config, stages: int) -> tuple[int, ...]:
    """Blocks of each stage: `stage_layers`, or ⌈L/N⌉ each with the last taking the rest."""
    total = config.num_layers
    if self.stage_layers is not None:
      if len(self.stage_layers) != stages or sum(self.stage_layers) != total:
        raise ValueError(f"stage_layers={self.stage_layers} must be {stages} positive counts summing to the "
                         f"model's {total} blocks (one per stage on a stage={stages} mesh).")
      return self.stage_layers
    if stages > total:
      raise ValueError(f"{total} blocks cannot fill {stages} stages: use a stage axis of at most {total}.")
    each = math.ceil(total / stages)
    counts = tuple(min(each, total - each * s) for s in range(stages))
    if min(counts) < 1:
      fits = [n for n in range(1, total + 1) if total - math.ceil(total / n) * (n - 1) >= 1]
      raise ValueError(f"{total} blocks in stages of ⌈{total}/{stages}⌉ = {each} leave the last stage empty: "
                       f"use a stage axis of {fits}, or give stage_layers (e.g. {_even(total, stages)}).")
    return counts

  def cuts_for(self, config, height, width, stages):
    counts = self.layers_per_stage(config, stages)
    return tuple(1 + sum(counts[:k]) for k in range(1, stages))  # segment 0 is the embedding

  def validate(self, config, height, width, sizes):
    if not isinstance(config, TransformerConfig):
      raise ValueError("pipefusion pipelines the blocks of a diffusion transformer (DiT, PixArt); this model is a "
                       "UNet: use single, exact, displaced, naive, ulysses or ring (or asyncdiff) for it.")
    super().validate(config, height, width, sizes)
    self.layers_per_stage(config, sizes[STAGE])
    patches, ranks = self.patches(sizes), self.sequence(sizes).ranks
    token_rows = height // config.patch_size
    if token_rows % patches:
      valid = [m for m in range(1, token_rows + 1) if token_rows % m == 0]
      raise ValueError(f"{height} latent rows are {token_rows} token rows, which do not split into "
                       f"num_patches={patches} patches: valid patch counts: {', '.join(map(str, valid))}.")
    if (token_rows // patches) % ranks:
      rows = token_rows // patches
      valid = [n for n in range(1, rows + 1) if rows % n == 0]
      raise ValueError(f"each of the {patches} patches has {rows} token rows, which do not split over patch × "
                       f"ulysses = {sizes[PATCH]} × {sizes[ULYSSES]} = {ranks} sequence ranks per stage: valid "
                       f"patch × ulysses products: {', '.join(map(str, valid))} (or fewer patches).")
    if sizes[ULYSSES] > 1:
      valid = [u for u in range(1, ranks + 1) if divides_heads(config, u)]
      check_head_split(config, self.name, ULYSSES, sizes[ULYSSES], f"valid ulysses degrees: {valid}",
                       "or put the sequence ranks on patch (K/V gathered, any head count)")

  # -------------------------------------------------------------------------- phases

  def phases(self, num_steps, sizes, *, simulated=False):
    if simulated:
      raise ValueError("pipefusion has no one-device simulation (each stage runs its own blocks, so no one "
                       "device's program stands for the mesh): `dfjax bench simulate --strategies pipefusion` "
                       "projects it from FLOP counts and its analytic traffic instead (dfjax/bench/simulate_stages.py).")
    synchronous = self.synchronous_steps(num_steps)
    phases = [Phase(0, 1, step=functools.partial(self._synchronous_step, sizes=sizes, first=True), records=True)]
    if synchronous > 1:  # the later synchronous steps read what the first one kept
      step = functools.partial(self._synchronous_step, sizes=sizes, first=False)
      phases.append(Phase(1, synchronous, step=step, uses_stale=True, records=True))
    pipelined = num_steps - synchronous
    if pipelined >= 1:  # starts the pipeline (nothing behind yet); drains it too when it is the last
      phases.append(self._pipelined(synchronous, synchronous + 1, sizes, behind=False, drain=pipelined == 1))
    if pipelined >= 3:
      phases.append(self._pipelined(synchronous + 1, num_steps - 1, sizes, behind=True, drain=False))
    if pipelined >= 2:
      phases.append(self._pipelined(num_steps - 1, num_steps, sizes, behind=True, drain=True))
    return phases

  def synchronous_steps(self, num_steps: int) -> int:
    """How many of `num_steps` steps run the whole image through the stages in order: 1 + warmup_steps."""
    return min(num_steps, 1 + self.warmup_steps)

  def _pipelined(self, start, stop, sizes, *, behind: bool, drain: bool) -> Phase:
    step = functools.partial(self._pipelined_step, sizes=sizes, behind=behind, drain=drain)
    return Phase(start, stop, step=step, uses_stale=True, records=True)

  # -------------------------------------------------------------------------- the warm-up step

  def _synchronous_step(self, run, x, sched_state, stale, i, *, sizes, first: bool):
    """The whole image through every stage in order (exact); its K/V fill each stage's buffers.

    In the run's `first` step each cross-attention layer computes its K/V of the text and the stage keeps
    them, and each stage keeps the run's constant conditioning it received (PixArt's text states and mask):
    the later steps, synchronous or pipelined, read those, so only the activation crosses a cut."""
    g = _Geometry.of(self, run, x, sizes)
    x_in, cond = run.model_inputs(run.sched.scale_model_input(x, i))
    if first:  # the whole carry crosses each cut
      ctx, cut = PipeFusionContext(g.patches, sequence=g.sequence), None
    else:
      constants = stale["conditioning"]
      ctx = PipeFusionContext(g.patches, sequence=g.sequence, text_kv=g.kept_text_kv(stale["text_kv"]))
      cut = (lambda carry: g.split(carry)[0], lambda activation: g.join(activation, constants))
    out, received, recorded = synchronous_stages(run, g.stage_of, g.sequence.local_rows(x_in),
                                                 run.sched.model_timestep(i), cond, ctx,
                                                 record=lambda stage, sent: g.record(sent), cut=cut)
    out = g.sequence.gather_rows(out)  # P·B, H, W, C: every sequence rank's rows
    x, sched_state = run.sched.step(sched_state, run.guided(out, x), i, x)
    ring = {"x": jnp.zeros_like(x[:, :g.rows]), "slot": jnp.int32(0)}
    if first:
      here, constants = lax.axis_index(STAGE), g.zeros(g.constants)
      for stage in range(1, g.stages):  # what this device's stage received (stage 0 makes its own)
        constants = jax.tree.map(lambda kept, got, stage=stage: jnp.where(here == stage, got, kept), constants,
                                 g.split(received[stage])[1])
      text_kv = recorded["text_kv"]
    else:
      text_kv = stale["text_kv"]
    return x, sched_state, g.typed({"x": x, "sched": sched_state, "ring": ring, "kv": recorded["kv"],
                                    "text_kv": text_kv, "activation": g.zeros(g.activation),
                                    "conditioning": constants})

  # -------------------------------------------------------------------------- a pipelined step

  def _pipelined_step(self, run, x, sched_state, stale, i, *, sizes, behind: bool, drain: bool):
    """Step i as K micro-steps (K + N − 1 when draining): each stage runs the patch its position gives."""
    g = _Geometry.of(self, run, x, sizes)
    here = lax.axis_index(STAGE)

    def micro_step(carry, tau):
      latents, sched, kv, ring, activation = carry["x"], carry["sched"], carry["kv"], carry["ring"], carry["activation"]
      constants, text_kv = carry["conditioning"], carry["text_kv"]
      arrived = ring["slot"] > 0  # stage 0: a finished patch's new latent from the last stage
      latents = jnp.where(arrived, lax.dynamic_update_slice_in_dim(latents, ring["x"], (ring["slot"] - 1) * g.rows, 1),
                          latents)
      offset = tau - here
      current = (offset >= 0) & (offset < g.patches)
      late = behind & (offset < 0) & (offset + g.micro_steps < g.patches)  # the previous step's patch
      patch = jnp.clip(jnp.where(current, offset, offset + g.micro_steps), 0, g.patches - 1)
      j = jnp.where(current, i, i - 1)  # the step that patch is at
      active = current | late
      x_patch = lax.dynamic_slice_in_dim(latents, patch * g.rows, g.rows, 1)  # B, h, W, C
      x_in, cond = run.model_inputs(run.sched.scale_model_input(x_patch, j))
      operands = (g.sequence.local_rows(x_in), run.sched.model_timestep(j), cond, activation, constants, kv, text_kv,
                  patch)
      branches = [functools.partial(self._stage_branch, run, g, s) for s in range(g.stages)]
      branches.append(functools.partial(_idle_branch, run, g))
      sent_on, kv, out = lax.switch(jnp.where(active, here, g.stages), branches, *operands)
      # outside the branches: the sequence ranks' and the guidance pair's collectives, the scheduler, the transfers
      eps = run.guided(g.sequence.gather_rows(out), x_patch)
      rows = lambda a: lax.dynamic_slice_in_dim(a, patch * g.rows, g.rows, 1)  # noqa: E731
      new_patch, new_sched = run.sched.step(jax.tree.map(rows, sched), eps, j, x_patch)
      finished = active & (here == g.stages - 1)
      put = lambda full, part: jnp.where(finished, lax.dynamic_update_slice_in_dim(full, part, patch * g.rows, 1), full)  # noqa: E731
      latents, sched = put(latents, new_patch), jax.tree.map(put, sched, new_sched)
      ring = send({"x": new_patch, "slot": jnp.where(finished, patch + 1, 0)}, g.stages - 1, 0)
      return g.typed({"x": latents, "sched": sched, "ring": ring, "kv": kv, "text_kv": text_kv,
                      "conditioning": constants, "activation": to_next_stage(sent_on, g.stages)}), None

    ticks = g.micro_steps + (g.stages - 1 if drain else 0)
    stale, _ = lax.scan(micro_step, stale, jnp.arange(ticks, dtype=jnp.int32))
    if drain:  # the last stage holds every patch's final latent
      x = broadcast_from_stage(stale["x"], g.stages - 1)
    return x, sched_state, stale

  def _stage_branch(self, run, g: _Geometry, stage: int, x_in, t, cond, activation, constants, kv, text_kv, patch):
    """Stage `stage`'s blocks on one patch: (the activation to send on, updated K/V slots, the model output).

    Stage 0 embeds the patch; a later stage joins the patch's activation to the run's constant conditioning
    it kept from the first step. Cross-attention reads the text K/V the stage kept, so nothing here reads
    the text states: XLA drops stage 0's caption projection."""
    model = run.model(stage)
    buffers = {key: kv[slot] for slot, key in enumerate(g.keys[stage])}
    kept = {key: text_kv[slot] for slot, key in enumerate(g.text_keys[stage])}
    ctx = PipeFusionContext(g.patches, patch, buffers, g.sequence, text_kv=kept)
    carry = model.first_carry(x_in, t, **cond) if stage == 0 else g.join(activation, constants)
    body = lambda m, c: run_stage(m, c, g.stage_of_blocks, stage, ctx)  # noqa: E731
    carry, sent = call_recording(body, model, carry)
    kv = _slots(sent, g.layers, like=kv)
    if stage == g.stages - 1:
      out = run_stage(model, carry, g.stage_of_out, stage, ctx).h  # the final layer: P·B, h, W, C_out
      return varying_over((g.zeros(g.activation), kv, out), g.axes)
    return varying_over((g.split(carry)[0], kv, jnp.zeros(g.out_shape, g.out_dtype)), g.axes)

  def expected_traffic(self, config, height, width, sizes, batch, activation_bytes):
    """Per pipelined step, what a stage receives in its K micro-steps (each permute's whole output), plus,
    inside a stage of R > 1 sequence ranks, their own exchanges.

    stages    from the stage before, K patch activations for the `batch` samples its model call runs: the
              rank's tokens (1/R of the patch's) and the per-sample vectors, D wide (DiT: the conditioning embedding; PixArt: the
              timestep embedding and adaLN-single's 6D modulation). PixArt's text states and mask do not
              travel: each stage kept them from the synchronous step (`conditioning_bytes`).
    ring      from the last stage, K patch latents (fp32) of the images behind that batch (`batch` is two
              guidance halves over `cfg`) and their s32 slot.
    sequence  (R > 1) per micro-step, the active stage's self-attention layers (its most blocks'):
              `patch` ranks gather the patch's fresh K/V of their heads (the ring members' (R_p − 1)/R_p of
              it); `ulysses` ranks swap q, k, v and the output for heads (4 all-to-alls, (U − 1)/U of
              each); the model output's rows gathered from every rank. Stage-local (not over `stage`).
    """
    stages, patches = sizes[STAGE], self.patches(sizes)
    micro_steps = max(patches, stages)
    p, dim = config.patch_size, config.inner_dim
    tokens = (height // p) * (width // p) // patches
    ring, ulysses = sizes.get(PATCH, 1), sizes.get(ULYSSES, 1)
    vectors = 1 if isinstance(config, DiTConfig) else 7
    activation = batch * (tokens // (ring * ulysses) + vectors) * dim * activation_bytes
    images = batch * sizes.get(CFG, 1) // 2
    latent_patch = images * (height // patches) * width * config.in_channels * 4
    traffic = {"stages": micro_steps * activation, "ring": micro_steps * (latent_patch + 4)}  # + its s32 slot
    if ring * ulysses > 1:
      layers = max(self.layers_per_stage(config, stages))
      patch_kv = 2 * batch * tokens * dim * activation_bytes // ulysses  # a patch's K and V, the rank's heads
      local_tokens = batch * tokens // (ring * ulysses) * dim * activation_bytes  # one rank's q (or k, v, o)
      per_layer = patch_kv * (ring - 1) // ring + 4 * local_tokens * (ulysses - 1) // ulysses
      output = batch * (height // patches) * width * config.out_channels * activation_bytes
      traffic["sequence"] = micro_steps * (layers * per_layer + output * (ring * ulysses - 1) // (ring * ulysses))
    return traffic

  def conditioning_bytes(self, config, batch, activation_bytes, text_tokens=0, mask_itemsize=0):
    """What a stage after the first receives once per run (in the first synchronous step), beside the
    activation: PixArt's `text_tokens` projected text states, D wide, and their keep-mask
    (`mask_itemsize` bytes a value, 0 without one), for the `batch` samples. DiT: nothing."""
    if isinstance(config, DiTConfig):
      return 0
    return batch * text_tokens * (config.inner_dim * activation_bytes + mask_itemsize)

  def stale_bytes(self, config, height, width, sizes, batch, activation_bytes, text_tokens=0):
    """What a stage carries between steps, for the guidance pair's `batch`:
    kv       a full-sequence K and V per self-attention layer of its largest stage (of the device's heads,
             1/ulysses of them);
    text_kv  PixArt: each cross-attention layer's K and V of the `text_tokens` text states (every head: the
             text is not split), kept from the run's first step. DiT: none."""
    layers = max(self.layers_per_stage(config, sizes[STAGE]))
    tokens = (height // config.patch_size) * (width // config.patch_size)
    per_token = layers * 2 * batch * config.inner_dim * activation_bytes  # a K and a V value per layer and sample
    text = 0 if isinstance(config, DiTConfig) else per_token * text_tokens
    return {"kv": per_token * tokens // sizes[ULYSSES], "text_kv": text}

  def text_flops(self, config, stages: int, batch: int, text_tokens: int) -> tuple[int, ...]:
    """Each stage's matrix-product FLOPs on the run's constant text, done once per run (in its first step)
    instead of in every model call, for `batch` samples of `text_tokens` text states: the caption projection
    (stage 0) and each cross-attention layer's K and V projections (biases not counted). DiT: none."""
    counts = self.layers_per_stage(config, stages)
    if isinstance(config, DiTConfig):
      return (0,) * stages
    dim = config.inner_dim
    kv = 2 * (2 * batch * text_tokens * config.cross_attention_dim * dim)  # to_k and to_v
    caption = 0 if config.caption_channels is None else (
        2 * batch * text_tokens * (config.caption_channels + dim) * dim)  # linear_1 (E → D), linear_2 (D → D)
    return tuple(layers * kv + (caption if stage == 0 else 0) for stage, layers in enumerate(counts))

  def options(self):
    return f"{self.num_patches or 'N'} patches, warm-up {self.warmup_steps}" + (
        f", stage layers {list(self.stage_layers)}" if self.stage_layers else "")


def _idle_branch(run, g, x_in, t, cond, activation, constants, kv, text_kv, patch):
  """A stage with no patch this micro-step: sends nothing, keeps its buffers."""
  del run, x_in, t, cond, activation, constants, text_kv, patch
  return varying_over((g.zeros(g.activation), kv, jnp.zeros(g.out_shape, g.out_dtype)), g.axes)


def _slots(sent: dict, layers: int, like=None) -> jax.Array:
  """A stage's per-layer K/V buffers stacked in block order (L, 2, P·B, S, N, D), zero-padded to `layers`.

  `sent` maps each self-attention layer's key to its buffer, in the order the layers ran.
  """
  buffers = list(sent.values())
  stacked = jnp.stack(buffers) if buffers else like[:0]
  pad = layers - stacked.shape[0]
  return jnp.concatenate([stacked, jnp.zeros((pad, *stacked.shape[1:]), stacked.dtype)]) if pad else stacked


def _even(total: int, stages: int) -> list[int]:
  return [total // stages + (s < total % stages) for s in range(stages)]


@dataclasses.dataclass(frozen=True)
class _Geometry:
  """What one run's pipelined steps are shaped by, worked out while tracing."""

  stages: int
  patches: int
  rows: int  # latent rows of a patch
  sequence: SequenceSplit  # a stage's sequence ranks, each running rows / ranks of them
  layers: int  # K/V slots per stage (its most blocks)
  text_layers: int  # text K/V slots per stage (its most cross-attention layers; 0 without text)
  stage_of: tuple[int, ...]  # each segment's stage
  stage_of_blocks: tuple[int, ...]  # the same without the final layer (run apart, on the last stage)
  stage_of_out: tuple[int, ...]  # only the final layer
  keys: tuple[tuple[str, ...], ...]  # each stage's self-attention layer keys, in order
  text_keys: tuple[tuple[str, ...], ...]  # each stage's cross-attention layer keys, in order
  carry_tree: jax.tree_util.PyTreeDef  # the model's carry at a cut
  constant_leaves: tuple[int, ...]  # its leaves made from the conditioning alone (`run_constant_leaves`)
  activation: tuple  # ShapeDtypeStructs of its other leaves: what crosses a cut with each patch
  constants: tuple  # ShapeDtypeStructs of the constant ones: each stage keeps them from the synchronous step
  out_shape: tuple[int, ...]  # a sequence rank's rows of a patch
  out_dtype: object
  axes: frozenset[str]  # what activations, K/V and outputs vary over: the model inputs', stage, sequence axes
  latent_axes: frozenset[str]  # what the latents being updated vary over: the loop's latents' and the stage
  @property
  def micro_steps(self) -> int:
    return max(self.patches, self.stages)

  @classmethod
  def of(cls, strategy: PipeFusion, run, x, sizes) -> _Geometry:
    config = run.config
    b, height, width, _ = x.shape
    stages, patches, sequence = sizes[STAGE], strategy.patches(sizes), strategy.sequence(sizes)
    rows = height // patches
    local_rows = rows // sequence.ranks
    stage_of = strategy.stage_of_segment(config, height, width, sizes)
    last = len(stage_of) - 1
    blocks = tuple(s if i < last else -1 for i, s in enumerate(stage_of))
    out = tuple(-1 if i < last else s for i, s in enumerate(stage_of))
    counts = strategy.layers_per_stage(config, stages)
    x_in, cond = run.model_inputs(x[:, :local_rows])
    model = run.model(0)
    t = jnp.float32(0)
    first = jax.eval_shape(lambda: model.first_carry(x_in, t, **cond))
    embedded = jax.eval_shape(lambda c: model.segments()[0](c, ctx=PipeFusionContext(patches)), first)
    leaves, carry_tree = jax.tree.flatten(embedded)
    constant = run_constant_leaves(model, x_in, t, cond)
    moving, constants = _partition(leaves, constant)
    keys, text_keys = zip(*(_stage_keys(run, stage, blocks, first if stage == 0 else embedded, patches)
                            for stage in range(stages)))
    out_shape = (x_in.shape[0], local_rows, width, config.out_channels)
    axes = frozenset().union(*(axes_varying(leaf) for leaf in jax.tree.leaves((x_in, cond))), sequence.axes) | {STAGE}
    return cls(stages, patches, rows, sequence, max(counts), max(map(len, text_keys)), stage_of, blocks, out, keys,
               text_keys, carry_tree, constant, moving, constants, out_shape, x_in.dtype, axes,
               axes_varying(x) | {STAGE})

  def typed(self, stale: dict) -> dict:
    """The carry with one type in every step (so the drain's broadcast over stages gives the loop's
    latents their type back): the latents' part as `latent_axes`, the rest as `axes`."""
    return {name: varying_over(value, self.latent_axes if name in ("x", "sched", "ring") else self.axes)
            for name, value in stale.items()}

  def record(self, sent: dict) -> dict:
    """What a stage's layers sent in a synchronous step → {"kv": its K/V buffers (`_slots`), "text_kv": its
    cross-attention layers' text K/V, stacked alike (() when none were sent: no text, or kept from before)}."""
    texts = {key: value.kv_2bsnd for key, value in sent.items() if isinstance(value, TextKV)}
    buffers = {key: value for key, value in sent.items() if key not in texts}
    return {"kv": _slots(buffers, self.layers), "text_kv": _slots(texts, self.text_layers) if texts else ()}

  def kept_text_kv(self, text_kv) -> dict:
    """{cross-attention key: its slot of `text_kv`} for every stage's keys: on a device, stage s's slots are
    its own stage's, and only its own stage's branch runs there."""
    return {key: text_kv[slot] for keys in self.text_keys for slot, key in enumerate(keys)}

  def split(self, carry) -> tuple[tuple, tuple]:
    """A carry at a cut → (its leaves that cross with each patch, its run-constant leaves)."""
    return _partition(jax.tree.leaves(carry), self.constant_leaves)

  def join(self, activation, constants):
    """`split`'s inverse: the carry a stage runs its blocks on."""
    moving, kept = iter(activation), iter(constants)
    leaves = [next(kept) if k in self.constant_leaves else next(moving) for k in range(self.carry_tree.num_leaves)]
    return jax.tree.unflatten(self.carry_tree, leaves)

  @staticmethod
  def zeros(shapes: tuple) -> tuple:
    return tuple(jnp.zeros(s.shape, s.dtype) for s in shapes)


def _partition(leaves, constant_leaves) -> tuple[tuple, tuple]:
  """Carry leaves → (those that cross a cut with each patch, the run-constant ones at `constant_leaves`)."""
  return (tuple(leaf for k, leaf in enumerate(leaves) if k not in constant_leaves),
          tuple(leaf for k, leaf in enumerate(leaves) if k in constant_leaves))


def _stage_keys(run, stage: int, stage_of_blocks, carry, patches: int) -> tuple[tuple[str, ...], ...]:
  """The keys of stage `stage`'s (self-attention, cross-attention) layers, in the order they run (traced, not
  computed): the cross-attention layers are those that send the text's K/V (`TextKV`)."""
  body = lambda m, c: run_stage(m, c, stage_of_blocks, stage, PipeFusionContext(patches))  # noqa: E731
  sent = jax.eval_shape(lambda c: call_recording(body, run.model(stage), c)[1], carry)  # merged in the trace
  text = tuple(key for key, value in sent.items() if isinstance(value, TextKV))
  return tuple(key for key in sent if key not in text), text
