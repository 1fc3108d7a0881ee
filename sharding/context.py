"""Parallel context: how the few layers that need other devices' data get it.

Model code never names a mesh axis. The layers that need data beyond their own rows (a k×k conv's
halo rows, self-attention's K/V of all tokens, GroupNorm's image-wide moments) ask the context
passed to the model at call time. This base class is the single-device context: the whole image
is local, so every request is answered from local data. Strategies (exact, displaced, naive…)
are subclasses that answer the same requests with collectives, stale values or nothing.

Every request carries `key`, the calling layer's path in the module tree ("down_blocks.0.
resnets.1.conv1"): it names the layer's slot in the stale-activation carry of displaced methods.

Shape letters: B batch, H rows, W columns, C channels, T tokens, G groups.
"""

import jax
import jax.numpy as jnp


class ParallelContext:
  """Single device: the layer's input already is the whole image."""

  def halo_rows(self, x_bhwc: jax.Array, rows: int, key: str) -> jax.Array:
    """Returns x with `rows` rows above and below: the neighbours' rows, zeros at image edges.

    A k×k conv (k = 2·rows + 1, any stride) run with VALID row padding on the result gives the
    rows this device owns of the full-image conv with `rows` zero padding.
    """
    del key
    return jnp.pad(x_bhwc, ((0, 0), (rows, rows), (0, 0), (0, 0)))  # B, H+2r, W, C

  def attention_kv(self, k_btc: jax.Array, v_btc: jax.Array, key: str) -> tuple[jax.Array, jax.Array]:
    """Returns the keys and values of every token of the image, in row-major token order."""
    del key
    return k_btc, v_btc

  def group_norm_moments(self, moments_bg2: jax.Array, key: str) -> jax.Array:
    """Image-wide GroupNorm moments from this device's ones.

    Args:
      moments_bg2: [..., 0] = E[x], [..., 1] = E[x²] over this device's rows of each group, fp32.
    Returns:
      The same two moments over the whole image, same shape.
    """
    del key
    return moments_bg2


SINGLE_DEVICE = ParallelContext()
