"""Logical param axes → mesh axes: the rule tables strategies choose, and the specs they give params.

Every param names its axes by role (models/layers.py: EMBED, HEADS, MLP, CONV_IN, CONV_OUT, …, in
NNX's `out_sharding` metadata). A rule table says which mesh axis splits each of those names, or
None to replicate along it; a strategy returns its table from `Strategy.param_rules()`, and
`dfjax.sample` places the params and writes its `shard_map` in_specs through `param_specs`. So a
tensor-parallel or per-stage placement is a table, not code: `tensor_rules()` is Megatron's,
every inner width (models/layers.py: INNER_WIDTHS) over `tensor`. A param axis made of equal
parts (`chunks`, GEGLU's value and gate) is reordered before placement (`shard_layout`) so that
each device's contiguous slice holds its slice of every part.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from models.attention import Attention
from models.build import abstract_model
from models.layers import INNER_WIDTHS, PARAM_AXES
from sharding.axes import MESH_AXES, TENSOR


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

  @classmethod
  def tensor(cls) -> AxisRules:
    """Megatron's table: every inner width (heads, feed-forward, resnet hidden channels) over `tensor`."""
    return cls.replicated().with_rules(dict.fromkeys(INNER_WIDTHS, TENSOR))

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
  shardings and `shard_map` in_specs. A mesh axis of size 1 splits nothing and is left out, and
  trailing replicated axes are dropped, so that on a mesh that splits no param every spec is `P()`.

  Raises:
    ValueError: a param without axis names, or with as many names as its rank; a logical axis
      the table does not know; a mesh axis splitting two axes of one param; a mesh axis size
      that does not divide the dimension it splits (naming the sizes that would).
  """
  flat = nnx.to_flat_state(params)
  specs = {path: _spec(".".join(map(str, path)), variable, rules, sizes) for path, variable in flat}
  _check_divisible(flat, specs, sizes)
  return nnx.from_flat_state([(path, variable.replace(specs[path])) for path, variable in flat])


def shard_layout(params: nnx.State, rules: AxisRules, sizes: Mapping[str, int]) -> nnx.State:
  """`params` with every chunked axis that `rules` split reordered: device i's contiguous slice holds
  slice i of each of the axis's parts (GEGLU: value slice i, then gate slice i).

  The layer splits the parts apart after its matmul (`jnp.split`), so on each device it finds its
  slice of each. Params without chunked split axes are returned as they are.
  """
  spec_of = dict(nnx.to_flat_state(param_specs(params, rules, sizes)))
  return nnx.from_flat_state([(path, variable.replace(_reordered(variable, spec_of[path].get_value(), sizes)))
                              for path, variable in nnx.to_flat_state(params)])


def _reordered(variable: nnx.Variable, spec: P, sizes: Mapping[str, int]) -> jax.Array:
  value = variable.get_value()
  for dim, (mesh_axis, parts) in enumerate(zip(spec, _chunks(variable))):
    if mesh_axis is None or parts == 1:
      continue
    n, shape = sizes[mesh_axis], value.shape
    split = value.reshape(*shape[:dim], parts, n, shape[dim] // (parts * n), *shape[dim + 1:])  # …, k, n, L/kn, …
    value = jnp.swapaxes(split, dim, dim + 1).reshape(shape)  # …, n, k, L/kn, … → L
  return value


def _chunks(variable: nnx.Variable) -> tuple[int, ...]:
  """The parts each axis of a param is made of (models.layers.param's `chunks`; 1 each by default)."""
  return variable.get_metadata("chunks", None) or (1,) * len(variable.shape)


def local_param_bytes(params: nnx.State, specs: nnx.State, sizes: Mapping[str, int]) -> int:
  """Bytes of params one device holds when `specs` place `params` on a mesh of `sizes`."""
  spec_of = dict(nnx.to_flat_state(specs))
  return sum(variable.size * variable.dtype.itemsize
             // math.prod(sizes[axis] for axis in spec_of[path].get_value() if axis is not None)
             for path, variable in nnx.to_flat_state(params))


@functools.lru_cache(maxsize=16)
def valid_tensor_degrees(config) -> tuple[int, ...]:
  """The `tensor` sizes a model can split over: divisors of every inner width (each part of a
  chunked one) and of every attention's head count, so that each device holds whole heads."""
  model = abstract_model(config)
  widths = [length // parts for _, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))
            for name, length, parts in zip(variable.get_metadata("out_sharding"), variable.shape, _chunks(variable))
            if name in INNER_WIDTHS]
  heads = [node.heads for _, node in nnx.iter_graph(model) if isinstance(node, Attention)]
  common = math.gcd(*widths, *heads)
  return tuple(d for d in range(1, common + 1) if common % d == 0)


def check_tensor_degree(config, degree: int) -> None:
  """Raises ValueError naming the valid degrees when `tensor=degree` does not split the model's heads and widths."""
  valid = valid_tensor_degrees(config)
  if degree not in valid:
    raise ValueError(f"tensor={degree} does not divide this {type(config).__name__}'s attention heads and "
                     f"inner widths (heads, feed-forward and resnet channels): valid tensor degrees: "
                     f"{', '.join(map(str, valid))}.")


def _spec(where: str, variable: nnx.Variable, rules: AxisRules, sizes: Mapping[str, int]) -> P:
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
  mesh_axes = [axis if axis is not None and sizes[axis] > 1 else None for axis in mesh_axes]
  while mesh_axes and mesh_axes[-1] is None:
    mesh_axes.pop()
  return P(*mesh_axes)


def _check_divisible(flat, specs: Mapping, sizes: Mapping[str, int]) -> None:
  """Each mesh axis size divides every dimension it splits (each part of a chunked one); else the sizes
  that would divide them all."""
  splits = [(".".join(map(str, path)), dim, axis, variable.shape[dim] // _chunks(variable)[dim],
             variable.get_metadata("out_sharding"))
            for path, variable in flat for dim, axis in enumerate(specs[path]) if axis is not None]
  for where, dim, axis, length, names in splits:
    if length % sizes[axis]:
      common = math.gcd(*(n for _, _, a, n, _ in splits if a == axis))
      valid = [d for d in range(1, common + 1) if common % d == 0]
      raise ValueError(f"param {where}: {axis}={sizes[axis]} does not divide its {names[dim]!r} axis of "
                       f"size {length}; {axis} sizes that divide every axis the rules split over it: "
                       f"{', '.join(map(str, valid))}.")
