"""AutoencoderKL against diffusers' PyTorch model on tiny random configs shaped like the SD1.x, SDXL and SD3
VAEs (and one with latents_mean/std, without mid-block attention), the state-dict map with its old
attention names, patch-parallel decode against our single-device decode, its memory per device,
`VAEConfig`'s checks and `dfjax bench vae`."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.traverse_util import unflatten_dict

from convert.vae_keymap import convert_vae_state_dict, rename_attention_keys
from dfjax import commands
from dfjax.bench import vae as bench_vae
from dfjax.vae_decode import decode_latents, prepare_decode
from models.layers import Workload
from models.vae import AutoencoderKL
from models.vae_config import VAE_PRESETS, VAEConfig
from sharding.mesh import make_mesh

TOLERANCE = 1e-4  # max|ours − diffusers| / max|diffusers|, fp32
IMAGE = (2, 24, 16, 3)  # B, H, W, C: rows ≠ columns on purpose

_BLOCKS = lambda n: dict(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n)
CONFIGS = {
    # SD1.x/2.x: two resnets per encoder block (three per decoder block), quant convs, 0.18215.
    "sd15": dict(block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=4, **_BLOCKS(3)),
    # SDXL: the same architecture at four levels, its scaling factor and force_upcast (no effect in fp32).
    "sdxl": dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, scaling_factor=0.13025,
                 force_upcast=True, **_BLOCKS(4)),
    # SD3/Flux: 16 latent channels, no quant convs, shift_factor.
    "sd3": dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=16,
                use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609,
                **_BLOCKS(2)),
    # Per-channel latent statistics (Playground-style SDXL VAEs), no mid-block attention.
    "latent_stats": dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, scaling_factor=0.5,
                         latents_mean=(0.5, -1.0, 0.25, 2.0), latents_std=(2.0, 0.5, 1.5, 4.0),
                         mid_block_add_attention=False, **_BLOCKS(2)),
}


# ---------------------------------------------------------------------------------- helpers

@functools.cache
def built(name: str):
  """(diffusers AutoencoderKL with perturbed weights, its state dict, our model loaded from it)."""
  import torch
  from diffusers import AutoencoderKL as TorchVAE

  torch.manual_seed(0)
  reference = TorchVAE(**CONFIGS[name]).eval()
  with torch.no_grad():  # perturb every weight: zero-initialised biases and ones-scales included
    for p in reference.parameters():
      p.add_(0.05 * torch.randn_like(p))
  state = {k: v.numpy() for k, v in reference.state_dict().items()}
  return reference, state, load(VAEConfig.from_diffusers_config(dict(reference.config)), state)[0]


def load(config: VAEConfig, state: dict) -> tuple[AutoencoderKL, list[str]]:
  """Our VAE with its params taken from a diffusers state dict (convert/vae_keymap.py, strict), and the notes."""
  graphdef, params = nnx.split(nnx.eval_shape(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0))), nnx.Param)
  converted, notes = convert_vae_state_dict(state, target_shapes(params))
  nnx.replace_by_pure_dict(params, unflatten_dict({p: jnp.asarray(a) for p, a in converted.items()}))
  return nnx.merge(graphdef, params), notes


def target_shapes(params) -> dict:
  return {path: tuple(v.shape) for path, v in nnx.to_flat_state(params)}


# Jitted: one compile per config costs less CPU than eager's one per op and shape.
encode = nnx.jit(lambda vae, image_bhwc: vae.encode(image_bhwc))
decode = nnx.jit(lambda vae, latents_bhwl: vae.decode(vae.unscale_latents(latents_bhwl)))


def relative_error(ours, reference) -> float:
  ours, reference = np.asarray(ours), np.asarray(reference)
  assert ours.shape == reference.shape
  return float(np.abs(ours - reference).max() / np.abs(reference).max())


def torch_nchw(x_nhwc: np.ndarray):
  import torch
  return torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)


def numpy_nhwc(x_nchw) -> np.ndarray:
  return x_nchw.permute(0, 2, 3, 1).numpy()


def diffusers_decode(reference, latents_nhwc: np.ndarray) -> np.ndarray:
  """What diffusers' pipelines decode diffusion latents into (their `vae.decode` call, unscaling first)."""
  import torch

  c = reference.config
  latents = torch_nchw(latents_nhwc)
  with torch.no_grad():
    if c.latents_mean is not None:  # StableDiffusionXLPipeline
      mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (c.latents_mean, c.latents_std))
      latents = latents * std / c.scaling_factor + mean
    else:  # StableDiffusion(3)Pipeline, FluxPipeline
      latents = latents / c.scaling_factor + (c.shift_factor or 0.0)
    return numpy_nhwc(reference.decode(latents).sample)


# ---------------------------------------------------------------------------------- parity with diffusers

@pytest.mark.parametrize("name", ["sd15", pytest.param("sdxl", marks=pytest.mark.slow), "sd3", "latent_stats"])
def test_encode_and_decode_match_diffusers(name):
  import torch

  reference, _, ours = built(name)
  image = np.random.default_rng(0).uniform(-1, 1, IMAGE).astype(np.float32)
  with torch.no_grad():
    posterior = reference.encode(torch_nchw(image)).latent_dist
  mean, logvar = encode(ours, jnp.asarray(image))
  assert relative_error(mean, numpy_nhwc(posterior.mean)) < TOLERANCE
  assert relative_error(logvar, numpy_nhwc(posterior.logvar)) < TOLERANCE

  f = ours.config.downsample_factor
  latents = np.random.default_rng(1).standard_normal((2, IMAGE[1] // f, IMAGE[2] // f, ours.config.latent_channels))
  latents = latents.astype(np.float32)
  decoded = decode(ours, jnp.asarray(latents))
  assert relative_error(decoded, diffusers_decode(reference, latents)) < TOLERANCE


@pytest.mark.parametrize("name", ["sd3", "latent_stats"])
def test_scale_latents_is_what_the_pipelines_encode_with(name):
  reference, _, ours = built(name)
  c = reference.config
  z = np.random.default_rng(2).standard_normal((1, 3, 2, c.latent_channels)).astype(np.float32)
  if c.latents_mean is not None:  # StableDiffusionXLImg2ImgPipeline
    expected = (z - np.asarray(c.latents_mean)) * c.scaling_factor / np.asarray(c.latents_std)
  else:  # StableDiffusion3Img2ImgPipeline
    expected = (z - c.shift_factor) * c.scaling_factor
  np.testing.assert_allclose(ours.scale_latents(jnp.asarray(z)), expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ours.unscale_latents(ours.scale_latents(jnp.asarray(z))), z, rtol=1e-5, atol=1e-5)


def test_decode_latents_on_one_device_matches_diffusers():
  reference, _, ours = built("sd3")  # the shift factor and 16 latent channels, through the sharded program
  latents = np.random.default_rng(3).standard_normal((1, 6, 4, 16)).astype(np.float32)
  assert relative_error(decode_latents(ours, latents), diffusers_decode(reference, latents)) < TOLERANCE


# ---------------------------------------------------------------------------------- the state-dict map

def _with_old_attention_names(state: dict) -> dict:
  old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  renamed = {}
  for key, value in state.items():
    for new, old_name in old.items():
      key = key.replace(f"mid_block.attentions.0.{new}.", f"mid_block.attentions.0.{old_name}.")
    renamed[key] = value
  return renamed


def test_old_attention_names_are_renamed_as_diffusers_does():
  reference, state, ours = built("sd15")
  old_state = _with_old_attention_names(state)
  assert any(".proj_attn." in k for k in old_state) and not any(".to_q." in k for k in old_state)
  old_loaded, notes = load(ours.config, old_state)
  assert "query/key/value/proj_attn" in notes[0]
  jax.tree.map(np.testing.assert_array_equal, nnx.state(old_loaded, nnx.Param), nnx.state(ours, nnx.Param))
  assert load(ours.config, state)[1] == []  # a current checkpoint: nothing renamed


def test_the_map_is_strict():
  _, state, ours = built("sd15")
  shapes = target_shapes(nnx.state(ours, nnx.Param))
  broken = {k: v for k, v in state.items() if k != "decoder.mid_block.attentions.0.to_out.0.bias"}
  broken["decoder.extra.weight"] = np.zeros((2, 2), np.float32)
  with pytest.raises(ValueError, match=r"(?s)1 unknown source keys.*decoder\.extra\.weight.*1 missing params.*"
                     r"decoder\.mid_block\.attentions\.0\.to_out\.bias"):
    convert_vae_state_dict(broken, shapes)
  both = {**state, "decoder.mid_block.attentions.0.query.weight": state["decoder.mid_block.attentions.0.to_q.weight"]}
  with pytest.raises(ValueError, match="twice, under its old and its current name"):
    rename_attention_keys(both)


# ---------------------------------------------------------------------------------- patch-parallel decode

# Two levels and attention in the mid block: every exchange kind (conv halos, the upsampled rows'
# halos, GroupNorm moments, the attention's K/V) at a compile time a test can afford.
PATCH_VAE = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
LATENTS = (1, 32, 8, 4)  # 32 latent rows: 2, 4 or 8 patches of enough rows that halos are small


@pytest.fixture(scope="module")
def patch_vae():
  return AutoencoderKL(VAEConfig(**PATCH_VAE, **_BLOCKS(2)), rngs=nnx.Rngs(0))


@functools.cache
def compiled_decode(vae: AutoencoderKL, patch: int):
  """(images, compiled program) of decode on `patch` devices; one compile per patch count."""
  latents = np.random.default_rng(4).standard_normal(LATENTS).astype(np.float32)
  program = prepare_decode(vae, latents, mesh=make_mesh(1, 1, patch, devices=jax.devices()[:patch]))
  compiled = program.lowered.compile()
  return np.asarray(compiled(*program.inputs)), compiled


PATCHES = [pytest.param(2, marks=pytest.mark.slow), 4, pytest.param(8, marks=pytest.mark.slow)]


@pytest.mark.parametrize("patch", PATCHES)
def test_patch_parallel_decode_equals_one_device(patch_vae, patch):
  single, _ = compiled_decode(patch_vae, 1)
  images, _ = compiled_decode(patch_vae, patch)
  assert images.shape == (1, 2 * LATENTS[1], 2 * LATENTS[2], 3)
  assert relative_error(images, single) < 1e-5


@pytest.mark.parametrize("patch", PATCHES)
def test_activation_memory_per_device_falls_as_one_over_patches(patch_vae, patch):
  single = compiled_decode(patch_vae, 1)[1].memory_analysis()
  split = compiled_decode(patch_vae, patch)[1].memory_analysis()
  # Halo rows and the gathered K/V are the overhead above 1/N.
  assert split.temp_size_in_bytes < 1.5 * single.temp_size_in_bytes / patch
  assert split.output_size_in_bytes == single.output_size_in_bytes // patch  # this device's image rows


def test_analytic_decode_flops_match_xla_cost_analysis(patch_vae):
  cost = compiled_decode(patch_vae, 1)[1].cost_analysis()
  xla = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
  analytic = sum(patch_vae.decode_cost(Workload(*LATENTS[1:3], 0, padded=False)).flops.values())
  assert 1.0 <= xla / analytic < 1.1  # XLA also counts elementwise work: ~6 % at these narrow widths


def test_rows_that_do_not_split_name_the_valid_patch_counts(patch_vae):
  latents = np.zeros((1, 6, 4, 4), np.float32)
  with pytest.raises(ValueError, match=r"valid patch counts for height 6: \[1, 2, 3, 6\]"):
    decode_latents(patch_vae, latents, mesh=make_mesh(1, 1, 4, devices=jax.devices()[:4]))


def test_bad_latents_are_refused(patch_vae):
  with pytest.raises(ValueError, match=r"\(B, h, w, 4\) for this VAE"):
    decode_latents(patch_vae, np.zeros((1, 8, 8, 3), np.float32))
  with pytest.raises(ValueError, match="does not split over data=2"):
    decode_latents(patch_vae, np.zeros((3, 8, 8, 4), np.float32), mesh=make_mesh(2, 1, 1, devices=jax.devices()[:2]))
  with pytest.raises(ValueError, match="must be a dfjax AutoencoderKL"):
    decode_latents(object(), np.zeros((1, 8, 8, 4), np.float32))


# ---------------------------------------------------------------------------------- config

def test_every_preset_is_a_config_diffusers_builds_the_same():
  from diffusers import AutoencoderKL as TorchVAE

  for name, preset in VAE_PRESETS.items():
    config = VAEConfig.from_diffusers_config(preset)
    if name.startswith("tiny"):  # the full-size ones take seconds to build in torch
      torch_config = TorchVAE.from_config(dict(preset)).config
      assert VAEConfig.from_diffusers_config(dict(torch_config)) == config


@pytest.mark.parametrize("change, message", [
    ({"sample_mode": "x"}, "unknown AutoencoderKL config keys"),
    ({"_class_name": "AutoencoderTiny"}, "not an AutoencoderKL"),
    ({"act_fn": "gelu"}, "act_fn='gelu' is not supported"),
    ({"up_block_types": ["UpDecoderBlock2D"]}, "one 'UpDecoderBlock2D' per entry"),
    ({"norm_num_groups": 3}, "not divisible by norm_num_groups=3"),
    ({"latents_mean": [0.0] * 4}, "without its partner"),
    ({"latents_mean": [0.0] * 3, "latents_std": [1.0] * 3}, "one per latent channel"),
    ({"latents_mean": [0.0] * 4, "latents_std": [1.0] * 4, "shift_factor": 0.1}, "both shift_factor"),
    ({"scaling_factor": 0.0}, "scaling_factor=0.0 must be a positive"),
])
def test_config_errors_name_the_problem(change, message):
  with pytest.raises(ValueError, match=message):
    VAEConfig.from_diffusers_config({**VAE_PRESETS["tiny-sd"], **change})


# ---------------------------------------------------------------------------------- bench vae

def test_bench_vae_flags_build_its_config():
  args = commands.build_parser().parse_args(["bench", "vae", "--resolution", "64", "--patch", "2", "4", "--iters", "1"])
  assert bench_vae.VAEBenchConfig(resolution=(64,), patch=(2, 4), iters=1) == \
      commands.options.config_from_args(bench_vae.VAEBenchConfig, args)
  with pytest.raises(ValueError, match="not a positive multiple of 8"):
    bench_vae.run(bench_vae.VAEBenchConfig(resolution=(100,)))


@pytest.mark.slow
def test_bench_vae_measures_one_device_against_patches(returned, capsys):
  rows = returned(bench_vae, "run")
  commands.main(["bench", "vae", "--resolution", "64", "--patch", "2", "--iters", "1"])
  runs = rows[0]
  assert [(r.resolution, r.patch, r.fits) for r in runs] == [(64, 1, True), (64, 2, True)]
  assert runs[1].activation_bytes < runs[0].activation_bytes
  assert "per device (compiled)" in capsys.readouterr().out
