"""Values marked as varying over the mesh axes another value varies over (shard_map's type system).

Inside `shard_map`, every value's type records the mesh axes it may differ along. A scan carry or
the two branches of a `lax.cond` must agree, but fresh zeros or constants start invariant.
"""

import jax
from jax import lax

from sharding.axes import MESH_AXES


def varying_like(value: jax.Array, like) -> jax.Array:
  """`value` marked as varying over the mesh axes `like` (an array or ShapeDtypeStruct) varies over."""
  varying = tuple(axis for axis in MESH_AXES if axis in axes_varying(like))
  return lax.pcast(value, varying, to="varying") if varying else value


def axes_varying(value) -> frozenset[str]:
  """The mesh axes `value` (an array or ShapeDtypeStruct) varies over."""
  manual = value.manual_axis_type if isinstance(value, jax.ShapeDtypeStruct) else jax.typeof(value).manual_axis_type
  return frozenset(manual.varying) if manual else frozenset()


def varying_over(tree, axes=MESH_AXES):
  """Every leaf of `tree` marked as varying over `axes` too (by default every mesh axis).

  For state whose leaves differ by stage in some steps and not in others (pipelines): one type
  for every scan carry and branch output, whatever each step computed it from.
  """

  def widen(value):
    missing = tuple(axis for axis in MESH_AXES if axis in axes and axis not in axes_varying(value))
    return lax.pcast(value, missing, to="varying") if missing else value

  return jax.tree.map(widen, tree)
