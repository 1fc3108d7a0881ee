"""A small reader of compiled HLO text: computations, instructions, shapes, uses.

Enough of HLO's text form to find the collectives of each `while` loop (one loop per scan,
one iteration per denoising step), their sizes, how often nested loops run them and what consumes
their results.
"""

import dataclasses
import re

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2,
                "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")


@dataclasses.dataclass
class Instruction:
  name: str
  opcode: str
  shape: str        # e.g. "f32[4,2,3]{2,1,0}" or a tuple "(s32[], f32[2,3]{1,0})"
  operands: list[str]
  attributes: str   # everything after the operand list
  is_root: bool

  def called(self) -> list[str]:
    """Computations this instruction runs (while body/condition, fusion, call, branches…)."""
    found = re.findall(r"(?:body|condition|calls|to_apply|branch_computations)=(\{[^}]*\}|%?[\w.\-]+)",
                       self.attributes)
    return [n.strip(" {}%") for group in found for n in group.split(",") if n.strip(" {}")]

  def body(self) -> str | None:
    """The body computation of a `while` (None for any other instruction)."""
    found = re.search(r"\bbody=%?([\w.\-]+)", self.attributes) if self.opcode == "while" else None
    return found and found.group(1)

  def trip_count(self) -> int:
    """Iterations of a `while`: the `known_trip_count` XLA's loop analysis writes into its backend_config
    (every `lax.scan` has one)."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', self.attributes)
    if known is None:
      raise ValueError(f"{self.name}: XLA wrote no known_trip_count for this while loop, so the traffic of the "
                       "collectives inside it per iteration of the loop around it is unknown; only loops with a "
                       "static trip count (lax.scan, fori_loop with constant bounds) can be accounted.")
    return int(known.group(1))

  def traced_in_a_loop(self) -> bool:
    """Whether JAX traced this instruction inside a scan's or while's body (its metadata's op_name
    `…/while/body/…`), whichever computation XLA has since moved it to; False without metadata."""
    op_name = re.search(r'op_name="([^"]*)"', self.attributes)
    return op_name is not None and "while/body/" in op_name.group(1)


@dataclasses.dataclass
class Module:
  computations: dict[str, list[Instruction]]
  entry: str

  def users(self, computation: str) -> dict[str, list[Instruction]]:
    users: dict[str, list[Instruction]] = {}
    for inst in self.computations[computation]:
      for operand in inst.operands:
        users.setdefault(operand, []).append(inst)
    return users

  def reachable(self, computation: str) -> list[str]:
    """`computation` and every computation it calls, transitively."""
    seen, stack = [], [computation]
    while stack:
      name = stack.pop()
      if name in seen or name not in self.computations:
        continue
      seen.append(name)
      stack += [c for inst in self.computations[name] for c in inst.called()]
    return seen


def parse(text: str) -> Module:
  computations: dict[str, list[Instruction]] = {}
  entry, current = None, None
  for line in text.splitlines():
    header = _HEADER.match(line.strip())
    if header and " = " not in line.split("(")[0]:
      current = header.group(2)
      computations[current] = []
      if header.group(1):
        entry = current
      continue
    if current is None or " = " not in line:
      continue
    inst = _parse_instruction(line.strip())
    if inst is not None:
      computations[current].append(inst)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text: pass a compiled program's as_text().")
  return Module(computations, entry)


def _parse_instruction(line: str) -> Instruction | None:
  is_root = line.startswith("ROOT ")
  lhs, _, rhs = line.removeprefix("ROOT ").partition(" = ")
  shape, rest = _split_shape(rhs)
  opcode, _, rest = rest.partition("(")
  depth, end = 1, 0
  for end, char in enumerate(rest):
    depth += {"(": 1, ")": -1}.get(char, 0)
    if depth == 0:
      break
  operands = re.findall(r"%([\w.\-]+)", rest[:end])
  return Instruction(lhs.strip().lstrip("%"), opcode.strip(), shape, operands, rest[end + 1:], is_root)


def _split_shape(rhs: str) -> tuple[str, str]:
  if rhs.startswith("("):
    depth = 0
    for i, char in enumerate(rhs):
      depth += {"(": 1, ")": -1}.get(char, 0)
      if depth == 0:
        return rhs[: i + 1], rhs[i + 1:].strip()
  shape, _, rest = rhs.partition(" ")
  return shape, rest


def array_shapes(shape: str) -> list[tuple[str, tuple[int, ...]]]:
  """The (dtype, dims) of every array in a shape string, tuples flattened in order."""
  return [(dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims in _ARRAY.findall(shape)]


def nbytes(dtype: str, dims: tuple[int, ...]) -> int:
  if dtype not in _DTYPE_BYTES:
    raise ValueError(f"unknown HLO element type {dtype!r}")
  size = _DTYPE_BYTES[dtype]
  for d in dims:
    size *= d
  return size
