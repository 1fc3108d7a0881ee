"""Ulysses, ring and USP attention, fp32 on 8 virtual CPU devices: the attention each context answers
equals full attention, `ulysses`, `ring` and `usp` through `dfjax.sample` equal `single` on a UNet
(halo convs and GroupNorm as exact, self-attention by Ulysses, ring or both), on a DiT and on a
PixArt (with guidance split over `cfg` too), and the bytes per step read from the compiled program
equal the strategies' analytic volume (`exact`'s K/V all-gather included)."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dfjax.sampling import Conditioning, prepare_sample, sample
from models.config import UNetConfig
from models.dit import DiTConfig, DiTTransformer2DModel, PixArtConfig, PixArtTransformer2DModel
from models.unet import UNet2DConditionModel
from sharding.accounting import analytic, comm
from sharding.axes import PATCH, SEQUENCE
from sharding.contexts.sequence import RingContext, UlyssesContext, UspContext
from sharding.mesh import axis_sizes, make_mesh
from sharding.strategies import Guidance, Strategy

# ---------------------------------------------------------------------------------- attention alone


def _on_patches(n, fn, *args, ulysses=1):
  """fn over tokens split into n blocks: over `patch`, or over (patch, ulysses) with n / ulysses × ulysses."""
  mesh = make_mesh(1, 1, n // ulysses, ulysses=ulysses)
  tokens = P(None, SEQUENCE)
  placed = [jax.device_put(a, NamedSharding(mesh, tokens)) for a in args]
  on_mesh = jax.shard_map(fn, mesh=mesh, in_specs=(tokens,) * len(args), out_specs=tokens)
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


@pytest.mark.parametrize("ring,ulysses", [(2, 2), (2, 4), pytest.param(4, 2, marks=pytest.mark.slow)])
def test_usp_attention_equals_full_attention(ring, ulysses):
  q, k, v = _qkv(8)
  expected = jax.nn.dot_product_attention(q, k, v)
  n = ring * ulysses
  got = _on_patches(n, lambda q, k, v: UspContext(n, ulysses=ulysses).attend(q, k, v, "attn")[0], q, k, v,
                    ulysses=ulysses)
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


UNET_RUNS = {  # id: (strategy, cfg, patch, ulysses)
    "ulysses-2": ("ulysses", 1, 2, 1), "ulysses-4": ("ulysses", 1, 4, 1), "cfg2-ulysses-2": ("ulysses", 2, 2, 1),
    "ring-2": ("ring", 1, 2, 1), "ring-4": ("ring", 1, 4, 1), "cfg2-ring-2": ("ring", 2, 2, 1),
    **{name: pytest.param(*run, marks=pytest.mark.slow) for name, run in {  # usp: the transformers' default cases
        "usp-2x2": ("usp", 1, 2, 2), "cfg2-usp-2x2": ("usp", 2, 2, 2)}.items()}}


@pytest.mark.parametrize("name,cfg,patch,ulysses", UNET_RUNS.values(), ids=UNET_RUNS.keys())
def test_sequence_strategy_equals_single_and_moves_its_analytic_bytes(model, single, name, cfg, patch, ulysses):
  mesh, strategy = make_mesh(1, cfg, patch, ulysses=ulysses), Strategy.from_name(name)
  got, kinds = _compiled_run(*_sample_args(model, mesh, strategy))
  assert _relative_error(got, single) <= 1e-5

  sizes, batch = axis_sizes(mesh), 2 // cfg  # each device runs its share of the guidance pair
  expected = strategy.expected_traffic(model.config, HEIGHT, WIDTH, sizes, batch, activation_bytes=4)
  prediction_values = HEIGHT // (patch * ulysses) * WIDTH * model.config.out_channels  # the other half's
  guidance = Guidance.for_mesh(True, sizes).expected_traffic(prediction_values, 4).get("guidance", 0)
  assert kinds["all-gather"][1] == expected["moments"] + guidance  # no K/V is gathered
  ring_degree = 1 if name == "ulysses" else patch  # K/V blocks rotate over `patch`
  all_to_alls = 4 * SELF_ATTENTIONS if name != "ring" else 0  # q, k, v and the output
  assert kinds.get("all-to-all", (0, 0)) == (all_to_alls, expected.get("alltoall", 0))
  permutes = HALO_PERMUTES + (ring_degree - 1) * SELF_ATTENTIONS  # r−1 K/V blocks per self-attention
  permuted = expected["halo"] + expected["input_halo"] + expected.get("ring", 0)
  assert kinds["collective-permute"] == (permutes, permuted)
  assert set(kinds) == {"collective-permute", "all-gather"} | ({"all-to-all"} if all_to_alls else set())
  if cfg == 1:  # what `bench simulate` charges latency for: every collective of the step
    assert strategy.collectives_per_step(model.config, expected, sizes) == sum(n for n, _ in kinds.values())


def test_ulysses_refuses_a_patch_count_that_does_not_divide_the_heads(model):
  args, kwargs = _sample_args(model, make_mesh(1, 1, 8), Strategy.ulysses())
  with pytest.raises(ValueError, match=r"patch=8 does not divide the 4 heads of 'down_blocks.1.attentions.0.*"
                                       r"valid patch counts at latent height 48: \[1, 2, 4\]; or use ring"):
    sample(*args, **kwargs)


# ------------------------------------------------------------------- DiT and PixArt: pure sequence methods

TINY_DIT = dict(num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                sample_size=8, patch_size=2)
TINY_PIXART = dict(num_attention_heads=4, attention_head_dim=6, in_channels=4, out_channels=8, num_layers=2,
                   sample_size=8, patch_size=2, caption_channels=20, cross_attention_dim=24,
                   use_additional_conditions=True)
DIT_HEIGHT = 16  # latent rows: 8 token rows, whole for 2, 4 and 8 token blocks
LAYERS = 2  # one self-attention per block, and nothing else exchanges


@pytest.fixture(scope="module")
def dit():
  return DiTTransformer2DModel(DiTConfig.from_diffusers_config(TINY_DIT), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def pixart():
  return PixArtTransformer2DModel(PixArtConfig.from_diffusers_config(TINY_PIXART), rngs=nnx.Rngs(0))


def _transformer_args(model, mesh, strategy):
  noise = jax.random.normal(jax.random.key(3), (1, DIT_HEIGHT, WIDTH, model.config.in_channels))
  if isinstance(model, DiTTransformer2DModel):
    cond = Conditioning(class_labels=np.array([3]))
    uncond = Conditioning(class_labels=np.array([model.config.null_class]))  # DiT's unconditional class
  else:
    text, null_text = np.random.default_rng(4).standard_normal((2, 1, 6, TINY_PIXART["caption_channels"]),
                                                                np.float32)
    mask = np.array([[1, 1, 1, 1, 0, 0]], np.float32)  # two padded text tokens
    size = dict(resolution=np.array([[8.0 * DIT_HEIGHT, 8.0 * WIDTH]], np.float32),
                aspect_ratio=np.array([[DIT_HEIGHT / WIDTH]], np.float32))
    cond = Conditioning(encoder_hidden_states=text, encoder_attention_mask=mask, **size)
    uncond = Conditioning(encoder_hidden_states=null_text, encoder_attention_mask=np.ones_like(mask), **size)
  return _with_options(model, noise, cond, uncond, mesh, strategy)


@pytest.fixture(scope="module")
def transformer_single(dit, pixart):
  """{family: single's latents}, each computed when first asked for."""
  models, done = {"dit": dit, "pixart": pixart}, {}

  def get(family):
    if family not in done:
      args, kwargs = _transformer_args(models[family], None, Strategy.single())
      done[family] = np.asarray(sample(*args, **kwargs))
    return done[family]
  return get


def _hlo_expected(expected, guidance, ring_degree):
  """{HLO collective: (count, bytes)} a transformer's step must run, from the analytic volume by kind:
  the K/V all-gather (one per layer), Ulysses' four all-to-alls per layer, the ring's r−1 K/V block
  permutes per layer, and one all-gather of the other `cfg` group's prediction."""
  hlo = {"all-gather": ((LAYERS if "kv" in expected else 0) + (1 if guidance else 0),
                        expected.get("kv", 0) + guidance),
         "all-to-all": (4 * LAYERS if "alltoall" in expected else 0, expected.get("alltoall", 0)),
         "collective-permute": ((ring_degree - 1) * LAYERS if "ring" in expected else 0, expected.get("ring", 0))}
  return {kind: counted for kind, counted in hlo.items() if counted[0]}


TRANSFORMER_RUNS = {  # id: (family, strategy, cfg, patch, ulysses)
    "dit-exact-2": ("dit", "exact", 1, 2, 1), "dit-ulysses-2": ("dit", "ulysses", 1, 2, 1),
    "dit-ring-2": ("dit", "ring", 1, 2, 1), "dit-usp-2x4": ("dit", "usp", 1, 2, 4),
    "pixart-cfg2-usp-2x2": ("pixart", "usp", 2, 2, 2),
    **{name: pytest.param(*run, marks=pytest.mark.slow) for name, run in {
        "pixart-ulysses-4": ("pixart", "ulysses", 1, 4, 1), "dit-exact-4": ("dit", "exact", 1, 4, 1),
        "dit-cfg2-usp-2x2": ("dit", "usp", 2, 2, 2), "dit-ulysses-4": ("dit", "ulysses", 1, 4, 1),
        "dit-ring-4": ("dit", "ring", 1, 4, 1), "dit-ring-8": ("dit", "ring", 1, 8, 1),
        "dit-usp-4x2": ("dit", "usp", 1, 4, 2), "dit-cfg2-ring-4": ("dit", "ring", 2, 4, 1),
        "pixart-cfg2-exact-2": ("pixart", "exact", 2, 2, 1), "pixart-ring-4": ("pixart", "ring", 1, 4, 1),
        "pixart-usp-2x4": ("pixart", "usp", 1, 2, 4), "pixart-cfg2-ulysses-2": ("pixart", "ulysses", 2, 2, 1),
    }.items()}}


@pytest.mark.parametrize("family,name,cfg,patch,ulysses", TRANSFORMER_RUNS.values(), ids=TRANSFORMER_RUNS.keys())
def test_strategy_on_a_transformer_equals_single_and_moves_only_attention_bytes(
    dit, pixart, transformer_single, family, name, cfg, patch, ulysses):
  model = dit if family == "dit" else pixart
  mesh, strategy = make_mesh(1, cfg, patch, ulysses=ulysses), Strategy.from_name(name)
  got, kinds = _compiled_run(*_transformer_args(model, mesh, strategy))
  assert _relative_error(got, transformer_single(family)) <= 1e-5

  sizes, batch = axis_sizes(mesh), 2 // cfg
  expected = strategy.expected_traffic(model.config, DIT_HEIGHT, WIDTH, sizes, batch, activation_bytes=4)
  prediction_values = DIT_HEIGHT // (patch * ulysses) * WIDTH * model.config.in_channels  # the other half's
  guidance = Guidance.for_mesh(True, sizes).expected_traffic(prediction_values, 4).get("guidance", 0)
  assert kinds == _hlo_expected(expected, guidance, ring_degree=patch)
  if cfg == 1:
    assert strategy.collectives_per_step(model.config, expected, sizes) == sum(n for n, _ in kinds.values())


def test_usp_names_the_ulysses_degrees_that_fit(dit):
  args, kwargs = _transformer_args(dit, make_mesh(1, 1, 1, ulysses=8), Strategy.usp())
  with pytest.raises(ValueError, match=r"usp splits .* over the ulysses devices, but ulysses=8 does not divide the "
                                       r"4 heads of .* valid ulysses degrees for patch × ulysses = 8 devices: "
                                       r"\[1, 2, 4\]"):
    sample(*args, **kwargs)


def test_a_mesh_of_two_token_axes_needs_usp(dit):
  args, kwargs = _transformer_args(dit, make_mesh(1, 1, 2, ulysses=2), Strategy.ring())
  with pytest.raises(ValueError, match=r"'ring' does not split an image over the 'ulysses' axis.*\(usp, pipefusion\)"):
    sample(*args, **kwargs)
