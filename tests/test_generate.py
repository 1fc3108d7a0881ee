"""`dfjax generate` end to end through the CLI: files written, metrics printed, bad flags refused."""

import json

import numpy as np
import pytest
from PIL import Image

from dfjax import commands, generation, images
from dfjax.commands import generate as generate_command
from dfjax.inputs import initial_noise
from sharding.strategies import strategy_names


def test_embedded_model_end_to_end(tmp_path, capsys, returned):
  """The shipped model: PNGs written, PSNR printed, displaced much closer to single than naive."""
  out = tmp_path / "out"
  results = returned(generate_command, "run")
  code = commands.main(["generate", "--num-steps", "8", "--warmup-steps", "1", "--images", "2", "--cfg",
                        "2", "--patch", "4", "--out", str(out)])
  assert code == 0
  stdout = capsys.readouterr().out
  runs = {run.name: run for run in results[0].runs}
  assert list(runs) == ["single", "displaced", "naive"]
  assert runs["single"].mesh == "cfg=2×patch=1" and runs["naive"].mesh == "cfg=2×patch=4"
  assert "embedded model" in stdout and "machine: cpu × 8" in stdout and "PSNR dB" in stdout  # the table
  for name in ("single", "displaced", "naive", "comparison"):
    assert Image.open(out / f"{name}.png").size[0] > 64
  summary = json.loads((out / "metrics.json").read_text())["runs"]
  displaced, naive = np.mean(summary["displaced"]["psnr_db"]), np.mean(summary["naive"]["psnr_db"])
  assert displaced > naive + 5, (displaced, naive)
  np.testing.assert_allclose(runs["displaced"].psnr_db, summary["displaced"]["psnr_db"], rtol=1e-6)
  assert np.load(out / "samples.npz")["single"].shape == (2, 64, 64, 3)
  sheet = Image.open(out / "comparison.png")  # 3 strategies + 2 differences, 2× enlarged
  labels = images.CHAR_WIDTH * len("circle") + 4  # rows labelled with their class: circle, ring
  assert sheet.size == (labels + 5 * (2 * 64 + 2) + 2, images.LABEL_HEIGHT + 2 * (2 * 64 + 2) + 2)


def test_converted_text_to_image_unet_runs_text_free(tmp_path, capsys, returned):
  """A converted diffusers SDXL-like UNet: stand-in prompt embeddings, latents drawn as pictures."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(0)
  unet = diffusers.UNet2DConditionModel(
      block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
      sample_size=16, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
      use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
      projection_class_embeddings_input_dim=32 + 6 * 8)
  unet.save_pretrained(tmp_path / "diffusers")
  assert commands.main(["convert", str(tmp_path / "diffusers"), str(tmp_path / "ckpt")]) == 0
  out = tmp_path / "out"
  results = returned(generate_command, "run")
  code = commands.main(["generate", "--checkpoint", str(tmp_path / "ckpt"), "--strategy", "single",
                        "exact", "--patch", "2", "--steps", "2", "--images", "2", "--out", str(out)])
  assert code == 0
  stdout = capsys.readouterr().out
  assert "text-free" in stdout
  assert results[0].runs[1].name == "exact" and np.mean(results[0].runs[1].psnr_db) > 40
  assert np.load(out / "samples.npz")["single"].shape == (2, 16, 16, 3)


@pytest.mark.parametrize("flags, message", [
    (["--patch", "3"], "valid patch counts: [1, 2, 4, 8]"),
    (["--groupnorm", "async"], "unknown GroupNorm mode 'async'"),
    (["--cfg", "2", "--patch", "8"], "pass --devices 16"),
    (["--steps", "0"], "steps=0"),
    (["--strategy", "naive", "naive"], "more than once"),
])
def test_bad_flags_get_a_clear_error(tmp_path, capsys, flags, message):
  out = tmp_path / "out"
  assert commands.main(["generate", "--out", str(out), *flags]) == 2
  err = capsys.readouterr().err
  assert "dfjax generate: error:" in err and message in err
  assert "Traceback" not in err and not out.exists()


def test_unknown_strategy_is_refused_with_the_registered_choices(tmp_path, capsys):
  out = tmp_path / "out"
  with pytest.raises(SystemExit) as exit_info:
    commands.main(["generate", "--out", str(out), "--strategy", "single", "bogus"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert "dfjax generate: error:" in err and "invalid choice: 'bogus'" in err
  assert all(repr(name) in err for name in strategy_names()) and not out.exists()


def test_default_patch_uses_the_devices_the_height_allows():
  from models.config import UNetConfig
  four_levels = UNetConfig(block_out_channels=(8, 8, 8, 8), norm_num_groups=4,
                           down_block_types=("DownBlock2D",) * 4, up_block_types=("UpBlock2D",) * 4)
  assert four_levels.valid_row_splits(64) == [1, 2, 4, 8]
  assert generation.resolve_patch(four_levels, 64, None, 1, 8) == 8
  assert generation.resolve_patch(four_levels, 64, None, 2, 8) == 4
  assert generation.resolve_patch(four_levels, 64, None, 1, 16) == 8  # 64 rows allow no more
  assert generation.resolve_patch(four_levels, 64, None, 1, 6) == 4


def test_noise_of_an_image_does_not_depend_on_the_batch():
  np.testing.assert_array_equal(initial_noise(3, 2, 8, 8, 3), initial_noise(3, 5, 8, 8, 3)[:2])


def test_latent_pictures_share_the_reference_scale():
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  pictures = images.latents_to_images(latents)
  assert pictures.shape == (2, 8, 8, 3) and pictures.min() >= -1 and pictures.max() <= 1
  np.testing.assert_array_equal(images.latents_to_images(latents, latents), pictures)
  assert not np.array_equal(images.latents_to_images(latents * 2, latents), pictures)
