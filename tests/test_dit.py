"""DiT and PixArt against diffusers' own models (torch, fp32) on tiny random configs.

The torch weights go through convert/dit_keymap.py (strict: every tensor used once), so these tests
check the keymap too. Also: the positional embedding of a row patch equals the matching rows of
the whole image's (diffusers' `get_2d_sincos_pos_embed`), configs refuse what dfjax does not build,
and every param names its axes.
"""

import functools

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from flax import nnx

from convert.dit_keymap import convert_transformer_state_dict, merge_block_embedders
from models.dit import DiTTransformer2DModel, PixArtTransformer2DModel
from models.dit_blocks import sincos_2d
from models.dit_config import DiTConfig, PixArtConfig
from models.layers import PARAM_AXES, Workload

TINY_DIT = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                sample_size=8, patch_size=2)
TINY_PIXART_ALPHA = dict(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8, num_layers=2,
                         sample_size=8, patch_size=2, cross_attention_dim=24, caption_channels=20,
                         interpolation_scale=2, use_additional_conditions=True)
TINY_PIXART_SIGMA = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                         sample_size=8, patch_size=2, cross_attention_dim=16, caption_channels=12,
                         use_additional_conditions=False, norm_elementwise_affine=True)
PIXARTS = {"alpha": TINY_PIXART_ALPHA, "sigma": TINY_PIXART_SIGMA}


def perturbed(module: torch.nn.Module) -> torch.nn.Module:
  """Every param moved by noise (zero-initialised ones too), in eval mode."""
  torch.manual_seed(0)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return module.eval()


def tie_block_embedders(dit: torch.nn.Module) -> None:
  """Makes every block's norm1.emb a copy of block 0's, as in real DiT checkpoints."""
  first = dit.transformer_blocks[0].norm1.emb.state_dict()
  for block in dit.transformer_blocks[1:]:
    block.norm1.emb.load_state_dict(first)


def to_dfjax(torch_model: torch.nn.Module, model_class, config) -> nnx.Module:
  """The dfjax model of `config` with `torch_model`'s weights, through the keymap (no random init)."""
  abstract = nnx.eval_shape(lambda: model_class(config, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  flat = nnx.to_flat_state(params)
  source = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  converted, _ = convert_transformer_state_dict(source, {p: tuple(v.shape) for p, v in flat})
  for path, variable in flat:
    variable.set_value(jnp.asarray(converted[path]))
  return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)


def make_dit(**overrides):
  torch_dit = diffusers.DiTTransformer2DModel(**{**TINY_DIT, **overrides})
  tie_block_embedders(perturbed(torch_dit))
  return torch_dit, to_dfjax(torch_dit, DiTTransformer2DModel, DiTConfig.from_diffusers_config(dict(torch_dit.config)))


@functools.cache
def make_pixart(name: str):
  torch_pixart = perturbed(diffusers.PixArtTransformer2DModel(**PIXARTS[name]))
  config = PixArtConfig.from_diffusers_config(dict(torch_pixart.config))
  return torch_pixart, to_dfjax(torch_pixart, PixArtTransformer2DModel, config)


call = nnx.jit(lambda model, x, t, **cond: model(x, t, **cond))  # one compile per shape, not one per op


@pytest.fixture(scope="module")
def dit():
  return make_dit()


def relative_error(got, expected) -> float:
  return float(np.abs(np.asarray(got) - expected).max() / np.abs(expected).max())


def nchw(x_bhwc: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(x_bhwc.transpose(0, 3, 1, 2)))


def expected_nhwc(out: torch.Tensor) -> np.ndarray:
  return out.detach().numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("batch, timesteps", [(1, [999]), (3, [0, 250, 999]), (2, [500.0, 17.0])])
def test_dit_equals_diffusers(dit, batch, timesteps):
  torch_dit, model = dit
  rng = np.random.default_rng(batch)
  x = rng.standard_normal((batch, 8, 8, 4), np.float32)
  labels = np.array([3, 1000, 7][:batch])  # 1000: the null class
  t = np.array(timesteps, np.float32)
  with torch.no_grad():
    expected = expected_nhwc(torch_dit(nchw(x), timestep=torch.from_numpy(t), class_labels=torch.from_numpy(labels))
                             .sample)
  assert expected.shape == (batch, 8, 8, 8)
  assert relative_error(call(model, jnp.asarray(x), jnp.asarray(t), class_labels=jnp.asarray(labels)),
                        expected) <= 1e-4


def test_dit_without_learned_sigma_equals_diffusers():
  torch_dit, model = make_dit(out_channels=None, num_layers=1, sample_size=16, activation_fn="gelu")
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 16, 16, 4), np.float32)
  labels, t = np.array([0, 5]), np.array([10.0, 900.0], np.float32)
  with torch.no_grad():
    expected = expected_nhwc(torch_dit(nchw(x), timestep=torch.from_numpy(t), class_labels=torch.from_numpy(labels))
                             .sample)
  assert not model.config.predicts_variance and expected.shape[-1] == 4
  assert relative_error(call(model, jnp.asarray(x), jnp.asarray(t), class_labels=jnp.asarray(labels)),
                        expected) <= 1e-4


def _pixart_inputs(rng, batch, height, width, caption_channels, mask):
  x = rng.standard_normal((batch, height, width, 4), np.float32)
  text = rng.standard_normal((batch, 6, caption_channels), np.float32)
  keep = np.ones((batch, 6), np.float32)
  if mask:
    keep[0, 3:] = 0  # padded tokens: their states are noise the model must ignore
    keep[-1, 1:] = 0
  resolution = np.tile(np.array([[8.0 * height, 8.0 * width]], np.float32), (batch, 1))
  aspect = np.full((batch, 1), height / width, np.float32)
  return x, text, keep, resolution, aspect


@pytest.mark.parametrize("name, batch, timesteps, size, mask", [
    ("alpha", 2, [999.0, 3.0], (8, 8), True),
    ("alpha", 1, [420.0], (8, 12), False),
    ("sigma", 3, [0.0, 500.0, 999.0], (12, 8), True),
], ids=["alpha-mask", "alpha-wide", "sigma-mask"])
def test_pixart_equals_diffusers(name, batch, timesteps, size, mask):
  settings = PIXARTS[name]
  torch_pixart, model = make_pixart(name)
  x, text, keep, resolution, aspect = _pixart_inputs(np.random.default_rng(batch), batch, *size,
                                                     settings["caption_channels"], mask)
  t = np.array(timesteps, np.float32)
  added = ({"resolution": torch.from_numpy(resolution), "aspect_ratio": torch.from_numpy(aspect)}
           if settings["use_additional_conditions"] else None)
  with torch.no_grad():
    expected = expected_nhwc(torch_pixart(nchw(x), encoder_hidden_states=torch.from_numpy(text),
                                          timestep=torch.from_numpy(t), added_cond_kwargs=added,
                                          encoder_attention_mask=torch.from_numpy(keep)).sample)
  got = call(model, jnp.asarray(x), jnp.asarray(t), encoder_hidden_states=jnp.asarray(text),
              encoder_attention_mask=jnp.asarray(keep), resolution=jnp.asarray(resolution),
              aspect_ratio=jnp.asarray(aspect))
  assert relative_error(got, expected) <= 1e-4


def test_masked_text_tokens_do_not_matter():
  _, model = make_pixart("sigma")
  x, text, keep, *_ = _pixart_inputs(np.random.default_rng(5), 2, 8, 8, 12, mask=True)
  other = np.where(keep[..., None] > 0, text, 100.0 * np.random.default_rng(6).standard_normal(text.shape))
  run = lambda states: call(model, jnp.asarray(x), jnp.float32(300.0), encoder_hidden_states=jnp.asarray(states, jnp.float32),
                             encoder_attention_mask=jnp.asarray(keep))
  np.testing.assert_allclose(run(text), run(other), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows, cols, scale", [(4, 4, 1.0), (6, 4, 2.0), (4, 10, 1.0)])
def test_positional_embedding_of_a_row_patch_is_those_rows_of_diffusers(rows, cols, scale):
  dim, base = 16, 4
  full = get_2d_sincos_pos_embed(dim, (rows, cols), base_size=base, interpolation_scale=scale,
                                 output_type="pt").numpy().reshape(rows, cols, dim)
  for first in range(0, rows, 2):
    got = sincos_2d(dim, first, 2, rows, cols, base_size=base, interpolation_scale=scale)
    np.testing.assert_allclose(got, full[first:first + 2], atol=2e-6)


def test_segments_fold_to_the_call(dit):
  _, model = dit
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 4)), jnp.float32)
  labels = jnp.array([1, 2])
  @nnx.jit
  def folded(model, x, labels):
    carry = model.first_carry(x, 10.0, class_labels=labels)
    for segment in model.segments():
      carry = segment(carry)
    return carry.h

  assert [s.name for s in model.segments()] == ["embed", "transformer_blocks.0", "transformer_blocks.1", "out"]
  np.testing.assert_allclose(folded(model, x, labels), call(model, x, jnp.float32(10.0), class_labels=labels),
                             rtol=1e-5, atol=1e-6)
  costs = {s.name: s.cost(Workload(rows=8, cols=8, text_tokens=0)) for s in model.segments()}
  kv = [e for e in costs["transformer_blocks.0"].exchanges if e.kind == "kv"]
  assert [(e.key, e.rows, e.cols, e.channels) for e in kv] == [("transformer_blocks.0.attn1", 4, 4, 16)]
  assert costs["embed"].exchanges == ()  # the patch conv needs no halo


@pytest.mark.parametrize("model_class, config", [
    (DiTTransformer2DModel, DiTConfig.from_diffusers_config(TINY_DIT)),
    (PixArtTransformer2DModel, PixArtConfig.from_diffusers_config(TINY_PIXART_ALPHA)),
    (PixArtTransformer2DModel, PixArtConfig.from_diffusers_config(TINY_PIXART_SIGMA))], ids=["dit", "alpha", "sigma"])
def test_every_param_names_each_of_its_axes(model_class, config):
  abstract = nnx.eval_shape(lambda: model_class(config, rngs=nnx.Rngs(0)))
  for path, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    axes = variable.get_metadata().get("out_sharding")
    assert axes is not None and len(axes) == variable.ndim, (path, axes)
    assert set(axes) <= set(PARAM_AXES), (path, axes)


def test_config_refuses_what_dfjax_does_not_build():
  with pytest.raises(ValueError, match=r"unknown DiT config keys \['rope'\]"):
    DiTConfig.from_diffusers_config({**TINY_DIT, "rope": True})
  with pytest.raises(ValueError, match="norm_type='ada_norm_single' is not supported.*'ada_norm_zero'"):
    DiTConfig.from_diffusers_config({**TINY_DIT, "norm_type": "ada_norm_single"})
  with pytest.raises(ValueError, match="out_channels=6 must be in_channels=4"):
    DiTConfig.from_diffusers_config({**TINY_DIT, "out_channels": 6})
  with pytest.raises(ValueError, match="activation_fn='geglu-approximate'"):
    PixArtConfig.from_diffusers_config({**TINY_PIXART_SIGMA, "activation_fn": "geglu-approximate"})
  config = DiTConfig.from_diffusers_config(TINY_DIT)
  with pytest.raises(ValueError, match=r"latent size 12×7 does not fit this DiT .*nearest valid widths: \[6, 8\]"):
    config.check_latent_size(12, 7)
  with pytest.raises(ValueError, match=r"height 12 over 4 row patches .*valid patch counts for height 12: \[1, 2, 3, 6\]"):
    config.check_latent_size(12, 8, row_splits=4)
  assert config.valid_row_splits(8) == [1, 2, 4] and config.row_granularity == 2


def test_pixart_decides_additional_conditions_as_diffusers():
  no_key = {k: v for k, v in TINY_PIXART_ALPHA.items() if k not in ("use_additional_conditions",
                                                                      "interpolation_scale")}
  assert not PixArtConfig.from_diffusers_config(no_key).use_additional_conditions  # sample_size 8
  assert PixArtConfig.from_diffusers_config({**no_key, "sample_size": 128}).use_additional_conditions
  assert PixArtConfig.from_diffusers_config({**no_key, "sample_size": 128}).pos_interpolation_scale == 2.0


def test_block_embedders_that_differ_are_refused():
  torch_dit = perturbed(diffusers.DiTTransformer2DModel(**TINY_DIT))  # random copies, not tied
  source = {k: v.numpy() for k, v in torch_dit.state_dict().items()}
  with pytest.raises(ValueError, match=r"norm1.emb.timestep_embedder.linear_1.weight: blocks \[1\] differ"):
    merge_block_embedders(source)
  tie_block_embedders(torch_dit)
  merged, notes = merge_block_embedders({k: v.numpy() for k, v in torch_dit.state_dict().items()})
  assert "emb.class_embedder.embedding_table.weight" in merged and not any(".norm1.emb." in k for k in merged)
  assert "kept once" in notes[0]


def test_bad_inputs_name_the_problem(dit):
  _, model = dit
  x = jnp.zeros((2, 8, 8, 4))
  with pytest.raises(ValueError, match=r"class_labels of shape \(2,\)"):
    model(x, 1.0, class_labels=jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match="It looks NCHW"):
    model(jnp.zeros((2, 4, 8, 8)), 1.0, class_labels=jnp.zeros((2,), jnp.int32))
  with pytest.raises(ValueError, match="does not fit this DiT"):
    model(jnp.zeros((2, 7, 8, 4)), 1.0, class_labels=jnp.zeros((2,), jnp.int32))
