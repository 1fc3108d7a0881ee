"""FLOPs of the matrix products a compiled program runs, read from its HLO text.

What a program computes per step is its `dot`s (every linear layer and attention product lowers to
one; convolutions and elementwise work are not counted): 2 × output elements × contracted size
each. Counted per computation with what it calls (fusions, nested loops by their trip counts), so
one branch of a `conditional` — one pipeline stage's work in a micro-step — can be read alone.
"""

from __future__ import annotations

import math
import re

from sharding.accounting import hlo


def dot_flops(inst: hlo.Instruction, shapes: dict[str, str]) -> int:
  """2 × output elements × contracted elements of one `dot` (`shapes`: its computation's, by name)."""
  ((_, out),) = hlo.array_shapes(inst.shape)
  ((_, lhs),) = hlo.array_shapes(shapes[inst.operands[0]])
  contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", inst.attributes)
  if contracting is None:
    raise ValueError(f"{inst.name}: a dot without lhs_contracting_dims in its attributes: not compiled HLO text?")
  contracted = math.prod(lhs[int(d)] for d in contracting.group(1).split(",") if d)
  return 2 * math.prod(out) * contracted


def computation_flops(module: hlo.Module, computation: str) -> int:
  """The dot FLOPs one run of `computation` does: its own, those of what it calls, a loop's body by its
  trip count; a conditional's branches each counted (read a branch alone with `branch_flops`)."""
  total, shapes = 0, {inst.name: inst.shape for inst in module.computations[computation]}
  for inst in module.computations[computation]:
    if inst.opcode == "dot":
      total += dot_flops(inst, shapes)
    elif inst.opcode == "while":
      total += inst.trip_count() * computation_flops(module, inst.body())
    else:
      total += sum(computation_flops(module, called) for called in inst.called())
  return total


def branch_flops(text: str) -> list[tuple[int, ...]]:
  """For every `conditional` of a compiled program, its branches' dot FLOPs (in branch order)."""
  module = hlo.parse(text)
  return [tuple(computation_flops(module, branch) for branch in inst.called())
          for instructions in module.computations.values() for inst in instructions if inst.opcode == "conditional"]


def program_flops(text: str) -> int:
  """The dot FLOPs of one run of a compiled program (its entry)."""
  module = hlo.parse(text)
  return computation_flops(module, module.entry)
