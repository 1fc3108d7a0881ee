"""The patch-parallel context's answers equal the full-image computation (synchronous steps),
and displaced steps use the previous step's exchanges while sending this step's."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from models.parallel import SINGLE_DEVICE
from sharding.exchange.groupnorm import GroupNormMode
from sharding.mesh import make_mesh
from sharding.contexts.patch import PatchContext

ROWS = P(None, "patch")


def _conv(x, kernel, stride, row_padding):
  return lax.conv_general_dilated(x, kernel, (stride, stride), (row_padding, (kernel.shape[1] // 2,) * 2),
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _on_patches(n, fn, *args, in_specs=ROWS, out_specs=ROWS):
  mesh = make_mesh(1, 1, n)
  placed = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, in_specs)]
  out = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=tuple(in_specs), out_specs=out_specs))(*placed)
  return jax.tree.map(np.asarray, out)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("k,stride", [(3, 1), (3, 2), (5, 1)])
def test_halo_conv_equals_full_conv(n, k, stride):
  x = jax.random.normal(jax.random.key(0), (2, 48, 7, 3))
  kernel = jax.random.normal(jax.random.key(1), (k, k, 3, 4))
  r = k // 2
  expected = _conv(x, kernel, stride, (r, r))

  def local(x):
    padded, sent = PatchContext(n).conv_halo(x, r, "conv")
    assert sent is None  # a synchronous step that does not record sends nothing on
    return _conv(padded, kernel, stride, (0, 0))

  got = _on_patches(n, local, x, in_specs=[ROWS])
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  # The single-device context is the same computation on the whole image.
  np.testing.assert_allclose(_conv(SINGLE_DEVICE.conv_halo(x, r, "conv")[0], kernel, stride, (0, 0)), expected,
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_patch_attention_equals_full_attention(n):
  q, k, v = jax.random.normal(jax.random.key(2), (3, 2, 64, 3, 8))  # B, T, N, D each
  expected = jax.nn.dot_product_attention(q, k, v)
  tokens = P(None, "patch")

  def local(q, k, v):
    return PatchContext(n).attend(q, k, v, "attn")[0]

  got = _on_patches(n, local, q, k, v, in_specs=[tokens] * 3, out_specs=tokens)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(SINGLE_DEVICE.attend(q, k, v, "attn")[0], expected, rtol=1e-6, atol=1e-6)


def test_token_extent_names_each_devices_rows():
  def local(x):
    start, total = PatchContext(4).token_extent(x.shape[1])
    return jnp.stack([start, total])[None]

  got = _on_patches(4, local, np.zeros((1, 12, 2, 1), np.float32), in_specs=[ROWS], out_specs=P("patch"))
  np.testing.assert_array_equal(got, [[0, 12], [3, 12], [6, 12], [9, 12]])
  assert SINGLE_DEVICE.token_extent(12) == (0, 12)


def _moments(x_bhwc, groups):
  b, h, w, c = x_bhwc.shape
  g = x_bhwc.reshape(b, h, w, groups, c // groups)
  return jnp.stack([g.mean(axis=(1, 2, 4)), (g**2).mean(axis=(1, 2, 4))], axis=-1)  # B, G, 2


@pytest.mark.parametrize("mode", list(GroupNormMode))
def test_synchronous_groupnorm_moments_are_image_wide(mode):
  # SEPARATE included: warm-up steps are exact whatever the mode.
  x = jax.random.normal(jax.random.key(3), (2, 16, 4, 8)) + jnp.arange(16.0)[None, :, None, None]
  expected = _moments(x, 4)

  def local(x):
    return PatchContext(4, mode).norm_moments(_moments(x, 4), "gn")[0][None]

  got = _on_patches(4, local, x, in_specs=[ROWS], out_specs=P("patch"))
  for device_moments in got:  # every device sees the image-wide moments in synchronous steps
    np.testing.assert_allclose(device_moments, expected, rtol=1e-5)


def _displaced_moments(mode, fresh_x, stale_gathered):
  """Runs one displaced GroupNorm request on 4 patches; returns (moments used, sent for the next step)."""

  def local(x, stale):
    used, sent = PatchContext(4, mode, stale={"gn": stale}, records=True).norm_moments(_moments(x, 2), "gn")
    return used[None], (jnp.zeros_like(stale) if sent is None else sent)[None]

  return _on_patches(4, local, fresh_x, stale_gathered, in_specs=[ROWS, P()],
                     out_specs=(P("patch"), P("patch")))


def test_displaced_groupnorm_modes_follow_distrifusion():
  fresh_x = jax.random.normal(jax.random.key(4), (1, 8, 4, 4)) * 2 + 1
  fresh_local = jnp.stack([_moments(x, 2) for x in jnp.split(fresh_x, 4, axis=1)])  # n, B, G, 2
  stale = fresh_local * 0.5 + 0.1  # what each device sent at the previous step

  _, recorded = _displaced_moments(GroupNormMode.STALE, fresh_x, stale)
  for i in range(4):
    np.testing.assert_allclose(recorded[i], fresh_local, rtol=1e-6)  # this step's, for the next

  used, _ = _displaced_moments(GroupNormMode.SEPARATE, fresh_x, stale)
  np.testing.assert_allclose(used, fresh_local, rtol=1e-6)


def test_displaced_groupnorm_moments_by_hand():
  """4 patches, 2 groups, numbers worked out on paper from DistriFusion's definitions.

  Device i's fresh rows: group 0 all i+1 (E[x] = i+1, E[x²] = (i+1)², variance 0); group 1 the
  channels 1 and 3 (E[x] = 2, E[x²] = 5, variance 1). Its stale moments from the previous step:
  group 0 (i, i²+1), group 1 (0, 2i); over the 4 devices they average to (1.5, 4.5) and (0, 3).

  STALE: the mean over devices of the others' stale moments and its own fresh ones:
    group 0 E[x] = (6 − i + (i+1))/4 = 1.75, E[x²] = (18 − (i²+1) + (i+1)²)/4 = 4.5 + i/2;
    group 1 E[x] = (0 − 0 + 2)/4 = 0.5,      E[x²] = (12 − 2i + 5)/4 = 4.25 − i/2.
  CORRECTED_ASYNC: stale image-wide + (own fresh − own stale), then variance = E[x²] − E[x]²,
  replaced by the fresh local variance where negative:
    group 0 E[x] = 1.5 + (i+1) − i = 2.5, E[x²] = 4.5 + 2i + 1 − 1 = 4.5 + 2i: variance
      2i − 1.75 < 0 for i = 0 → E[x²] = 2.5² + 0 = 6.25; so 6.25, 6.5, 8.5, 10.5;
    group 1 E[x] = 0 + 2 − 0 = 2, E[x²] = 3 + 5 − 2i = 8 − 2i: variance 4 − 2i < 0 for i = 3
      → E[x²] = 2² + 1 = 5; so 8, 6, 4, 5.
  """
  x = np.zeros((1, 8, 4, 4), np.float32)  # B, H, W, C: rows 2i, 2i+1 on device i
  for i in range(4):
    x[:, 2 * i:2 * i + 2, :, :2] = i + 1
  x[..., 2], x[..., 3] = 1, 3
  stale = np.array([[[[i, i * i + 1], [0, 2 * i]]] for i in range(4)], np.float32)  # n, B, G, 2
  i = np.arange(4.0)
  expected = {
      GroupNormMode.STALE: [[1.75 + 0 * i, 4.5 + i / 2], [0.5 + 0 * i, 4.25 - i / 2]],
      GroupNormMode.CORRECTED_ASYNC: [[[2.5] * 4, [6.25, 6.5, 8.5, 10.5]], [[2.0] * 4, [8, 6, 4, 5]]],
  }
  for mode, numbers in expected.items():
    used, _ = _displaced_moments(mode, x, stale)  # n, B, G, 2
    np.testing.assert_allclose(used[:, 0], np.transpose(numbers, (2, 0, 1)), rtol=1e-6, err_msg=mode.value)


def test_corrected_async_falls_back_to_local_variance_when_negative():
  fresh_x = jnp.ones((1, 8, 4, 4)) * 3.0  # local variance 0, E[x²] = 9
  stale = jnp.zeros((4, 1, 2, 2))  # stale mean 0 and E[x²] 0 → corrected E[x²] − mean² < 0
  stale = stale.at[..., 1].set(0.0).at[:, :, :, 0].set(-5.0)
  used, _ = _displaced_moments(GroupNormMode.CORRECTED_ASYNC, fresh_x, stale)
  variance = used[..., 1] - used[..., 0] ** 2
  np.testing.assert_allclose(variance, 0.0, atol=1e-4)


def test_displaced_halo_uses_previous_step_and_sends_this_one():
  x = jax.random.normal(jax.random.key(5), (1, 8, 3, 2))
  stale_x = x * 10.0

  def local(x, stale_x):
    _, previous = PatchContext(4, records=True).conv_halo(stale_x, 1, "c")  # "previous step"
    padded, sent = PatchContext(4, stale={"c": previous}, records=True).conv_halo(x, 1, "c")
    fresh_padded, _ = PatchContext(4).conv_halo(x, 1, "c")
    stale_padded, _ = PatchContext(4).conv_halo(stale_x, 1, "c")
    next_step, _ = PatchContext(4, stale={"c": sent}, records=True).conv_halo(x, 1, "c")
    return padded, fresh_padded, stale_padded, next_step

  padded, fresh, stale_p, next_step = _on_patches(4, local, x, stale_x, in_specs=[ROWS, ROWS],
                                                  out_specs=(ROWS,) * 4)
  rows = lambda a: np.split(a, 4, axis=1)
  for used, fr, st, nxt in zip(rows(padded), rows(fresh), rows(stale_p), rows(next_step)):
    np.testing.assert_allclose(used[:, 1:-1], fr[:, 1:-1])          # own rows fresh
    np.testing.assert_allclose(used[:, [0, -1]], st[:, [0, -1]])     # halo from the previous step
    np.testing.assert_allclose(nxt[:, [0, -1]], fr[:, [0, -1]])      # this step's halo sent on


def test_displaced_context_sends_and_needs_its_stale_keys():
  with pytest.raises(ValueError, match="records=True"):
    PatchContext(2, stale={})
  with pytest.raises(ValueError, match="no stale activations for layer 'b'"):
    PatchContext(1, stale={"a": 0}, records=True)._exchanged("b", None, lambda f: f)
