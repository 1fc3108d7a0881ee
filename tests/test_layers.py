"""Layers that need other rows get them from the parallel context: a row patch given its halo rows
(or the image-wide GroupNorm moments) by a hand-written context equals the full-image layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.layers import Conv2d, GroupNorm, timestep_embedding
from models.parallel import ParallelContext


class RowPatch(ParallelContext):
  """Patch `index` of `count` equal row patches, its halo cut from the full-image input."""

  def __init__(self, full_bhwc: jax.Array, index: int, count: int):
    self.full, self.index, self.count = full_bhwc, index, count
    self.requests = []

  def conv_halo(self, x_bhwc, rows, key):
    self.requests.append((key, rows))
    h = x_bhwc.shape[1]
    padded = jnp.pad(self.full, ((0, 0), (rows, rows), (0, 0), (0, 0)))  # B, H+2r, W, C
    return padded[:, self.index * h:self.index * h + h + 2 * rows], None  # B, h+2r, W, C


def patches(x_bhwc, count):
  return jnp.split(x_bhwc, count, axis=1)


@pytest.mark.parametrize("kernel_size,stride,count", [(3, 1, 4), (3, 2, 2), (5, 1, 2), (1, 1, 2)])
def test_conv_with_halo_rows_equals_full_conv(kernel_size, stride, count):
  rng = np.random.default_rng(0)
  conv = nnx.eval_shape(lambda: Conv2d(3, 5, kernel_size, stride=stride, rngs=nnx.Rngs(0)))
  conv.kernel.set_value(rng.normal(size=(kernel_size, kernel_size, 3, 5)).astype(np.float32))
  conv.bias.set_value(np.arange(5.0, dtype=np.float32))
  conv.ctx_key = "down_blocks.0.conv"
  x = rng.normal(size=(2, 8, 6, 3)).astype(np.float32)
  contexts = []

  @jax.jit  # one compile instead of one per op
  def run(x):
    reference = jax.lax.conv_general_dilated(  # torch's Conv2d(padding=k//2), in NHWC
        x, conv.kernel[...], (stride, stride), [(kernel_size // 2,) * 2] * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC")) + conv.bias[...]
    contexts[:] = [RowPatch(x, i, count) for i in range(count)]
    stitched = jnp.concatenate([conv(p, ctx=c) for p, c in zip(patches(x, count), contexts)], 1)
    return conv(x), reference, stitched

  full, reference, stitched = run(x)
  np.testing.assert_allclose(full, reference, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(stitched, full, rtol=1e-6, atol=1e-6)
  expected = [("down_blocks.0.conv", kernel_size // 2)] if kernel_size > 1 else []
  assert all(c.requests == expected for c in contexts)


class MomentsOf(ParallelContext):
  """Records each patch's local moments, or answers with the mean of recorded ones."""

  def __init__(self, recorded=None):
    self.recorded = [] if recorded is None else recorded

  def norm_moments(self, moments_bg2, key):
    if isinstance(self.recorded, list):
      self.recorded.append(moments_bg2)
      return moments_bg2, None
    return self.recorded, None


def test_group_norm_with_image_wide_moments_equals_full_group_norm():
  import torch

  norm = nnx.eval_shape(lambda: GroupNorm(4, 8, epsilon=1e-5, rngs=nnx.Rngs(0)))
  norm.scale.set_value(np.linspace(0.5, 2.0, 8, dtype=np.float32))
  norm.bias.set_value(np.linspace(-1.0, 1.0, 8, dtype=np.float32))
  x = 3.0 + np.random.default_rng(0).normal(size=(2, 8, 6, 8)).astype(np.float32)
  full = jax.jit(norm)(x)
  torch_norm = torch.nn.GroupNorm(4, 8, eps=1e-5)
  with torch.no_grad():
    torch_norm.weight.copy_(torch.tensor(np.asarray(norm.scale[...])))
    torch_norm.bias.copy_(torch.tensor(np.asarray(norm.bias[...])))
    reference = torch_norm(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
  np.testing.assert_allclose(full, reference.numpy(), rtol=1e-5, atol=1e-5)

  @jax.jit
  def stitched(x):
    recorder = MomentsOf()
    for p in patches(x, 4):
      norm(p, ctx=recorder)
    assert recorder.recorded[0].shape == (2, 4, 2)  # (B, G, [E[x], E[x²]])
    image_wide = MomentsOf(jnp.mean(jnp.stack(recorder.recorded), axis=0))
    return jnp.concatenate([norm(p, ctx=image_wide) for p in patches(x, 4)], axis=1)

  np.testing.assert_allclose(stitched(x), full, rtol=1e-5, atol=1e-5)


def test_timestep_embedding_matches_diffusers():
  import torch
  from diffusers.models.embeddings import get_timestep_embedding

  t = np.array([0, 1, 37.5, 999, 1024], np.float32)
  for dim, flip, shift in [(32, True, 0), (33, False, 1)]:
    ours = timestep_embedding(jnp.asarray(t), dim, flip_sin_to_cos=flip, freq_shift=shift)
    theirs = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip,
                                    downscale_freq_shift=shift)
    # fp32 angles near t=1000 are only resolved to ~1e-4 (ulp(1024) = 2^-13), in both libraries.
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-4)
