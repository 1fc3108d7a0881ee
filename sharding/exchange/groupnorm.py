"""GroupNorm moments across row patches: E[x] and E[x²] per (sample, group).

Patches have equal sizes, so the image-wide moments are the mean over devices of the local ones.
Modes for steps that use stale statistics (DistriFusion):
  SYNC             exact every step: the collective's result is used at once.
  STALE            other devices' moments from the previous step, this device's fresh.
  CORRECTED_ASYNC  the stale image-wide mean plus this device's fresh-minus-stale moments, added
                   undivided as DistriFusion's authors do (the device's own change stands in for
                   every device's); where the variance this implies is negative, the fresh
                   local variance is used. Unlike the authors' code, no N/(N−1) scaling:
                   single-device GroupNorm has none, and `sync` must equal one device.
  SEPARATE         local moments only, no communication.
"""

import enum

import jax
import jax.numpy as jnp
from jax import lax


class GroupNormMode(enum.Enum):
  SYNC = "sync"
  STALE = "stale"
  CORRECTED_ASYNC = "corrected_async"
  SEPARATE = "separate"

  @classmethod
  def parse(cls, value: "GroupNormMode | str") -> "GroupNormMode":
    if isinstance(value, cls):
      return value
    try:
      return cls(value)
    except ValueError:
      valid = ", ".join(repr(m.value) for m in cls)
      raise ValueError(f"unknown GroupNorm mode {value!r}; valid modes: {valid}.") from None


def exchange(moments_bg2: jax.Array, axis: str) -> jax.Array:
  """Every device's moments: (B, G, 2) → (n, B, G, 2)."""
  return lax.all_gather(moments_bg2, axis)


def combine(gathered_nbg2: jax.Array, fresh_bg2: jax.Array, axis: str, mode: GroupNormMode) -> jax.Array:
  """Image-wide moments from gathered (possibly stale) per-device moments and fresh local ones."""
  own = lax.axis_index(axis)
  match mode:
    case GroupNormMode.SYNC | GroupNormMode.STALE:
      return lax.dynamic_update_index_in_dim(gathered_nbg2, fresh_bg2, own, axis=0).mean(axis=0)
    case GroupNormMode.CORRECTED_ASYNC:
      stale_own = lax.dynamic_index_in_dim(gathered_nbg2, own, axis=0, keepdims=False)
      corrected = gathered_nbg2.mean(axis=0) + (fresh_bg2 - stale_own)  # B, G, 2
      mean = corrected[..., 0]
      variance = corrected[..., 1] - mean**2
      local_variance = fresh_bg2[..., 1] - fresh_bg2[..., 0] ** 2
      second = jnp.where(variance < 0, mean**2 + local_variance, corrected[..., 1])
      return jnp.stack([mean, second], axis=-1)  # B, G, 2
    case GroupNormMode.SEPARATE:
      return fresh_bg2
    case _:
      raise ValueError(f"unknown GroupNorm mode {mode!r}; valid: {[m.value for m in GroupNormMode]}")
