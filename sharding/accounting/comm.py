"""Communication accounting: bytes each device receives per denoising step, per collective kind.

Read from the compiled program itself, so it counts what XLA really runs. Each top-level
`while` loop is one phase's `lax.scan` (one iteration per step); the collectives in its body,
and in what the body calls, are that phase's per-step traffic — those inside a loop nested in
the step (PipeFusion's micro-steps) once per iteration of it, by its trip count. XLA inlines a
scan of one step: a phase of one step has no loop (and is not reported), and a loop traced
inside its step lands in the entry; such a loop (its op_name says it was traced in a loop body)
is not a phase.

Bytes are what one device receives per step: an all-gather and an all-to-all bring (n−1)/n of
their output, a collective-permute its whole output (interior devices of a patch ring; edge
devices get less), an all-reduce moves its payload.
"""

import dataclasses
import re
from collections.abc import Mapping

import numpy as np

from sharding.accounting import hlo

COLLECTIVES = {"all-gather", "collective-permute", "all-reduce", "all-to-all", "reduce-scatter"}
# Ops that only move or relabel data: a collective's result passing only through them to the
# loop's ROOT is carried to the next iteration, not consumed in this one.
_PASS_THROUGH = {"copy", "bitcast", "tuple", "get-tuple-element", "reshape", "copy-start", "copy-done",
                 "all-gather-done", "collective-permute-done", "all-reduce-done", "async-done",
                 "optimization-barrier"}


def collective_kind(opcode: str) -> str | None:
  kind = opcode.removesuffix("-start")
  return kind if kind in COLLECTIVES else None


@dataclasses.dataclass(frozen=True)
class StepTraffic:
  """One phase's per-step collectives: {kind: (count, bytes received per device)}."""

  by_kind: dict[str, tuple[int, int]]

  @property
  def total_bytes(self) -> int:
    return sum(b for _, b in self.by_kind.values())

  def format(self) -> str:
    parts = [f"{kind} ×{count} {size / 2**20:.3f} MiB" for kind, (count, size) in sorted(self.by_kind.items())]
    return ", ".join(parts) or "none"


def _received_bytes(inst: hlo.Instruction, shapes: dict[str, str]) -> int:
  arrays = hlo.array_shapes(inst.shape)
  if inst.opcode.endswith("-start") and len(arrays) > 1:
    arrays = arrays[len(arrays) // 2:] if collective_kind(inst.opcode) == "all-gather" else arrays[1:2]
  out = sum(hlo.nbytes(d, s) for d, s in arrays)
  operand = sum(hlo.nbytes(d, s) for name in inst.operands for d, s in hlo.array_shapes(shapes.get(name, "")))
  match collective_kind(inst.opcode):
    case "all-gather":
      return out - operand
    case "reduce-scatter":
      return operand - out
    case "all-to-all":  # the device keeps its own 1/n share
      return out - out // _group_size(inst)
    case _:
      return out


def _device_groups(inst: hlo.Instruction) -> list[list[int]]:
  """The device groups a collective runs over: its replica groups, or each source→target pair of a permute.

  Listed (`{{0,1},{2,3}}`) or iota (`[2,4]<=[8]`, `[4,2]<=[2,2,2]T(0,2,1)`: arange over the
  reshape dims, transposed, reshaped to groups) forms; ids are the devices' places in the mesh.
  """
  pairs = re.search(r"source_target_pairs=\{(\{[\d,{}]*\})\}", inst.attributes)
  listed = pairs or re.search(r"replica_groups=\{(\{[\d,{}]*\})\}", inst.attributes)
  if listed:
    return [[int(i) for i in group.split(",") if i] for group in re.findall(r"\{([\d,]*)\}", listed.group(1))]
  iota = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", inst.attributes)
  if iota:
    shape, dims = [int(d) for d in iota.group(1).split(",")], [int(d) for d in iota.group(2).split(",")]
    ids = np.arange(np.prod(dims)).reshape(dims)
    if iota.group(3):
      ids = ids.transpose([int(d) for d in iota.group(3).split(",")])
    return ids.reshape(shape).tolist()
  raise ValueError(f"no replica groups in {inst.name}'s attributes: {inst.attributes[:200]}")


def _mesh_axes_of(groups: list[list[int]], mesh_shape: Mapping[str, int]) -> str:
  """The mesh axes a collective's groups span ('patch', or 'cfg+patch' for a group over two axes)."""
  names, sizes = list(mesh_shape), tuple(mesh_shape.values())
  varying = set()
  for group in groups:
    coords = np.array(np.unravel_index(group, sizes))  # axis, member
    varying |= {names[a] for a in range(len(names)) if len(set(coords[a])) > 1}
  return "+".join(name for name in names if name in varying) or "none"


def traffic_by_axis(compiled_text: str, mesh_shape: Mapping[str, int]) -> list[dict[str, int]]:
  """Per scan phase, {mesh axis: bytes one device receives per step} of a program over a mesh of
  `mesh_shape` ({axis: size}, in the mesh's order), each collective under the axes its groups span."""
  module = hlo.parse(compiled_text)
  phases = []
  for body in step_loops(module):
    by_axis: dict[str, int] = {}
    for inst, shapes, runs in _collectives(module, body):
      axis = _mesh_axes_of(_device_groups(inst), mesh_shape)
      by_axis[axis] = by_axis.get(axis, 0) + runs * _received_bytes(inst, shapes)
    phases.append(by_axis)
  return phases


def _group_size(inst: hlo.Instruction) -> int:
  """Devices in each replica group of a collective: `{{0,1,2,3},…}`, or `[groups,n]<=[…]` (iota form)."""
  listed = re.search(r"replica_groups=\{\{([\d,]*)\}", inst.attributes)
  if listed:
    return len(listed.group(1).split(","))
  iota = re.search(r"replica_groups=\[[\d,]*?(\d+)\]<=", inst.attributes)
  if iota:
    return int(iota.group(1))
  raise ValueError(f"no replica groups in {inst.name}'s attributes: {inst.attributes[:200]}")


def _collectives(module: hlo.Module, computation: str, runs: int = 1):
  """(instruction, its computation's shape table, how many times it runs per run of `computation`) for
  every collective `computation` runs, directly or through what it calls: a nested loop's body
  `trip_count` times per run, its condition once more; of a conditional's branches only the one that
  receives the most (each device runs one: PipeFusion's stages, whose sequence ranks exchange inside)."""
  instructions = module.computations[computation]
  shapes = {i.name: i.shape for i in instructions}
  for inst in instructions:
    if collective_kind(inst.opcode):
      yield inst, shapes, runs
    called = [c for c in inst.called() if c in module.computations]
    if inst.opcode == "conditional" and len(called) > 1:  # a device runs one branch: count the heaviest
      branches = [list(_collectives(module, c, runs)) for c in called]
      yield from max(branches, key=lambda found: sum(r * _received_bytes(i, s) for i, s, r in found))
      continue
    for name in called:
      repeats = 1
      if inst.opcode == "while":
        repeats = inst.trip_count() + (0 if name == inst.body() else 1)
      yield from _collectives(module, name, runs * repeats)


def step_loops(module: hlo.Module) -> list[str]:
  """Body computations of the entry's step loops, in program order (one per scan phase of more than one
  step): its while loops, but those traced inside a loop body (a one-step phase's inner loops)."""
  bodies = []
  for inst in module.computations[module.entry]:
    if inst.opcode == "while" and not inst.traced_in_a_loop():
      bodies += [inst.body()]
  return bodies


def traffic_per_step(compiled_text: str) -> list[StepTraffic]:
  """Per-step traffic of each scan phase of a compiled program (`compiled.as_text()`)."""
  module = hlo.parse(compiled_text)
  return [_traffic(module, body) for body in step_loops(module)]


def run_traffic(compiled_text: str) -> StepTraffic:
  """What one device receives over one run of a compiled program: every collective of its entry, those in
  loops by their trip counts (the steps of every phase, and what runs once, such as a one-step phase)."""
  module = hlo.parse(compiled_text)
  return _traffic(module, module.entry)


def _traffic(module: hlo.Module, computation: str) -> StepTraffic:
  """What one run of `computation` receives, by collective kind: (count, bytes)."""
  by_kind: dict[str, tuple[int, int]] = {}
  for inst, shapes, runs in _collectives(module, computation):
    count, size = by_kind.get(collective_kind(inst.opcode), (0, 0))
    by_kind[collective_kind(inst.opcode)] = (count + runs, size + runs * _received_bytes(inst, shapes))
  return StepTraffic(by_kind)


def consumed_in_step(compiled_text: str) -> list[list[str]]:
  """For each scan phase, the collectives whose results are used by computation in the same step.

  An empty list means every collective of that phase only feeds the carry: nothing waits for it
  inside the step, so XLA is free to overlap it with the step's compute.
  """
  module = hlo.parse(compiled_text)
  result = []
  for body in step_loops(module):
    users = module.users(body)
    consumed = []
    for inst in module.computations[body]:
      if collective_kind(inst.opcode) and _feeds_compute(inst, users):
        consumed.append(inst.name)
    consumed += [i.name for name in module.reachable(body)[1:] for i in module.computations[name]
                 if collective_kind(i.opcode)]  # collectives inside nested computations: conservatively consumed
    result.append(consumed)
  return result


def _feeds_compute(inst: hlo.Instruction, users: dict[str, list[hlo.Instruction]]) -> bool:
  stack, seen = [inst], set()
  while stack:
    current = stack.pop()
    for user in users.get(current.name, []):
      if user.name in seen:
        continue
      seen.add(user.name)
      if user.opcode not in _PASS_THROUGH:
        return True
      stack.append(user)
  return False
