"""The context protocol's exchanges leave the model call as data, so the model runs under JAX and
NNX transforms: a displaced UNet step gives the same output and the same sent exchanges plainly,
under `jax.checkpoint`, under `nnx.remat`, and a stack of transformer blocks under `nnx.scan`
equals the same blocks called one by one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from models.attention import BasicTransformerBlock
from models.config import UNetConfig
from models.layers import assign_ctx_keys
from models.parallel import ParallelContext, call_recording, keep_for_next_step
from models.unet import UNet2DConditionModel
from sharding.axes import PATCH
from sharding.contexts.patch import PatchContext
from sharding.exchange.groupnorm import GroupNormMode
from sharding.mesh import make_mesh

PATCHES = 2
TWO_LEVEL_UNET = {
    "block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8, "attention_head_dim": 2,
    "cross_attention_dim": 16, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
}
ROWS = P(None, PATCH)


def _on_patches(fn, *args, in_specs, out_specs):
  mesh = make_mesh(1, 1, PATCHES)
  placed = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, in_specs)]
  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=tuple(in_specs), out_specs=out_specs))(*placed)


def _per_device(tree):
  """Each device's exchanges on a leading axis (they differ between devices)."""
  return jax.tree.map(lambda a: a[None], tree)


@pytest.mark.slow  # 22 s
def test_displaced_unet_step_is_the_same_plainly_under_checkpoint_and_remat():
  model = UNet2DConditionModel(UNetConfig.from_diffusers_config(TWO_LEVEL_UNET), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  keys = jax.random.split(jax.random.key(0), 3)
  x_prev = jax.random.normal(keys[0], (1, 16, 8, 4))
  x = x_prev + 0.1 * jax.random.normal(keys[1], x_prev.shape)
  text = jax.random.normal(keys[2], (1, 5, 16))

  def on_device(params, x_prev, x, text):
    def step(params, x, stale):
      ctx = PatchContext(PATCHES, GroupNormMode.CORRECTED_ASYNC, stale, records=True)
      return call_recording(nnx.merge(graphdef, params), x, 10, text, ctx=ctx)

    _, stale = call_recording(nnx.merge(graphdef, params), x_prev, 20, text,
                              ctx=PatchContext(PATCHES, GroupNormMode.CORRECTED_ASYNC, records=True))
    plain = step(params, x, stale)
    checkpointed = jax.checkpoint(step)(params, x, stale)
    model = nnx.merge(graphdef, params)
    ctx = PatchContext(PATCHES, GroupNormMode.CORRECTED_ASYNC, stale, records=True)
    remat = nnx.remat(lambda m, x: call_recording(m, x, 10, text, ctx=ctx))(model, x)
    return _per_device((plain, checkpointed, remat))

  runs = _on_patches(on_device, params, x_prev, x, text, in_specs=(P(), ROWS, ROWS, P()), out_specs=P(PATCH))
  (plain_out, plain_sent), *transformed = runs
  assert len(plain_sent) > 20  # every halo conv, GroupNorm and self-attention sent something
  for out, sent in transformed:
    np.testing.assert_allclose(out, plain_out, rtol=1e-6, atol=1e-6)
    assert sent.keys() == plain_sent.keys()
    for key in plain_sent:
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), sent[key], plain_sent[key])


def test_stacked_blocks_under_nnx_scan_equal_the_blocks_one_by_one():
  depth, dim, heads = 3, 16, 2

  @nnx.vmap(in_axes=0, out_axes=0)
  def stacked(key):
    block = BasicTransformerBlock(dim, heads, dim // heads, context_dim=8, upcast=False, rngs=nnx.Rngs(key))
    assign_ctx_keys(block)
    return block

  blocks = stacked(jax.random.split(jax.random.key(1), depth))
  graphdef, params = nnx.split(blocks)
  keys = jax.random.split(jax.random.key(2), 3)
  tokens = jax.random.normal(keys[0], (1, 8, dim))  # B, T, C (row-major tokens, split over patches)
  text = jax.random.normal(keys[1], (1, 4, 8))
  stale_kv = jax.random.normal(keys[2], (depth, 2, 1, PATCHES, 4, heads, dim // heads))  # per block: 2, B, n, T, N, D

  def on_device(params, tokens, text, stale_kv):
    def block_step(block, h, stale):
      ctx = PatchContext(PATCHES, stale={"attn1": stale}, records=True)
      out, sent = call_recording(block, h, text, ctx=ctx)
      return out, sent["attn1"]

    scanned = nnx.scan(block_step, in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0))
    scan_out, scan_sent = scanned(nnx.merge(graphdef, params), tokens, stale_kv)
    h, loop_sent = tokens, []
    for i in range(depth):
      block = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], params))
      h, sent = block_step(block, h, stale_kv[i])
      loop_sent.append(sent)
    return _per_device((scan_out, scan_sent, h, jnp.stack(loop_sent)))

  specs = (P(), P(None, PATCH), P(), P())
  scan_out, scan_sent, loop_out, loop_sent = _on_patches(on_device, params, tokens, text, stale_kv, in_specs=specs,
                                                         out_specs=P(PATCH))
  np.testing.assert_allclose(scan_out, loop_out, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(scan_sent, loop_sent, rtol=1e-6, atol=1e-6)
  assert scan_sent.shape == (PATCHES, depth, 2, 1, PATCHES, 4, heads, dim // heads)


def test_a_layer_that_exchanges_twice_in_one_call_is_refused():
  class Twice(nnx.Module):
    def __call__(self, x, ctx):
      for _ in range(2):
        x, sent = ctx.norm_moments(x, "twice")
        keep_for_next_step(self, sent)
      return x

  class Sends(ParallelContext):
    def norm_moments(self, moments, key):
      return moments, moments

  with pytest.raises(ValueError, match="exchanged twice in one model call"):
    call_recording(Twice(), jnp.ones((1, 2, 2)), Sends())
