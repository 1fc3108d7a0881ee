"""Parameters placed by pipeline stage: each device holds only the segments its stage runs.

Pipeline methods (AsyncDiff, PipeFusion, DiffusionPipe) cut a model at its segments
(models/unet.py, models/dit.py) into consecutive stages on the mesh axis `stage`. SPMD wants one
array shape on every device, but the stages' parameters differ in structure, so each stage's
leaves are packed, by dtype, into one row of a (devices, n) buffer sharded over `stage`: a
device's row is its stage's parameters and nothing else (n is the largest stage's size, so a
balanced cut wastes little; a stage that runs on several devices, as AsyncDiff's last component
with stride 2, has its row on each). A leaf that segments of several stages read (none in the
UNet or DiT), or that every stage reads (`shared`: the conditioning embeddings each stage
computes for itself, sharding/stage_carry.py), is replicated instead. Inside the `shard_map`, `unpack(local, s)` rebuilds the model state
with stage s's leaves and zeros for the others: the branch that runs stage s's segments reads
only its own leaves, so XLA never materialises the zeros.

Which segment reads which parameter is traced, not declared: `params_by_segment` runs each
segment under `jax.make_jaxpr` and keeps the parameters its program uses, so the placement can
never disagree with the model code.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend.core import Literal
from jax.sharding import PartitionSpec as P

from sharding.axes import STAGE

Path = str  # a leaf's path in the model state, as `jax.tree_util.keystr` spells it


def leaf_paths(state: nnx.State) -> tuple[Path, ...]:
  """The paths of `state`'s leaves, in `jax.tree` order (the order every layout here indexes by)."""
  return tuple(jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(state)[0])


def params_by_segment(model: nnx.Module, x, timesteps, **cond) -> tuple[frozenset[int], ...]:
  """For each of `model.segments()`, the indices (in `jax.tree` order of its state) of the leaves its
  program reads, traced on inputs like `model(x, timesteps, **cond)` (arrays or ShapeDtypeStructs)."""
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  values = [jax.ShapeDtypeStruct(np.shape(v), v.dtype) for v in leaves]

  def run_segment(index, leaves, carry):
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves)).segments()[index](carry)

  carry = jax.eval_shape(lambda: model.first_carry(x, timesteps, **cond))
  read = []
  for index in range(len(model.segments())):
    program = jax.make_jaxpr(functools.partial(run_segment, index))(values, carry).jaxpr
    used = {v for eqn in program.eqns for v in eqn.invars if not isinstance(v, Literal)}
    used |= {v for v in program.outvars if not isinstance(v, Literal)}
    read.append(frozenset(i for i, var in enumerate(program.invars[:len(values)]) if var in used))
    carry = jax.eval_shape(functools.partial(run_segment, index), values, carry)
  return tuple(read)


@dataclasses.dataclass(frozen=True)
class _Slot:
  """Where one leaf lives: its stage's row of the buffer of its dtype (stage None: replicated)."""

  shape: tuple[int, ...]
  dtype: str
  stage: int | None
  start: int

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))


@dataclasses.dataclass(frozen=True)
class StagedParams:
  """A model's params laid out over `stages` pipeline stages (hashable: part of a jit key).

  Build with `StagedParams.plan`; `pack` the host state into what is placed on the mesh (with
  `specs`), `unpack` a device's share inside the `shard_map`.
  """

  stages: int
  treedef: jax.tree_util.PyTreeDef  # the state's structure (Variables and their metadata)
  slots: tuple[_Slot, ...]  # one per leaf, in jax.tree order
  row_lengths: tuple[tuple[str, int], ...]  # (dtype, n) of each (devices, n) buffer
  devices: tuple[int, ...]  # the stage each device along `stage` runs: whose row it holds

  @classmethod
  def plan(cls, state: nnx.State, segment_params: Sequence[frozenset[int]], stage_of_segment: Sequence[int],
           *, shared: frozenset[int] = frozenset(), devices: Sequence[int] | None = None) -> StagedParams:
    """The layout putting each param on the stage of the segment that reads it.

    Args:
      state: the model's state (`nnx.split(model)[1]`).
      segment_params: the leaves each segment reads (`params_by_segment`).
      stage_of_segment: the stage running each segment.
      shared: leaves every stage reads (replicated).
      devices: the stage each device along the `stage` axis runs (default: device s runs stage s).
    """
    if len(stage_of_segment) != len(segment_params):
      raise ValueError(f"{len(stage_of_segment)} segment stages for a model of {len(segment_params)} segments.")
    stages = max(stage_of_segment) + 1
    devices = tuple(range(stages)) if devices is None else tuple(devices)
    if sorted(set(devices)) != list(range(stages)):
      raise ValueError(f"devices {devices} must run each of the {stages} stages at least once.")
    readers: dict[int, set[int]] = {leaf: set(range(stages)) for leaf in shared}
    for stage, read in zip(stage_of_segment, segment_params):
      for leaf in read:
        readers.setdefault(leaf, set()).add(stage)
    leaves, treedef = jax.tree.flatten(state)
    filled: dict[tuple[str, int], int] = {}
    slots = []
    for index, leaf in enumerate(leaves):
      owners = readers.get(index, set())
      stage = next(iter(owners)) if len(owners) == 1 else None  # unread or read by several: replicated
      slot = _Slot(tuple(np.shape(leaf)), np.dtype(leaf.dtype).name, stage, 0)
      if stage is not None:
        slot = dataclasses.replace(slot, start=filled.get((slot.dtype, stage), 0))
        filled[(slot.dtype, stage)] = slot.start + slot.size
      slots.append(slot)
    lengths: dict[str, int] = {}
    for (dtype, _), used in filled.items():
      lengths[dtype] = max(lengths.get(dtype, 0), used)
    return cls(stages, treedef, tuple(slots), tuple(sorted(lengths.items())), devices)

  def pack(self, state: nnx.State) -> dict:
    """The host state as placed on the mesh: {"rows": {dtype: (devices, n)}, "shared": {index: leaf}}."""
    devices = np.asarray(self.devices)
    rows = {dtype: np.zeros((len(devices), n), dtype) for dtype, n in self.row_lengths}
    shared = {}
    for index, (slot, leaf) in enumerate(zip(self.slots, jax.tree.leaves(state))):
      if slot.stage is None:
        shared[str(index)] = leaf
      else:
        rows[slot.dtype][devices == slot.stage, slot.start:slot.start + slot.size] = np.asarray(leaf).reshape(-1)
    return {"rows": rows, "shared": shared}

  def specs(self) -> dict:
    """The partition specs of `pack`'s result: rows over `stage`, shared leaves replicated."""
    return {"rows": {dtype: P(STAGE) for dtype, _ in self.row_lengths},
            "shared": {str(i): P() for i, slot in enumerate(self.slots) if slot.stage is None}}

  def unpack(self, local: Mapping, stage: int) -> nnx.State:
    """Inside the shard_map: the model state with stage `stage`'s leaves (from this device's row: call it
    only on a device that runs `stage`) and the shared ones; zeros for every other stage's, which stage
    `stage`'s segments never read."""
    values = []
    for index, slot in enumerate(self.slots):
      if slot.stage is None:
        values.append(local["shared"][str(index)])
      elif slot.stage == stage:
        values.append(local["rows"][slot.dtype][0, slot.start:slot.start + slot.size].reshape(slot.shape))
      else:
        values.append(jnp.zeros(slot.shape, slot.dtype))
    return jax.tree.unflatten(self.treedef, values)

  def bytes_per_device(self) -> int:
    """What one device holds: its row of every buffer, and every shared leaf."""
    row = sum(n * np.dtype(dtype).itemsize for dtype, n in self.row_lengths)
    return row + sum(s.size * np.dtype(s.dtype).itemsize for s in self.slots if s.stage is None)

  def stage_bytes(self) -> tuple[int, ...]:
    """Each stage's own parameter bytes (without padding or shared leaves)."""
    sizes = [0] * self.stages
    for slot in self.slots:
      if slot.stage is not None:
        sizes[slot.stage] += slot.size * np.dtype(slot.dtype).itemsize
    return tuple(sizes)
