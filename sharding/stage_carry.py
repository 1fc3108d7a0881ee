"""What crosses each cut of a model split into pipeline stages: traced, like the params each segment reads.

A stage's input is the model's carry at its cut (models/unet.py `UNetCarry`, models/dit.py
`DiTCarry`). Its leaves are of two kinds:
  conditioning  what the first segment derives from the timestep and the conditioning alone (the
                UNet's time embedding and text states, DiT's timestep + class embedding): every
                stage computes it for its own step from replicated params (`conditioning_params`),
                so it never crosses a cut and is never stale;
  activations   what depends on the latent (the hidden state, the UNet's skips): made by one stage
                and read by later ones, each sent by the stage that made it straight to each stage
                that reads it (a skip goes from its down block's stage to its up block's), not
                handed along the chain of stages.
Traced with `jax.make_jaxpr`, so the layout cannot disagree with the model code: a leaf's kind is
whether it depends on the latent, its maker is the first segment whose output holds it (a segment
passes a leaf on unchanged: the same jaxpr variable), and a stage reads an input leaf when its
program computes with it (a leaf it only passes on stays zero on that stage).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend.core import Literal

from models.parallel import SINGLE_DEVICE


@dataclasses.dataclass(frozen=True)
class Transfer:
  """One activation a stage sends to a later stage that reads it.

  Attributes:
    source, destination: the making and the reading stage.
    source_leaf: its index among the leaves of the source stage's output carry.
    destination_leaf: its index among the leaves of the destination stage's input carry.
    shape, dtype: the array's, for the traced batch.
  """

  source: int
  destination: int
  source_leaf: int
  destination_leaf: int
  shape: tuple[int, ...]
  dtype: str

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


# How each leaf of a stage's input carry is filled: ("conditioning", i) the i-th conditioning leaf,
# ("transfer", k) transfer k's array, ("unread", shape, dtype) zeros (the stage only passes it on).
Source = tuple


@dataclasses.dataclass(frozen=True)
class CarryLayout:
  """Which carry leaves cross which cut, for a model cut into stages (hashable: part of a jit key).

  Build with `CarryLayout.trace`. Inside a stage's program: `conditioning(model, x, t, cond)` for the
  stage's own step, `stage_input(stage, received, conditioning)` its input carry, `sent(stage, carry)`
  what its output sends (`transfers` in order), `prediction(carry)` the last stage's output.
  """

  stage_of_segment: tuple[int, ...]
  conditioning_leaves: tuple[int, ...]  # which leaves of the first segment's output are conditioning
  conditioning_params: frozenset[int]  # the state leaves (jax.tree order) conditioning is made from
  inputs: tuple[tuple[jax.tree_util.PyTreeDef, tuple[Source, ...]] | None, ...]  # per stage; None: stage 0
  transfers: tuple[Transfer, ...]
  prediction_leaf: int  # the leaf of the last stage's output carry holding the model output (`carry.h`)

  @property
  def stages(self) -> int:
    return max(self.stage_of_segment) + 1

  @classmethod
  def trace(cls, model: nnx.Module, x, timesteps, cond: Mapping, stage_of_segment: Sequence[int]) -> CarryLayout:
    """The layout of `model` cut into `stage_of_segment`, traced on inputs like `model(x, timesteps, **cond)`
    (arrays or ShapeDtypeStructs of the batch one device's model call runs)."""
    stage_of_segment = tuple(stage_of_segment)
    segments = len(model.segments())
    if len(stage_of_segment) != segments:
      raise ValueError(f"{len(stage_of_segment)} segment stages for a model of {segments} segments.")
    graphdef, state = nnx.split(model)
    param_leaves, param_treedef = jax.tree.flatten(state)
    params = [jax.ShapeDtypeStruct(np.shape(v), v.dtype) for v in param_leaves]
    as_spec = lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a))
    x, timesteps, cond = as_spec(x), as_spec(timesteps), {k: as_spec(v) for k, v in cond.items()}
    merged = lambda leaves: nnx.merge(graphdef, jax.tree.unflatten(param_treedef, leaves))

    def fold(leaves, x, timesteps, cond):  # every segment's output carry
      m = merged(leaves)
      carry, outputs = m.first_carry(x, timesteps, **cond), []
      for segment in m.segments():
        carry = segment(carry, ctx=SINGLE_DEVICE)
        outputs.append(carry)
      return outputs

    closed, shapes = jax.make_jaxpr(fold, return_shape=True)(params, x, timesteps, cond)
    program = closed.jaxpr
    x_var = program.invars[len(params)]
    counts = [len(jax.tree.leaves(carry)) for carry in shapes]
    ends = np.cumsum(counts)
    cut_vars = [program.outvars[end - n:end] for n, end in zip(counts, ends)]  # cut_vars[k]: after segment k
    on_latent = _depends_on(program, {x_var})

    conditioning = [v for v in cut_vars[0] if not _in(v, on_latent)]
    conditioning_leaves = tuple(i for i, v in enumerate(cut_vars[0]) if not _in(v, on_latent))
    made_by = {}  # activation variable → the segment that made it
    for k, variables in enumerate(cut_vars):
      for v in variables:
        if _in(v, on_latent):
          made_by.setdefault(v, k)
        elif not any(v is c for c in conditioning):
          raise ValueError(f"segment {k}'s output holds a leaf made from the conditioning alone after the first "
                           "segment: a staged layout needs every conditioning leaf made by the first segment.")
    needed = _needed_by(program, conditioning)
    conditioning_params = frozenset(i for i, v in enumerate(program.invars[:len(params)]) if v in needed)

    first_segment = [stage_of_segment.index(s) for s in range(max(stage_of_segment) + 1)]
    last_segment = [len(stage_of_segment) - 1 - stage_of_segment[::-1].index(s) for s in range(len(first_segment))]
    inputs, transfers, sent = [None], [], {}  # sent: (activation, destination) → its transfer
    for stage in range(1, len(first_segment)):
      carry_shape = shapes[first_segment[stage] - 1]
      read = _stage_reads(merged, params, carry_shape, stage_of_segment, stage)
      sources = []
      for j, (v, leaf) in enumerate(zip(cut_vars[first_segment[stage] - 1], jax.tree.leaves(carry_shape))):
        if not _in(v, on_latent):
          sources.append(("conditioning", next(i for i, c in enumerate(conditioning) if v is c)))
        elif not read[j]:
          sources.append(("unread", tuple(leaf.shape), np.dtype(leaf.dtype).name))
        else:
          if (v, stage) not in sent:  # a leaf read twice (the UNet's first hidden state is also a skip): sent once
            source = stage_of_segment[made_by[v]]
            outputs = cut_vars[last_segment[source]]
            sent[(v, stage)] = len(transfers)
            transfers.append(Transfer(source, stage, next(i for i, o in enumerate(outputs) if o is v), j,
                                      tuple(leaf.shape), np.dtype(leaf.dtype).name))
          sources.append(("transfer", sent[(v, stage)]))
      inputs.append((jax.tree.structure(carry_shape), tuple(sources)))
    last = shapes[-1]
    marked = jax.tree.unflatten(jax.tree.structure(last), list(range(len(jax.tree.leaves(last)))))
    return cls(stage_of_segment, conditioning_leaves, conditioning_params, tuple(inputs), tuple(transfers), marked.h)

  # ------------------------------------------------------------------------ inside a stage's program

  def conditioning(self, model: nnx.Module, x, timesteps, cond: Mapping) -> tuple[jax.Array, ...]:
    """The conditioning leaves for `timesteps`: the first segment on a zero latent, only what does not
    depend on it kept (XLA drops the rest), from `model`'s replicated conditioning params."""
    carry = model.segments()[0](model.first_carry(jnp.zeros_like(x), timesteps, **cond), ctx=SINGLE_DEVICE)
    leaves = jax.tree.leaves(carry)
    return tuple(leaves[i] for i in self.conditioning_leaves)

  def stage_input(self, stage: int, received: Sequence[jax.Array], conditioning: Sequence[jax.Array]):
    """Stage `stage`'s (≥ 1) input carry: `received[k]` is transfer k's array (those to other stages unused)."""
    treedef, sources = self.inputs[stage]
    leaves = []
    for source in sources:
      match source:
        case ("conditioning", i):
          leaves.append(conditioning[i])
        case ("transfer", k):
          leaves.append(received[k])
        case ("unread", shape, dtype):
          leaves.append(jnp.zeros(shape, dtype))
        case _:
          raise ValueError(f"unknown carry source {source!r}; valid: conditioning, transfer, unread")
    return jax.tree.unflatten(treedef, leaves)

  def sent(self, stage: int, carry) -> dict[int, jax.Array]:
    """{transfer index: array} of what stage `stage` sends, from its output carry."""
    leaves = jax.tree.leaves(carry)
    return {k: leaves[t.source_leaf] for k, t in enumerate(self.transfers) if t.source == stage}

  def prediction(self, carry) -> jax.Array:
    """The model output in the last stage's output carry."""
    return jax.tree.leaves(carry)[self.prediction_leaf]


def run_constant_leaves(model: nnx.Module, x, timesteps, cond: Mapping) -> tuple[int, ...]:
  """The leaves of the first segment's output carry made from the conditioning alone — from neither the
  latent nor the timestep (a PixArt's projected text states and keep-mask): the same at every step of a
  run, so a pipeline can hand them to each stage once instead of with every activation. Traced, like the
  layout (inside a trace: `model` may close over its tracers)."""
  def embedded(x, timesteps, cond):
    return jax.tree.leaves(model.segments()[0](model.first_carry(x, timesteps, **cond), ctx=SINGLE_DEVICE))

  program = jax.make_jaxpr(embedded)(x, timesteps, dict(cond)).jaxpr
  varying = _depends_on(program, set(program.invars[:2]))  # x and the timestep: the first two inputs
  return tuple(i for i, v in enumerate(program.outvars) if not _in(v, varying))


def _in(v, variables: set) -> bool:
  return not isinstance(v, Literal) and v in variables


def _depends_on(program, sources: set) -> set:
  """The variables of `program` computed from any of `sources` (conservative for nested programs:
  every output of an equation depends on all of its inputs)."""
  dependent = set(sources)
  for eqn in program.eqns:
    if any(_in(v, dependent) for v in eqn.invars):
      dependent.update(eqn.outvars)
  return dependent


def _needed_by(program, outputs: Sequence) -> set:
  """The variables of `program` that `outputs` are computed from (conservatively, as `_depends_on`)."""
  needed = {v for v in outputs if not isinstance(v, Literal)}
  for eqn in reversed(program.eqns):
    if any(v in needed for v in eqn.outvars):
      needed.update(v for v in eqn.invars if not isinstance(v, Literal))
  return needed


def run_stage(model, carry, stage_of_segment: Sequence[int], stage: int, ctx=SINGLE_DEVICE):
  """Stage `stage`'s segments of `model`, in order, on `carry`."""
  for segment, owner in zip(model.segments(), stage_of_segment):
    if owner == stage:
      carry = segment(carry, ctx=ctx)
  return carry


def _stage_reads(merged, params, carry_shape, stage_of_segment, stage: int) -> list[bool]:
  """For each leaf of stage `stage`'s input carry, whether the stage's program computes with it."""
  run = lambda leaves, carry: run_stage(merged(leaves), carry, stage_of_segment, stage)
  program = jax.make_jaxpr(run)(params, carry_shape).jaxpr
  used = {v for eqn in program.eqns for v in eqn.invars if not isinstance(v, Literal)}
  return [v in used for v in program.invars[len(params):]]
