"""Prompt → image end to end: tiny random diffusers pipelines (SD1.5-, SD2.1-, SDXL-, PixArt-shaped, built
with diffusers and transformers in torch fp32), saved with `save_pretrained`, converted by `dfjax convert`,
loaded by `dfjax.load_pipeline`, given the same starting latents, must give diffusers' images
(`output_type="np"`) to 1e-3, with `single` and with `exact` on 4 devices (plus the patch-parallel VAE
decode). Also: what conversion writes for a whole pipeline, and the refusals of bad input."""

import json
import logging
import shutil

import numpy as np
import pytest
import torch

from convert import convert_checkpoint
from dfjax.pipelines import load_pipeline
from dfjax.pipelines.tiny import save_tiny_pipeline
from sharding.mesh import make_mesh
from sharding.strategies import Strategy

TOLERANCE = 1e-3  # max |ours − diffusers| on images in [0, 1], fp32
STEPS = 3
PROMPTS = ["a red cat on a mat", "a lighthouse at dusk under the stars on the sea at night a red cat"]  # 2nd: cut


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """kind → (diffusers pipeline, its folder, the dfjax checkpoint converted from it), built on first use."""
  root, cache = tmp_path_factory.mktemp("pipelines"), {}

  def get(kind):
    if kind not in cache:
      pipe = save_tiny_pipeline(kind, root / kind)
      cache[kind] = pipe, root / kind, convert_checkpoint(root / kind, root / f"{kind}-dfjax")
    return cache[kind]
  return get


def latents_nchw(pipe, count: int = 2) -> torch.Tensor:
  generator = torch.Generator().manual_seed(0)
  return torch.randn(count, 4, 8, 8, generator=generator)


def diffusers_images(pipe, kind: str, latents: torch.Tensor, **kwargs) -> np.ndarray:
  pixart = dict(clean_caption=False, use_resolution_binning=False, max_sequence_length=12)
  extra = pixart if kind.startswith("pixart") else {}
  return pipe(PROMPTS, num_inference_steps=STEPS, latents=latents.clone(), output_type="np", **extra,
              **kwargs).images


def check_parity(built, kind: str, **kwargs):
  """Ours equals diffusers' pipeline with single, then exact on 4 devices with a 2-way VAE decode."""
  pipe, _, checkpoint = built(kind)
  latents = latents_nchw(pipe)
  expected = diffusers_images(pipe, kind, latents, **kwargs)
  ours = load_pipeline(checkpoint)
  args = dict(num_steps=STEPS, latents=latents.permute(0, 2, 3, 1).numpy(),
              **({"max_sequence_length": 12} if kind.startswith("pixart") else {}))
  renamed = {"num_steps" if k == "num_inference_steps" else k: v for k, v in kwargs.items()}
  single = ours(PROMPTS, **args, **renamed)
  assert single.shape == expected.shape == (2, 16, 16, 3) and single.dtype == np.float32
  np.testing.assert_allclose(single, expected, atol=TOLERANCE, rtol=0)
  assert expected.std() > 0.05  # a picture, not a constant
  exact = ours(PROMPTS, **args, **renamed, mesh=make_mesh(patch=4, devices=_devices(4)), strategy=Strategy.exact(),
               vae_patch=2)
  np.testing.assert_allclose(exact, expected, atol=TOLERANCE, rtol=0)


def _devices(count):
  import jax
  return jax.devices()[:count]


def test_sd15_pipeline_matches_diffusers(built, caplog):
  with caplog.at_level(logging.WARNING, logger="dfjax.tokenizers"):
    check_parity(built, "sd15", guidance_scale=6.0)
  assert any("prompt 1 was truncated" in r.getMessage() for r in caplog.records)  # 16 CLIP tokens


@pytest.mark.slow
def test_sd21_pipeline_matches_diffusers(built):
  check_parity(built, "sd21", negative_prompt=["a cat", "the sea"])  # v-prediction, gelu CLIP, linear projections


@pytest.mark.slow
@pytest.mark.parametrize("kwargs", [{}, {"negative_prompt": "the sea", "clip_skip": 1}], ids=["zeros", "negative"])
def test_sdxl_pipeline_matches_diffusers(built, kwargs):
  """No negative prompt: force_zeros_for_empty_prompt zeros; a negative prompt with clip_skip otherwise."""
  check_parity(built, "sdxl", **kwargs)


@pytest.mark.slow
def test_pixart_pipeline_matches_diffusers(built):
  check_parity(built, "pixart", negative_prompt="the sea")  # Σ-shaped: T5 states and mask


@pytest.mark.slow
def test_pixart_alpha_size_conditions_match_diffusers(built):
  check_parity(built, "pixart-alpha", height=16, width=16)  # resolution and aspect-ratio conditions


# ---------------------------------------------------------------------------------- conversion

def test_whole_pipeline_conversion_writes_every_component(built):
  _, src, checkpoint = built("sd15")
  manifest = json.loads((checkpoint / "manifest.json").read_text())
  assert {name: record["model"] for name, record in manifest["components"].items()} == {
      "unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel"}
  assert manifest["pipeline"]["class"] == "StableDiffusionPipeline"
  assert manifest["pipeline"]["tokenizers"] == ["tokenizer"]
  saved = sorted(p.name for p in (src / "tokenizer").iterdir())  # transformers 5: tokenizer.json + config
  assert "tokenizer.json" in saved
  for name in saved:
    assert (checkpoint / "tokenizer" / name).read_bytes() == (src / "tokenizer" / name).read_bytes()
    assert f"tokenizer/{name}" in manifest["files"]
  assert "text_encoder/config.json" in manifest["files"]
  assert any(f.startswith("vae/params/") for f in manifest["files"])
  assert json.loads((checkpoint / "scheduler_config.json").read_text())["_class_name"] == "DDIMScheduler"
  sources = {record["path"] for record in manifest["source"]["files"]}
  assert {"text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors",
          "tokenizer/tokenizer.json"} <= sources


# ---------------------------------------------------------------------------------- bad input

def test_pipeline_missing_a_component_names_it(built, tmp_path):
  _, src, _ = built("sd15")
  broken = tmp_path / "src"
  shutil.copytree(src, broken, ignore=shutil.ignore_patterns("vae"))
  with pytest.raises(ValueError, match=r"names a vae \(AutoencoderKL\), but .*vae is missing: copy the "
                                       r"pipeline's whole vae/ folder"):
    convert_checkpoint(broken, tmp_path / "ckpt")
  assert not (tmp_path / "ckpt").exists()


def test_tokenizer_without_vocabulary_is_named(built, tmp_path):
  _, src, _ = built("sd15")
  broken = tmp_path / "src"
  shutil.copytree(src, broken)
  (broken / "tokenizer" / "tokenizer.json").unlink()
  checkpoint = convert_checkpoint(broken, tmp_path / "ckpt")
  with pytest.raises(ValueError, match=r"tokenizer holds no vocabulary of a CLIPTokenizer: it needs vocab.json "
                                       r"and merges.txt \(or tokenizer.json\)"):
    load_pipeline(checkpoint)


def test_sizes_and_latents_the_pipeline_cannot_take(built):
  pipe = load_pipeline(built("sd15")[2])
  assert pipe.check_size(None, None) == (16, 16)  # sample_size 8 × the VAE's 2
  assert pipe.check_size(32, 48) == (32, 48)
  with pytest.raises(ValueError, match=r"height=19: image sides must be positive multiples of 4 pixels \(the VAE's "
                                       r"factor 2 × the UNet2DConditionModel's latent granularity 2\); nearest "
                                       r"valid: height=20"):
    pipe.check_size(19, 16)
  with pytest.raises(ValueError, match=r"width=2: .*nearest valid: width=4"):
    pipe("a cat", width=2)
  with pytest.raises(ValueError, match=r"latents of shape \(1, 8, 8, 4\), but 2 prompt\(s\) at 16×16 need "
                                       r"\(2, 8, 8, 4\)"):
    pipe(["a", "b"], latents=np.zeros((1, 8, 8, 4), np.float32))
  with pytest.raises(ValueError, match="negative_prompt must be a string or a list of 2 strings"):
    pipe(["a", "b"], ["c"])
  with pytest.raises(ValueError, match="output_type='png'"):
    pipe("a", output_type="png")
  with pytest.raises(ValueError, match="clip_skip=3: the text encoder has 3 layers"):
    pipe("a", clip_skip=3)


def test_model_only_checkpoint_is_not_a_pipeline(built, tmp_path):
  _, src, _ = built("sd15")
  checkpoint = convert_checkpoint(src / "unet", tmp_path / "unet")
  with pytest.raises(ValueError, match="converted from a model folder alone .*convert the whole diffusers pipeline"):
    load_pipeline(checkpoint)


# ---------------------------------------------------------------------------------- the command

@pytest.mark.slow
def test_generate_prompt_writes_images_and_prints_stage_times(built, tmp_path, capsys):
  """`dfjax generate --prompt`: single and exact (patch 2) with a 2-way VAE decode; exact equals single."""
  from dfjax import commands
  from PIL import Image
  checkpoint = built("sd15")[2]
  code = commands.main(["generate", "--checkpoint", str(checkpoint), "--prompt", "a red cat", "a lighthouse",
                        "--negative-prompt", "the sea", "--strategies", "single", "exact", "--patch", "2",
                        "--steps", "2", "--vae-patch", "2", "--height", "16", "--width", "24", "--out",
                        str(tmp_path / "out")])
  stdout = capsys.readouterr().out
  assert code == 0, stdout
  assert "pipeline: StableDiffusionPipeline" in stdout and "16×24, 2 steps, VAE decode on 2 device(s)" in stdout
  header = next(line for line in stdout.splitlines() if line.startswith("strategy"))
  assert all(column in header for column in ("encode s", "sample s", "decode s", "PSNR dB"))
  exact_row = next(line for line in stdout.splitlines() if line.startswith("exact"))
  assert float(exact_row.split()[-1]) > 60  # exact equals single to float rounding
  pictures = [np.asarray(Image.open(tmp_path / "out" / name / f"{i}.png")) for name in ("single", "exact")
              for i in range(2)]
  assert all(p.shape == (16, 24, 3) for p in pictures)
  assert np.abs(pictures[0].astype(int) - pictures[2]).max() <= 1


def test_generate_prompt_needs_a_pipeline_checkpoint(tmp_path, capsys):
  from dfjax import commands
  assert commands.main(["generate", "--prompt", "a cat", "--out", str(tmp_path / "out")]) == 2
  assert "--prompt needs --checkpoint: a dfjax checkpoint converted from a diffusers pipeline" in \
      capsys.readouterr().err
