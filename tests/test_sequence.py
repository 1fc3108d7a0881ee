"""Ulysses and ring attention, fp32 on 8 virtual CPU devices: the attention each context answers
equals full attention, `ulysses` and `ring` through `dfjax.sample` equal `single` on a UNet (halo
convs and GroupNorm as exact, self-attention by Ulysses or ring) and on a DiT, and the bytes per
step read from the compiled program equal the strategies' analytic volume."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dfjax.sampling import Conditioning, prepare_sample, sample
from models.config import UNetConfig
from models.dit import DiTConfig, DiTTransformer2DModel
from models.unet import UNet2DConditionModel
from sharding.accounting import analytic, comm
from sharding.axes import PATCH
from sharding.contexts.sequence import RingContext, UlyssesContext
from sharding.mesh import axis_sizes, make_mesh
from sharding.strategies import Guidance, Strategy

TOKENS = P(None, PATCH)

# ---------------------------------------------------------------------------------- attention alone


def _on_patches(n, fn, *args):
  mesh = make_mesh(1, 1, n)
  placed = [jax.device_put(a, NamedSharding(mesh, TOKENS)) for a in args]
  on_mesh = jax.shard_map(fn, mesh=mesh, in_specs=(TOKENS,) * len(args), out_specs=TOKENS)
  return np.asarray(jax.jit(on_mesh)(*placed))


def _qkv(heads):
  q, k, v = jax.random.normal(jax.random.key(2), (3, 2, 64, heads, 8))  # B, T, N, D each
  return 3 * q, k, v  # sharper softmax: the blocks' log-sum-exps differ, the merge must weigh them right


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("context,heads", [(UlyssesContext, 8), (RingContext, 8), (RingContext, 3)],
                         ids=["ulysses", "ring", "ring-3-heads"])
def test_sequence_attention_equals_full_attention(n, context, heads):
  q, k, v = _qkv(heads)
  expected = jax.nn.dot_product_attention(q, k, v)  # every token on one device
  got = _on_patches(n, lambda q, k, v: context(n).attend(q, k, v, "attn")[0], q, k, v)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_ulysses_names_the_head_counts_that_fit():
  q, k, v = _qkv(6)
  with pytest.raises(ValueError, match=r"6 attention heads of layer 'attn' over patch=8 .* \[1, 2, 3, 6\]"):
    _on_patches(8, lambda q, k, v: UlyssesContext(8).attend(q, k, v, "attn")[0], q, k, v)


def test_sequence_contexts_refuse_stale_state():
  with pytest.raises(ValueError, match="RingContext is synchronous"):
    RingContext(2, stale={}, records=True)


# ---------------------------------------------------------------------------------- through dfjax.sample

HEIGHT, WIDTH, STEPS = 48, 8, 3
TWO_LEVEL_UNET = {  # halo convs (the strided one too), GroupNorm, self- and cross-attention, 4 heads
    "block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8, "attention_head_dim": 4,
    "cross_attention_dim": 32, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
}
# Counted by hand for this UNet: self-attention in the transformers of the down block, the mid block
# and the up block (two); 20 convs 3×3 (conv_in, 2 per resnet × 8, down- and upsampler, conv_out),
# 2 permutes each.
SELF_ATTENTIONS, HALO_PERMUTES = 4, 2 * 20
SD_SCHEDULER = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}


@pytest.fixture(scope="module")
def model():
  return UNet2DConditionModel(UNetConfig.from_diffusers_config(TWO_LEVEL_UNET), rngs=nnx.Rngs(0))


def _sample_args(model, mesh, strategy):
  keys = jax.random.split(jax.random.key(1), 3)
  noise = jax.random.normal(keys[0], (1, HEIGHT, WIDTH, model.config.in_channels))
  cond, uncond = (Conditioning(jax.random.normal(key, (1, 5, model.config.encoder_dim))) for key in keys[1:])
  return _with_options(model, noise, cond, uncond, mesh, strategy)


def _with_options(model, noise, cond, uncond, mesh, strategy):
  return (model, noise, cond), dict(uncond=uncond, num_steps=STEPS, mesh=mesh, strategy=strategy,
                                    scheduler_config=SD_SCHEDULER)


def _compiled_run(args, kwargs):
  """(latents, per-step traffic of the one scan phase) from one compile of the sampling program."""
  program = prepare_sample(*args, **kwargs)
  compiled = program.lowered.compile()
  (traffic,) = comm.traffic_per_step(compiled.as_text())
  return np.asarray(program.latents(compiled(*program.inputs))), traffic.by_kind


def _relative_error(a, b):
  return np.abs(a - b).max() / np.abs(b).max()


@pytest.fixture(scope="module")
def single(model):
  args, kwargs = _sample_args(model, None, Strategy.single())
  return np.asarray(sample(*args, **kwargs))


@pytest.mark.parametrize("cfg,patch", [(1, 2), (1, 4), (2, 2)])
@pytest.mark.parametrize("name", ["ulysses", "ring"])
def test_sequence_strategy_equals_single_and_moves_its_analytic_bytes(model, single, name, cfg, patch):
  mesh, strategy = make_mesh(1, cfg, patch), Strategy.from_name(name)
  got, kinds = _compiled_run(*_sample_args(model, mesh, strategy))
  assert _relative_error(got, single) <= 1e-5

  sizes, batch = axis_sizes(mesh), 2 // cfg  # each device runs its share of the guidance pair
  expected = strategy.expected_traffic(model.config, HEIGHT, WIDTH, sizes, batch, activation_bytes=4)
  prediction_values = HEIGHT // patch * WIDTH * model.config.out_channels  # the other half's, over cfg
  guidance = Guidance.for_mesh(True, sizes).expected_traffic(prediction_values, 4).get("guidance", 0)
  assert kinds["all-gather"][1] == expected["moments"] + guidance  # no K/V is gathered
  if name == "ulysses":
    assert set(kinds) == {"collective-permute", "all-gather", "all-to-all"}
    assert kinds["all-to-all"] == (4 * SELF_ATTENTIONS, expected["alltoall"])  # q, k, v and the output
    assert kinds["collective-permute"] == (HALO_PERMUTES, expected["halo"] + expected["input_halo"])
  else:
    assert set(kinds) == {"collective-permute", "all-gather"}
    permutes = HALO_PERMUTES + (patch - 1) * SELF_ATTENTIONS  # n−1 K/V blocks per self-attention
    permuted = expected["halo"] + expected["input_halo"] + expected["ring"]
    assert kinds["collective-permute"] == (permutes, permuted)
  if cfg == 1:  # what `bench simulate` charges latency for: every collective of the step
    assert analytic.collectives_per_step(model.config, expected, patch) == sum(n for n, _ in kinds.values())


def test_ulysses_refuses_a_patch_count_that_does_not_divide_the_heads(model):
  args, kwargs = _sample_args(model, make_mesh(1, 1, 8), Strategy.ulysses())
  with pytest.raises(ValueError, match=r"patch=8 does not divide the 4 heads of 'down_blocks.1.attentions.0.*"
                                       r"valid patch counts at latent height 48: \[1, 2, 4\]; or use ring"):
    sample(*args, **kwargs)


# ---------------------------------------------------------------------------- a DiT: pure sequence methods

TINY_DIT = dict(num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                sample_size=8, patch_size=2)
DIT_HEIGHT = 16  # latent rows: 8 token rows, whole for 2 and 4 patches


@pytest.fixture(scope="module")
def dit():
  return DiTTransformer2DModel(DiTConfig.from_diffusers_config(TINY_DIT), rngs=nnx.Rngs(0))


def _dit_args(dit, mesh, strategy):
  noise = jax.random.normal(jax.random.key(3), (1, DIT_HEIGHT, WIDTH, dit.config.in_channels))
  cond = Conditioning(class_labels=np.array([3]))
  uncond = Conditioning(class_labels=np.array([dit.config.null_class]))  # DiT's unconditional class
  return _with_options(dit, noise, cond, uncond, mesh, strategy)


@pytest.fixture(scope="module")
def dit_single(dit):
  args, kwargs = _dit_args(dit, None, Strategy.single())
  return np.asarray(sample(*args, **kwargs))


@pytest.mark.parametrize("patch", [2, 4])
@pytest.mark.parametrize("name", ["ulysses", "ring"])
def test_sequence_strategy_on_a_dit_equals_single_and_moves_only_attention_bytes(dit, dit_single, name,
                                                                                  patch):
  mesh, strategy = make_mesh(1, 1, patch), Strategy.from_name(name)
  got, kinds = _compiled_run(*_dit_args(dit, mesh, strategy))
  assert _relative_error(got, dit_single) <= 1e-5

  expected = strategy.expected_traffic(dit.config, DIT_HEIGHT, WIDTH, axis_sizes(mesh), 2, activation_bytes=4)
  layers = TINY_DIT["num_layers"]  # one self-attention per block, and nothing else exchanges
  if name == "ulysses":
    assert kinds == {"all-to-all": (4 * layers, expected["alltoall"])}
  else:
    assert kinds == {"collective-permute": ((patch - 1) * layers, expected["ring"])}
  assert sum(expected.values()) == sum(size for _, size in kinds.values())
