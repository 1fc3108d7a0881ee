"""Conv halo rows: a k×k conv on a row patch needs k//2 rows from each neighbour.

Device i's bottom rows become device i+1's top halo and its top rows device i−1's bottom halo;
the first and last devices receive nothing, which `ppermute` fills with zeros — exactly the
conv's zero padding at the image edges.
"""

import jax
import jax.numpy as jnp
from jax import lax

Halo = tuple[jax.Array, jax.Array]  # (rows from the device above, rows from the device below)


def edge_rows(x_bhwc: jax.Array, rows: int) -> Halo:
  """The rows this device sends: its top and bottom `rows` rows."""
  if x_bhwc.shape[1] < rows:
    raise ValueError(
        f"a patch of {x_bhwc.shape[1]} rows cannot supply a halo of {rows} rows: use fewer "
        "patches so that every device keeps at least as many rows as the widest conv needs.")
  return x_bhwc[:, :rows], x_bhwc[:, -rows:]  # B, r, W, C each


def exchange(edges: Halo, axis: str, num_patches: int) -> Halo:
  """Sends every device's edge rows to its neighbours; returns (from above, from below)."""
  top, bottom = edges
  down = [(i, i + 1) for i in range(num_patches - 1)]
  up = [(i + 1, i) for i in range(num_patches - 1)]
  return lax.ppermute(bottom, axis, down), lax.ppermute(top, axis, up)


def attach(x_bhwc: jax.Array, halo: Halo) -> jax.Array:
  """x with the received halo rows above and below."""
  from_above, from_below = halo
  return jnp.concatenate([from_above, x_bhwc, from_below], axis=1)  # B, h+2r, W, C
