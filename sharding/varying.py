"""Values marked as varying over the mesh axes another value varies over (shard_map's type system).

Inside `shard_map`, every value's type records the mesh axes it may differ along. A scan carry or
the two branches of a `lax.cond` must agree, but fresh zeros or constants start invariant.
"""

import jax
from jax import lax


def varying_like(value: jax.Array, like) -> jax.Array:
  """`value` marked as varying over the mesh axes `like` (an array or ShapeDtypeStruct) varies over."""
  manual = like.manual_axis_type if isinstance(like, jax.ShapeDtypeStruct) else jax.typeof(like).manual_axis_type
  varying = tuple(manual.varying) if manual else ()
  return lax.pcast(value, varying, to="varying") if varying else value
