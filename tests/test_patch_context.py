"""The patch-parallel context's answers equal the full-image computation (synchronous steps),
and displaced steps use the previous step's exchanges while recording this step's."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sharding.context import SINGLE_DEVICE
from sharding.groupnorm import GroupNormMode
from sharding.mesh import make_mesh
from sharding.patch_context import PatchContext

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
    padded = PatchContext("patch", n).halo_rows(x, r, "conv")
    return _conv(padded, kernel, stride, (0, 0))

  got = _on_patches(n, local, x, in_specs=[ROWS])
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  # The single-device context is the same computation on the whole image.
  np.testing.assert_allclose(_conv(SINGLE_DEVICE.halo_rows(x, r, "conv"), kernel, stride, (0, 0)), expected,
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_gathered_kv_attention_equals_full_attention(n):
  q, k, v = jax.random.normal(jax.random.key(2), (3, 2, 64, 8))
  expected = jax.nn.dot_product_attention(q[:, :, None], k[:, :, None], v[:, :, None])[:, :, 0]
  tokens = P(None, "patch")

  def local(q, k, v):
    k_all, v_all = PatchContext("patch", n).attention_kv(k, v, "attn")
    return jax.nn.dot_product_attention(q[:, :, None], k_all[:, :, None], v_all[:, :, None])[:, :, 0]

  got = _on_patches(n, local, q, k, v, in_specs=[tokens] * 3, out_specs=tokens)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


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
    return PatchContext("patch", 4, mode).group_norm_moments(_moments(x, 4), "gn")[None]

  got = _on_patches(4, local, x, in_specs=[ROWS], out_specs=P("patch"))
  for device_moments in got:  # every device sees the image-wide moments in synchronous steps
    np.testing.assert_allclose(device_moments, expected, rtol=1e-5)


def _displaced_moments(mode, fresh_x, stale_gathered):
  """Runs one displaced GroupNorm request on 4 patches; returns (moments used, recorded)."""

  def local(x, stale):
    record = {}
    ctx = PatchContext("patch", 4, mode, stale={"gn": stale}, record=record)
    used = ctx.group_norm_moments(_moments(x, 2), "gn")
    return used[None], record.get("gn", jnp.zeros_like(stale))[None]

  return _on_patches(4, local, fresh_x, stale_gathered, in_specs=[ROWS, P()],
                     out_specs=(P("patch"), P("patch")))


def test_displaced_groupnorm_modes_follow_distrifusion():
  fresh_x = jax.random.normal(jax.random.key(4), (1, 8, 4, 4)) * 2 + 1
  fresh_local = jnp.stack([_moments(x, 2) for x in jnp.split(fresh_x, 4, axis=1)])  # n, B, G, 2
  stale = fresh_local * 0.5 + 0.1  # what each device sent at the previous step

  used, recorded = _displaced_moments(GroupNormMode.STALE, fresh_x, stale)
  for i in range(4):
    expected = stale.at[i].set(fresh_local[i]).mean(axis=0)
    np.testing.assert_allclose(used[i], expected, rtol=1e-6)
    np.testing.assert_allclose(recorded[i], fresh_local, rtol=1e-6)  # this step's, for the next

  used, _ = _displaced_moments(GroupNormMode.CORRECTED_ASYNC, fresh_x, stale)
  for i in range(4):
    corrected = stale.mean(axis=0) + fresh_local[i] - stale[i]
    variance = corrected[..., 1] - corrected[..., 0] ** 2
    local_variance = fresh_local[i][..., 1] - fresh_local[i][..., 0] ** 2
    expected_variance = jnp.where(variance < 0, local_variance, variance)
    got_variance = used[i][..., 1] - used[i][..., 0] ** 2
    np.testing.assert_allclose(used[i][..., 0], corrected[..., 0], rtol=1e-5)
    np.testing.assert_allclose(got_variance, expected_variance, rtol=1e-4, atol=1e-5)

  used, _ = _displaced_moments(GroupNormMode.SEPARATE, fresh_x, stale)
  np.testing.assert_allclose(used, fresh_local, rtol=1e-6)


def test_corrected_async_falls_back_to_local_variance_when_negative():
  fresh_x = jnp.ones((1, 8, 4, 4)) * 3.0  # local variance 0, E[x²] = 9
  stale = jnp.zeros((4, 1, 2, 2))  # stale mean 0 and E[x²] 0 → corrected E[x²] − mean² < 0
  stale = stale.at[..., 1].set(0.0).at[:, :, :, 0].set(-5.0)
  used, _ = _displaced_moments(GroupNormMode.CORRECTED_ASYNC, fresh_x, stale)
  variance = used[..., 1] - used[..., 0] ** 2
  np.testing.assert_allclose(variance, 0.0, atol=1e-4)


def test_displaced_halo_uses_previous_step_and_records_this_one():
  x = jax.random.normal(jax.random.key(5), (1, 8, 3, 2))
  stale_x = x * 10.0

  def local(x, stale_x):
    sync_record = {}
    PatchContext("patch", 4, record=sync_record).halo_rows(stale_x, 1, "c")  # "previous step"
    record = {}
    padded = PatchContext("patch", 4, stale=sync_record, record=record).halo_rows(x, 1, "c")
    fresh_padded = PatchContext("patch", 4).halo_rows(x, 1, "c")
    stale_padded = PatchContext("patch", 4).halo_rows(stale_x, 1, "c")
    return padded, fresh_padded, stale_padded, PatchContext("patch", 4, stale=record, record={}).halo_rows(x, 1, "c")

  padded, fresh, stale_p, next_step = _on_patches(4, local, x, stale_x, in_specs=[ROWS, ROWS],
                                                  out_specs=(ROWS,) * 4)
  rows = lambda a: np.split(a, 4, axis=1)
  for used, fr, st, nxt in zip(rows(padded), rows(fresh), rows(stale_p), rows(next_step)):
    np.testing.assert_allclose(used[:, 1:-1], fr[:, 1:-1])          # own rows fresh
    np.testing.assert_allclose(used[:, [0, -1]], st[:, [0, -1]])     # halo from the previous step
    np.testing.assert_allclose(nxt[:, [0, -1]], fr[:, [0, -1]])      # this step's halo recorded


def test_displaced_context_needs_record_and_unique_keys():
  with pytest.raises(ValueError, match="needs `record`"):
    PatchContext("patch", 2, stale={})
  ctx = PatchContext("patch", 1, record={"a": 0})
  with pytest.raises(ValueError, match="used twice"):
    ctx._exchanged("a", None, lambda f: f)
