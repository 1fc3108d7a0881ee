"""Logical param axes → mesh axes: the rule tables strategies choose, and the specs they give params.

Every param names its axes by role (models/layers.py: EMBED, HEADS, MLP, CONV_IN, CONV_OUT, …, in
NNX's `out_sharding` metadata). A rule table says which mesh axis splits each of those names, or
None to replicate along it; a strategy returns its table from `Strategy.param_rules()`, and
`dfjax.sample` places the params and writes its `shard_map` in_specs through `param_specs`. So a
tensor-parallel or per-stage placement is a table, not code: e.g.
`AxisRules.replicated().with_rules({HEADS: TENSOR, MLP: TENSOR})`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from flax import nnx
from jax.sharding import PartitionSpec as P

from models.layers import PARAM_AXES
from sharding.axes import MESH_AXES


@dataclasses.dataclass(frozen=True)
class AxisRules:
  """Which mesh axis splits each logical param axis (None: replicated along it).

  Frozen and hashable (a tuple of (logical, mesh axis) pairs), so it can be part of a jit key.
  """

  rules: tuple[tuple[str, str | None], ...]

  def __post_init__(self):
    for logical, mesh_axis in self.rules:
      if mesh_axis is not None and mesh_axis not in MESH_AXES:
        raise ValueError(f"axis rule {logical!r} → {mesh_axis!r}: not a mesh axis; mesh axes: "
                         f"{', '.join(MESH_AXES)} (or None to replicate).")
    logicals = [logical for logical, _ in self.rules]
    if len(set(logicals)) != len(logicals):
      raise ValueError(f"axis rules name a logical axis twice: {logicals}")

  @classmethod
  def replicated(cls) -> AxisRules:
    """Every logical axis replicated: each device holds every param whole (the default)."""
    return cls(tuple((logical, None) for logical in PARAM_AXES))

  def with_rules(self, rules: Mapping[str, str | None]) -> AxisRules:
    """This table with `rules` ({logical axis: mesh axis or None}) replacing its entries."""
    unknown = sorted(set(rules) - set(PARAM_AXES))
    if unknown:
      raise ValueError(f"axis rules for unknown logical axes {unknown}; the model's logical axes: "
                       f"{', '.join(PARAM_AXES)}.")
    table = dict(self.rules) | dict(rules)
    return AxisRules(tuple(table.items()))

  def mesh_axis(self, logical: str, where: str) -> str | None:
    """The mesh axis splitting `logical`; a clear error naming `where` (the param) when unknown."""
    table = dict(self.rules)
    if logical not in table:
      raise ValueError(f"{where} has logical axis {logical!r}, which the axis rules do not know "
                       f"(they map {', '.join(table) or 'nothing'}): add a rule for it, e.g. "
                       f"rules.with_rules({{{logical!r}: None}}) to replicate it.")
    return table[logical]


def param_specs(params: nnx.State, rules: AxisRules, sizes: Mapping[str, int]) -> nnx.State:
  """The `PartitionSpec` of every param of `params` under `rules` on a mesh of `sizes`.

  Returns `params`' own structure (each Variable holding its spec), usable as `jax.device_put`
  shardings and `shard_map` in_specs. Trailing replicated axes are dropped, so that under the
  replicated table every spec is `P()`.

  Raises:
    ValueError: a param without axis names, or with as many names as its rank; a logical axis
      the table does not know; a mesh axis splitting two axes of one param; a mesh axis size
      that does not divide the dimension it splits (naming the sizes that would).
  """
  flat = nnx.to_flat_state(params)
  specs = {path: _spec(".".join(map(str, path)), variable, rules) for path, variable in flat}
  _check_divisible(flat, specs, sizes)
  return nnx.from_flat_state([(path, variable.replace(specs[path])) for path, variable in flat])


def _spec(where: str, variable: nnx.Variable, rules: AxisRules) -> P:
  names = variable.get_metadata("out_sharding", None)
  shape = tuple(variable.shape)
  if names is None or len(names) != len(shape):
    raise ValueError(f"param {where} of shape {shape} has logical axes {names}: a param needs one name "
                     "per axis; create it with models.layers.param(value, axes).")
  mesh_axes = [rules.mesh_axis(name, f"param {where}") for name in names]
  split = [axis for axis in mesh_axes if axis is not None]
  if len(set(split)) != len(split):
    raise ValueError(f"param {where} has logical axes {names}, which the rules map to {tuple(mesh_axes)}: "
                     "one mesh axis cannot split two axes of a param; map one of them to None.")
  while mesh_axes and mesh_axes[-1] is None:
    mesh_axes.pop()
  return P(*mesh_axes)


def _check_divisible(flat, specs: Mapping, sizes: Mapping[str, int]) -> None:
  """Each mesh axis size divides every dimension it splits; else the sizes that would divide them all."""
  splits = [(".".join(map(str, path)), dim, axis, variable.shape[dim], variable.get_metadata("out_sharding"))
            for path, variable in flat for dim, axis in enumerate(specs[path]) if axis is not None]
  for where, dim, axis, length, names in splits:
    if length % sizes[axis]:
      common = math.gcd(*(n for _, _, a, n, _ in splits if a == axis))
      valid = [d for d in range(1, common + 1) if common % d == 0]
      raise ValueError(f"param {where}: {axis}={sizes[axis]} does not divide its {names[dim]!r} axis of "
                       f"size {length}; {axis} sizes that divide every axis the rules split over it: "
                       f"{', '.join(map(str, valid))}.")
