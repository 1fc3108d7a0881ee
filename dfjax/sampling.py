"""The jitted sampling loop: `shard_map` over the mesh around `lax.scan` over the steps.

One `jax.jit` runs the whole denoising: every device runs `_denoise_on_device` on its rows of
its batch share; each strategy phase (warm-up, displaced) is one `lax.scan`, so the program does
not grow with the number of steps. Latents stay sharded by rows the whole run: the scheduler
update is elementwise, so no device ever needs the full image until the result is returned.

Shape letters: P guidance pair (uncond, cond), B batch, H/h rows (image/patch), W columns,
C channels, T text tokens, D text width.
"""

import dataclasses
import functools
import inspect
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dfjax import schedulers
from models.parallel import call_recording
from sharding.axes import DATA, PATCH
from sharding.mesh import axis_sizes, single_device_mesh
from sharding.partitioning import param_specs, shard_layout
from sharding.stage_params import StagedParams, params_by_segment
from sharding.varying import varying_like
from sharding.strategies import Guidance, Phase, Strategy


# Each conditioning field's allowed ranks and shape (B batch, T text tokens, D widths).
_FIELD_SHAPES = {"encoder_hidden_states": ((3,), "(B, T, D)"), "text_embeds": ((2,), "(B, D_pool)"),
                 "time_ids": ((2,), "(B, 6)"), "class_labels": ((1, 2), "(B,) ids or (B, D) inputs"),
                 "encoder_attention_mask": ((2,), "(B, T) keep-mask"), "resolution": ((2,), "(B, 2)"),
                 "aspect_ratio": ((1, 2), "(B, 1)")}


def _check_array(value, what: str, shape: str, ranks: tuple[int, ...]) -> None:
  """Raises ValueError unless `value` is a numpy or JAX array of one of `ranks` (`shape` names its axes)."""
  if not isinstance(value, (np.ndarray, jax.Array)):
    raise ValueError(f"{what} must be an array of shape {shape} (numpy or JAX), got {type(value).__name__}: "
                     "convert it with np.asarray.")
  if value.ndim not in ranks:
    raise ValueError(f"{what} has shape {tuple(value.shape)}, but it must be {shape}.")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Conditioning:
  """What the denoiser is conditioned on, batch-first, named as in diffusers' forward. Unused fields stay None.

  Attributes:
    encoder_hidden_states: (B, T, D) text (or class-token) embeddings.
    text_embeds: (B, D_pool) pooled text embedding (SDXL micro-conditioning).
    time_ids: (B, 6) SDXL size/crop conditioning.
    class_labels: (B,) class ids of class-conditional UNets and DiTs.
    encoder_attention_mask: (B, T) 1 keeps a text token, 0 drops it (PixArt; None keeps all).
    resolution: (B, 2) image height and width in pixels (PixArt-α's additional conditions).
    aspect_ratio: (B, 1) image height / width (PixArt-α's additional conditions).
  """

  encoder_hidden_states: jax.Array | None = None
  text_embeds: jax.Array | None = None
  time_ids: jax.Array | None = None
  class_labels: jax.Array | None = None
  encoder_attention_mask: jax.Array | None = None
  resolution: jax.Array | None = None
  aspect_ratio: jax.Array | None = None

  @classmethod
  def of(cls, value: "Conditioning | Mapping[str, Any]", needed: tuple[str, ...], what: str = "cond") -> "Conditioning":
    """`value` (a Conditioning or a mapping of field names) checked against the fields a model needs.

    Every set field must be an array of its field's rank, with at least one text token, all of one batch.
    """
    fields = tuple(f.name for f in dataclasses.fields(cls))
    if isinstance(value, Mapping):
      unknown = sorted(set(value) - set(fields))
      if unknown:
        raise ValueError(f"{what} has unknown conditioning key(s) {', '.join(map(repr, unknown))}; "
                         f"conditioning names: {', '.join(fields)}.")
      value = cls(**{name: value.get(name) for name in fields})
    if not isinstance(value, cls):
      raise ValueError(f"{what} must be a dfjax.Conditioning or a mapping of conditioning names "
                       f"({', '.join(needed)}), got {type(value).__name__}.")
    missing = [f"{name!r} ({_FIELD_SHAPES[name][1]})" for name in needed if getattr(value, name) is None]
    if missing:
      raise ValueError(f"{what} lacks {', '.join(missing)}, which this model needs: it takes "
                       f"{', '.join(needed)}.")
    arrays = value.as_kwargs()
    for name, array in arrays.items():
      ranks, shape = _FIELD_SHAPES[name]
      _check_array(array, f"{what}.{name}", shape, ranks)
    text = value.encoder_hidden_states
    if text is not None and text.shape[1] == 0:
      raise ValueError(f"{what}.encoder_hidden_states has shape {tuple(text.shape)}: it needs at least one "
                       "text token (T ≥ 1 in (B, T, D)).")
    first = next(iter(arrays), None)
    for name, array in arrays.items():
      if array.shape[0] != arrays[first].shape[0]:
        raise ValueError(f"{what}.{name} has batch {array.shape[0]} but {what}.{first} has batch "
                         f"{arrays[first].shape[0]}: every field holds one entry per image.")
    return value

  def as_kwargs(self) -> dict[str, jax.Array]:
    """The set fields, as keyword arguments of the model's forward."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Everything static about a sampling run (the jit cache key beside the model's graph)."""

  mesh: Mesh
  strategy: Strategy
  guidance: Guidance
  model_config: Any  # the model's (hashable) config: what the denoiser needs, whatever holds its params
  staged: StagedParams | None  # pipeline strategies' per-stage param layout; None: by the rule table
  scheduler: str
  scheduler_config: schedulers.SchedulerConfig
  num_steps: int
  check_finite: bool

  @property
  def sizes(self) -> dict[str, int]:
    return axis_sizes(self.mesh)

  def phases(self) -> list[Phase]:
    return self.strategy.phases(self.num_steps, self.sizes)


def sample(
    model: nnx.Module,
    noise: jax.Array,
    cond: "Conditioning | Mapping[str, Any]",
    *,
    uncond: "Conditioning | Mapping[str, Any] | None" = None,
    scheduler: str = "ddim",
    scheduler_config: schedulers.SchedulerConfig | dict | None = None,
    num_steps: int = 50,
    guidance_scale: float = 5.0,
    mesh: Mesh | None = None,
    strategy: Strategy | None = None,
    check_finite: bool = False,
) -> jax.Array:
  """Denoises `noise` into latents with one jitted program.

  Args:
    model: a UNet, DiT or PixArt (models/) or any NNX module with their call signature and a `config`
      stating `conditioning_fields` and `noise_prediction` (the output channels the scheduler steps
      with: DiT's and PixArt's learned variance is dropped, as in diffusers' pipelines).
    noise: (B, H, W, C) unit Gaussian latents, NHWC.
    cond: the conditioning: a `Conditioning` or a mapping of the model's conditioning names
      ({"encoder_hidden_states": …, "time_ids": …}); `uncond` the unconditional one for
      classifier-free guidance, needed unless guidance_scale == 1.
    scheduler: "ddim", "euler" or "dpmpp_2m"; `scheduler_config` a diffusers
      scheduler_config.json dict or a SchedulerConfig (default: diffusers' DDIM defaults).
    mesh: a `dfjax.make_mesh` mesh; None runs on one device.
    strategy: how one image is spread over the mesh (`Strategy.exact()`, `Strategy.displaced(…)`, …);
      None means `exact` when the mesh splits rows (patch > 1), else `single`.
    check_finite: refuse non-finite noise or conditioning (ValueError, before any compute), then
      track the first step whose latents hold NaN or inf (inside the program, no host
      round-trip) and raise FloatingPointError naming it.

  Returns:
    (B, H, W, C) latents, laid out as the strategy's `latent_spec` (rows over `patch`, batch over `data`).
  """
  graphdef, inputs, plan = _prepare(**locals())  # at this point locals() are the arguments
  return _checked_latents(_sample_jit(graphdef, *inputs, plan=plan), plan)


def _prepare(model, noise, cond, uncond, scheduler, scheduler_config, num_steps, guidance_scale, mesh,
             strategy, check_finite):
  """Checks `sample`'s arguments; returns the model graph, the placed inputs and the static plan."""
  mesh = single_device_mesh() if mesh is None else mesh
  sizes = axis_sizes(mesh)
  if strategy is None:
    strategy = Strategy.exact() if sizes[PATCH] > 1 else Strategy.single()
  if not isinstance(strategy, Strategy):
    raise ValueError(f"strategy must be a dfjax.Strategy (e.g. Strategy.displaced()), got {type(strategy).__name__}.")
  if not isinstance(scheduler_config, schedulers.SchedulerConfig):
    scheduler_config = schedulers.SchedulerConfig.from_diffusers_config(scheduler_config or {})
  schedulers.make_scheduler(scheduler, scheduler_config, num_steps)  # bad names/steps fail here
  if not math.isfinite(guidance_scale):
    raise ValueError(f"guidance_scale={guidance_scale} must be a finite number (e.g. 5.0; 1.0 samples "
                     "without guidance).")
  guidance = Guidance.for_mesh(guidance_scale != 1.0, sizes)
  cond, uncond = _conditionings(model, cond, uncond, guidance)
  _check_latents(model, noise, cond, strategy, sizes)
  if check_finite:
    _check_finite_inputs(noise, cond, uncond)
  pair = _guidance_pair(cond, uncond)

  graphdef, params = nnx.split(model)
  params = shard_layout(params, strategy.param_rules(), sizes)  # chunked widths: each device's slice of each part
  staged = _staged_params(model, params, noise, cond, strategy, sizes)
  plan = _Plan(mesh, strategy, guidance, model.config, staged, scheduler, scheduler_config, num_steps,
               check_finite)
  placed = params if staged is None else staged.pack(params)
  place = lambda tree, specs: jax.device_put(tree, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
  return graphdef, (place(placed, _param_specs(plan, placed)), place(noise, strategy.latent_spec()),
                    place(pair, guidance.pair_spec()),
                    jnp.float32(guidance_scale)), plan


def _staged_params(model, params, noise, cond: Conditioning, strategy: Strategy, sizes) -> StagedParams | None:
  """The per-stage param layout of a pipeline strategy (None for the others), traced on this run's shapes."""
  _, height, width, _ = noise.shape
  stages = strategy.stage_of_segment(model.config, height, width, sizes)
  if stages is None:
    return None
  read = params_by_segment(model, noise[:1], jnp.float32(0), **jax.tree.map(lambda a: a[:1], cond).as_kwargs())
  return StagedParams.plan(params, read, stages)


def _prepare_like_sample(args, kwargs):
  """`_prepare` for arguments given as to `sample`, defaults included."""
  bound = inspect.signature(sample).bind(*args, **kwargs)
  bound.apply_defaults()
  return _prepare(**bound.arguments)


@dataclasses.dataclass(frozen=True)
class SampleProgram:
  """`sample`'s program lowered, and the placed inputs its compiled form runs on.

  `lowered.compile()(*inputs)` returns (latents, first non-finite step of each device or −1);
  `latents(output)` turns that into what `sample` returns, raising as `sample` does.
  """

  lowered: jax.stages.Lowered
  inputs: tuple
  plan: _Plan

  def latents(self, output: tuple[jax.Array, jax.Array]) -> jax.Array:
    """The latents of a run's `output`; with check_finite, FloatingPointError naming the first bad step."""
    return _checked_latents(output, self.plan)


def prepare_sample(*args, **kwargs) -> SampleProgram:
  """`sample`'s program and inputs (same arguments), to compile and run apart, e.g. to time them."""
  graphdef, inputs, plan = _prepare_like_sample(args, kwargs)
  return SampleProgram(_sample_jit.lower(graphdef, *inputs, plan=plan), inputs, plan)


def lower_sample(*args, **kwargs) -> jax.stages.Lowered:
  """`sample`'s program, lowered (same arguments): `.compile()` it to inspect HLO or costs."""
  return prepare_sample(*args, **kwargs).lowered


def stale_buffer_shapes(*args, **kwargs) -> dict[str, Any]:
  """Per-device shapes of the stale activations the run carries between steps (same arguments).

  Empty for strategies without stale state. Read from the model's own exchanges, not derived.
  """
  graphdef, inputs, plan = _prepare_like_sample(args, kwargs)
  recording = next((p for p in plan.phases() if p.records), None)
  if recording is None:
    return {}

  def record_on_device(params, noise, pair, guidance_scale):
    run = _DeviceRun(graphdef, params, pair, guidance_scale, plan)
    x = noise * run.sched.init_noise_sigma
    record = run.denoise(x, run.sched.init_state(x), None, recording.start, recording)[2]
    return jax.tree.map(lambda a: a[None], record)  # one slot per device

  every_device = P(tuple(plan.mesh.axis_names))
  on_mesh = jax.shard_map(record_on_device, mesh=plan.mesh, in_specs=_in_specs(plan, inputs[0]),
                          out_specs=every_device)
  shapes = jax.eval_shape(on_mesh, *inputs)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), shapes)


def _conditionings(model, cond, uncond, guidance: Guidance) -> tuple[Conditioning, Conditioning | None]:
  """`cond` and, when guided, `uncond` as Conditionings the model can take, of equal shapes; else None."""
  needed = model.config.conditioning_fields
  cond = Conditioning.of(cond, needed)
  if not guidance.guided:
    return cond, None
  if uncond is None:
    raise ValueError("classifier-free guidance (guidance_scale ≠ 1) needs `uncond`, the "
                     "unconditional Conditioning; pass it, or guidance_scale=1.0 to sample without.")
  uncond = Conditioning.of(uncond, needed, "uncond")
  if jax.tree.structure(uncond) != jax.tree.structure(cond):
    raise ValueError("`uncond` and `cond` must set the same fields (e.g. both time_ids for SDXL).")
  for name, u in uncond.as_kwargs().items():
    c = getattr(cond, name)
    if u.shape != c.shape:
      pad = " (pad both prompts to one token count)" if name == "encoder_hidden_states" else ""
      raise ValueError(f"uncond.{name} has shape {tuple(u.shape)} but cond.{name} has {tuple(c.shape)}: the "
                       f"guidance pair is stacked, so both need one shape{pad}.")
  return cond, uncond


def _guidance_pair(cond: Conditioning, uncond: Conditioning | None) -> Conditioning:
  """Stacks (uncond, cond) on a leading pair axis; a pair of one when unguided (`uncond` None)."""
  if uncond is None:
    return jax.tree.map(lambda c: jnp.asarray(c)[None], cond)
  return jax.tree.map(lambda u, c: jnp.stack([jnp.asarray(u), jnp.asarray(c)]), uncond, cond)


def _check_latents(model, noise, cond: Conditioning, strategy: Strategy, sizes: dict[str, int]) -> None:
  _check_array(noise, "noise", "NHWC (B, H, W, C)", (4,))
  batch, height, width, _ = noise.shape
  if min(batch, height, width) < 1:
    raise ValueError(f"noise has shape {tuple(noise.shape)}: its batch, rows and columns (B, H, W) must each "
                     "be at least 1.")
  name, first = next(iter(cond.as_kwargs().items()))
  if first.shape[0] != batch:
    raise ValueError(f"noise has batch {batch} but cond.{name} has batch {first.shape[0]}: "
                     "give one conditioning per image.")
  if batch % sizes[DATA]:
    raise ValueError(f"batch {batch} does not split over data={sizes[DATA]} devices: use a "
                     f"batch that is a multiple of {sizes[DATA]} or a smaller data axis.")
  strategy.validate(model.config, height, width, sizes)


def _check_finite_inputs(noise, cond: Conditioning, uncond: Conditioning | None) -> None:
  """Raises ValueError naming the first input that holds NaN or inf: a run from it is NaN from the start."""
  named = {"noise": noise}
  for what, conditioning in (("cond", cond), ("uncond", uncond)):
    if conditioning is not None:
      named.update({f"{what}.{name}": value for name, value in conditioning.as_kwargs().items()})
  for name, array in named.items():
    if jnp.issubdtype(array.dtype, jnp.inexact) and not bool(jnp.isfinite(array).all()):
      raise ValueError(f"{name} holds NaN or infinite values: the run's inputs are not finite, so nothing "
                       "was sampled; check how they were made.")


def _param_specs(plan: _Plan, params) -> nnx.State | dict:
  """Each placed param's spec: the staged layout's, else the strategy's rule table (all `P()` under
  the default, replicated one)."""
  if plan.staged is not None:
    return plan.staged.specs()
  return param_specs(params, plan.strategy.param_rules(), plan.sizes)


def _in_specs(plan: _Plan, params) -> tuple:
  return _param_specs(plan, params), plan.strategy.latent_spec(), plan.guidance.pair_spec(), P()


@functools.partial(jax.jit, static_argnames=("graphdef", "plan"))
def _sample_jit(graphdef, params, noise, pair, guidance_scale, *, plan: _Plan):
  """(latents, first non-finite step of each device or −1; all −1 unless plan.check_finite)."""

  def on_device(params, noise, pair, guidance_scale):
    x, first_bad_step = _DeviceRun(graphdef, params, pair, guidance_scale, plan).run(noise)
    return x, first_bad_step[None]

  out_specs = (plan.strategy.latent_spec(), P(tuple(plan.mesh.axis_names)))
  return jax.shard_map(on_device, mesh=plan.mesh, in_specs=_in_specs(plan, params), out_specs=out_specs)(
      params, noise, pair, guidance_scale)


def _checked_latents(output: tuple[jax.Array, jax.Array], plan: _Plan) -> jax.Array:
  """The latents of the program's output, after the finite check when the plan asks for it."""
  latents, first_bad_steps = output
  if plan.check_finite:
    _raise_if_not_finite(np.asarray(first_bad_steps), plan)
  return latents


def _raise_if_not_finite(first_bad_steps: np.ndarray, plan: _Plan) -> None:
  bad = first_bad_steps[first_bad_steps >= 0]
  if bad.size:
    step = int(bad.min())
    timestep = schedulers.make_scheduler(plan.scheduler, plan.scheduler_config, plan.num_steps).timesteps[step]
    raise FloatingPointError(
        f"the latents became NaN or infinite at step {step} of {plan.num_steps} (timestep {timestep}) "
        f"on {bad.size} of {first_bad_steps.size} devices: check the checkpoint's weights, run the "
        "model in float32 instead of float16, or lower the guidance scale.")


class _DeviceRun:
  """One device's whole run: its rows of its batch share, through every phase.

  Besides the loop, what a phase's own step program (sharding/strategies/base.py `StepProgram`) uses:
  `sched`, `config`, `model`, `model_inputs` and `guided`.
  """

  def __init__(self, graphdef, params, pair: Conditioning, guidance_scale, plan: _Plan):
    self.graphdef, self.params = graphdef, params
    self.sched = schedulers.make_scheduler(plan.scheduler, plan.scheduler_config, plan.num_steps)
    self.pair, self.guidance_scale, self.plan = pair, guidance_scale, plan

  def denoise(self, x, sched_state, stale, i, phase: Phase):
    """Step i: returns the next latents, scheduler state and what this step sent for the next one."""
    stale = stale if phase.uses_stale else None
    if phase.step is not None:
      return phase.step(self, x, sched_state, stale, i)
    x_in, cond = self.model_inputs(self.sched.scale_model_input(x, i))
    # merged in this step's trace: the call records onto its layers
    out, sent = call_recording(self.model(), x_in, self.sched.model_timestep(i), ctx=phase.context(stale), **cond)
    x, sched_state = self.sched.step(sched_state, self.guided(out, x), i, x)
    return x, sched_state, sent

  @property
  def config(self):
    """The model's config."""
    return self.plan.model_config

  def model(self, stage: int | None = None) -> nnx.Module:
    """The model merged from this device's params; under a staged layout, stage `stage`'s (the other
    stages' params are zeros: call only that stage's segments)."""
    if self.plan.staged is None:
      return nnx.merge(self.graphdef, self.params)
    if stage is None:
      raise ValueError("this run's params are placed by stage: ask for the model of one stage.")
    return nnx.merge(self.graphdef, self.plan.staged.unpack(self.params, stage))

  def model_inputs(self, x) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The model's batch for latents `x` (B, h, W, C): x repeated for each half of this device's part of
    the guidance pair (P·B, h, W, C), and the pair's conditioning, flattened alike."""
    share, batch = self._pair_shape()
    flat = jax.tree.map(lambda a: a.reshape(share * batch, *a.shape[2:]), self.pair)
    x_in = jnp.broadcast_to(x, (share, *x.shape)).reshape(share * batch, *x.shape[1:])  # P·B, h, W, C
    return x_in, flat.as_kwargs()

  def guided(self, out, x) -> jax.Array:
    """The guided noise prediction (B, h, W, C) from a model output for `model_inputs(x)`."""
    share, batch = self._pair_shape()
    eps = self.plan.model_config.noise_prediction(out).reshape(share, batch, *x.shape[1:])  # P, B, h, W, C
    return self.plan.guidance.combine(eps, self.guidance_scale)  # B, h, W, C

  def _pair_shape(self) -> tuple[int, int]:
    """(this device's part of the guidance pair, its batch)."""
    return next(iter(self.pair.as_kwargs().values())).shape[:2]

  def run(self, noise):
    """Returns the final latents and the first step whose latents were not finite (−1: none)."""
    x = noise * self.sched.init_noise_sigma  # B, h, W, C
    sched_state = self.sched.init_state(x)
    first_bad_step = varying_like(jnp.int32(-1), x)
    stale = None
    for phase in self.plan.phases():
      if phase.records and not phase.uses_stale:  # the carry needs a value of the record's shape
        shapes = jax.eval_shape(lambda: self.denoise(x, sched_state, None, phase.start, phase)[2])
        stale = jax.tree.map(lambda s: varying_like(jnp.zeros(s.shape, s.dtype), s), shapes)

      def body(carry, i, phase=phase):
        x, sched_state, stale, first_bad_step = carry
        x, sched_state, record = self.denoise(x, sched_state, stale, i, phase)
        if self.plan.check_finite:
          newly_bad = (first_bad_step < 0) & ~jnp.isfinite(x).all()
          first_bad_step = jnp.where(newly_bad, i, first_bad_step)
        return (x, sched_state, record if phase.records else stale, first_bad_step), None

      steps = jnp.arange(phase.start, phase.stop, dtype=jnp.int32)
      (x, sched_state, stale, first_bad_step), _ = lax.scan(body, (x, sched_state, stale, first_bad_step), steps)
    return x, first_bad_step
