"""Classifier-free guidance across the `cfg` axis.

The conditional and unconditional halves of the batch form a leading "pair" axis of size 2,
split over mesh axis `cfg` (size 1 or 2). After the model call each device holds its share of
the pair; one all-gather per step gives every device both noise predictions.
"""

import jax
from jax import lax

CFG_AXIS = "cfg"


def gather_pair(eps_pbhwc: jax.Array) -> jax.Array:
  """(2/cfg, B, h, W, C) local share of the (uncond, cond) predictions → (2, B, h, W, C)."""
  # Invariant over `cfg`: both groups then hold, and update, the same latents.
  return lax.all_gather(eps_pbhwc, CFG_AXIS, axis=0, tiled=True, to="invarying")


def guide(eps_pair_2bhwc: jax.Array, guidance_scale: jax.Array) -> jax.Array:
  """uncond + s·(cond − uncond)."""
  uncond, cond = eps_pair_2bhwc[0], eps_pair_2bhwc[1]
  return uncond + guidance_scale * (cond - uncond)  # B, h, W, C
