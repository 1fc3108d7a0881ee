"""`dfjax generate` end to end through the CLI (files written, metrics printed, bad flags refused), and what
it checks before and after the work: the output location first, no NaN images, metrics.json valid JSON."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dfjax import commands, generation, images, metrics
from dfjax.bench import fidelity
from dfjax.bench.unet import random_unet
from dfjax.commands import generate as generate_command
from dfjax.generation import GenerateConfig, StrategyRun
from dfjax.inputs import initial_noise, standin_conditioning
from dfjax.sampling import Conditioning
from models.config import UNetConfig
from sharding.accounting import comm
from sharding.strategies import strategy_names


def test_embedded_model_end_to_end(tmp_path, capsys, returned):
  """The shipped UNet: PNGs written, PSNR printed, displaced much closer to single than naive, ring
  equal to single; ulysses, among the default strategies, skipped (the UNet's 1-head attention), pipefusion
  not considered (it runs transformers), asyncdiff on its own 4-device stage axis of each guidance half."""
  out = tmp_path / "out"
  results = returned(generate_command, "run")
  # 3 of 5 steps warm: after 1 or 2 the retrained model's displaced images are still far from single
  # (18.5 dB at 2 of 8, naive 9.5); at 3 of 8 they are 27.9 dB. Two stale steps follow, as many as a
  # displaced step's stale exchanges need to show (the warm-up's, then a stale step's own).
  code = commands.main(["generate", "--num-steps", "5", "--warmup-steps", "3", "--images", "2", "--cfg",
                        "2", "--patch", "4", "--out", str(out)])
  assert code == 0
  stdout = capsys.readouterr().out
  runs = {run.name: run for run in results[0].runs}
  assert list(runs) == ["single", "displaced", "ring", "naive", "asyncdiff"]
  assert list(results[0].skipped) == ["ulysses"] and "does not divide the 1 heads" in results[0].skipped["ulysses"]
  assert "skipped ulysses" in stdout and np.mean(runs["ring"].psnr_db) > 50
  assert runs["single"].mesh == "cfg=2×patch=1" and runs["naive"].mesh == "cfg=2×patch=4"
  assert runs["asyncdiff"].mesh == "cfg=2×stage=4×patch=1 (stride 1, warm-up 3)"
  assert "embedded unet" in stdout and "machine: cpu × 8" in stdout and "PSNR dB" in stdout  # the table
  for name in ("single", "displaced", "naive", "comparison"):
    assert Image.open(out / f"{name}.png").size[0] > 64
  summary = json.loads((out / "metrics.json").read_text())["runs"]
  displaced, naive = np.mean(summary["displaced"]["psnr_db"]), np.mean(summary["naive"]["psnr_db"])
  assert displaced > naive + 5, (displaced, naive)
  np.testing.assert_allclose(runs["displaced"].psnr_db, summary["displaced"]["psnr_db"], rtol=1e-6)
  assert np.load(out / "samples.npz")["single"].shape == (2, 64, 64, 3)
  sheet = Image.open(out / "comparison.png")  # 5 strategies + 4 differences, 2× enlarged
  labels = images.CHAR_WIDTH * len("circle") + 4  # rows labelled with their class: circle, ring
  assert sheet.size == (labels + 9 * (2 * 64 + 2) + 2, images.LABEL_HEIGHT + 2 * (2 * 64 + 2) + 2)


@pytest.mark.slow  # 46 s; the UNet end-to-end run covers generate, the DiT strategies their own tests
def test_embedded_dit_end_to_end(tmp_path, capsys, returned):
  """The shipped DiT with every default strategy (its 8 heads split over 8 devices; pipefusion and asyncdiff
  on 4 stage devices): ulysses and ring equal single, displaced (stale K/V after one warm-up step) much
  closer to it than naive."""
  out = tmp_path / "out"
  results = returned(generate_command, "run")
  assert commands.main(["generate", "--model", "dit", "--num-steps", "6", "--warmup-steps", "1", "--images", "2",
                        "--out", str(out)]) == 0
  stdout = capsys.readouterr().out
  runs = {run.name: run for run in results[0].runs}
  assert list(runs) == ["single", "displaced", "ulysses", "ring", "naive", "pipefusion", "asyncdiff"]
  assert not results[0].skipped and runs["pipefusion"].mesh == "cfg=1×stage=4×patch=1 (N patches, warm-up 1)"
  assert runs["ulysses"].mesh == "cfg=1×patch=8" and "embedded dit" in stdout
  assert np.mean(runs["ulysses"].psnr_db) > 50 and np.mean(runs["ring"].psnr_db) > 50
  displaced, naive = np.mean(runs["displaced"].psnr_db), np.mean(runs["naive"].psnr_db)
  assert displaced > naive + 5, (displaced, naive)
  assert np.load(out / "samples.npz")["ulysses"].shape == (2, 64, 64, 3)


def test_standin_conditioning_fits_dit_and_pixart():
  """Stand-in inputs for transformer configs: class 0 and the DiT's null class for the unconditional
  half; PixArt-α's text states, resolution and aspect ratio, which its forward accepts."""
  from flax import nnx

  from models.dit import DiTConfig, PixArtConfig, PixArtTransformer2DModel
  dit = DiTConfig(num_attention_heads=2, attention_head_dim=8, num_layers=1, sample_size=8, num_embeds_ada_norm=5)
  cond, uncond = (standin_conditioning(dit, 3, (64, 64), zeros=zeros) for zeros in (False, True))
  np.testing.assert_array_equal(cond.class_labels, [0, 0, 0])
  np.testing.assert_array_equal(uncond.class_labels, [5, 5, 5])
  assert cond.encoder_hidden_states is None
  pixart = PixArtConfig(num_attention_heads=2, attention_head_dim=12, num_layers=1, sample_size=8, in_channels=4,
                        out_channels=8, cross_attention_dim=24, caption_channels=16, use_additional_conditions=True)
  fields = standin_conditioning(pixart, 2, (64, 32), tokens=5)
  np.testing.assert_array_equal(fields.resolution, [[64, 32], [64, 32]])
  np.testing.assert_allclose(fields.aspect_ratio, [[2.0], [2.0]])
  kwargs = {k: v for k, v in vars(fields).items() if v is not None}
  forward = lambda: PixArtTransformer2DModel(pixart, rngs=nnx.Rngs(0))(jnp.zeros((2, 8, 4, 4)), 10, **kwargs)
  assert nnx.eval_shape(forward).shape == (2, 8, 4, 8)  # traced, not compiled: the inputs fit


@pytest.mark.slow  # 22 s
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
    (["--strategies", "single", "ulysses"], "does not divide the 1 heads"),  # named: refused, not skipped
    (["--model", "dit", "--strategies", "single", "ulysses", "--cfg", "2", "--patch", "3"], "valid patch counts"),
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


def _strict_json(text: str):
  """JSON as the standard defines it: no NaN, Infinity or -Infinity."""
  return json.loads(text, parse_constant=lambda name: pytest.fail(f"metrics.json holds a bare {name}"))


def test_metrics_json_is_valid_json_when_images_are_identical(tmp_path):
  pictures = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3))
  other = pictures.copy()
  other[1, 0, 0] = -pictures[1, 0, 0]  # image 0 identical, image 1 not
  psnr_b = metrics.psnr(metrics.to_unit_range(other), metrics.to_unit_range(pictures))
  ssim_b = metrics.ssim(metrics.to_unit_range(other), metrics.to_unit_range(pictures))
  runs = [StrategyRun("single", "cfg=1×patch=1", 1.0, 2.0, pictures, None, None),
          StrategyRun("exact", "cfg=1×patch=2", 1.0, 2.0, other, psnr_b, ssim_b)]
  generation.write_outputs(tmp_path, runs, ["a", "b"])
  summary = _strict_json((tmp_path / "metrics.json").read_text())["runs"]
  assert summary["single"]["psnr_db"] is None and summary["single"]["identical"] is None
  exact = summary["exact"]
  assert exact["psnr_db"][0] is None and exact["identical"] == [True, False]
  assert exact["psnr_db"][1] > 20 and exact["ssim"][0] == 1.0


TINY_UNET = UNetConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                       num_attention_heads=2, cross_attention_dim=8, sample_size=8,
                       down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))


def _poisoned_source() -> generation.Source:
  """A tiny latent-space UNet whose output is NaN (its last conv's bias is)."""
  unet = random_unet(TINY_UNET, jnp.float32)
  unet.conv_out.bias.set_value(jnp.full_like(unet.conv_out.bias.get_value(), jnp.nan))
  text = np.random.default_rng(0).standard_normal((2, 3, 8), np.float32)
  return generation.Source(unet, None, Conditioning(text), Conditioning(np.zeros_like(text)), ["a", "b"],
                           pixel_space=False, description="tiny UNet")


def test_generate_fails_at_the_first_bad_step_and_writes_nothing(tmp_path, monkeypatch):
  monkeypatch.setattr(generation, "embedded_source", lambda count, name: _poisoned_source())
  out = tmp_path / "out"
  config = GenerateConfig(strategies=("single", "exact"), patch=2, steps=2, out=str(out))  # fails in single
  message = r"single on cfg=1×patch=1: the latents became NaN or infinite at step 0 of 2"
  with pytest.raises(FloatingPointError, match=message):
    generation.generate(config, progress=False)
  assert not out.exists()


def test_generate_checks_the_output_folder_before_loading_the_model(tmp_path, monkeypatch):
  monkeypatch.setattr(generation, "embedded_source", lambda count, name: pytest.fail("the model was loaded"))
  a_file = tmp_path / "taken"
  a_file.write_text("the user's file")
  with pytest.raises(NotADirectoryError, match="the output folder is a file") as error:
    generation.generate(GenerateConfig(out=str(a_file)), progress=False)
  assert error.value.filename == str(a_file) and a_file.read_text() == "the user's file"
  with pytest.raises(NotADirectoryError, match="a file is on its way") as error:
    generation.generate(GenerateConfig(out=str(a_file / "out")), progress=False)
  assert error.value.filename == str(a_file)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders")
def test_generate_refuses_a_read_only_folder_before_loading_the_model(tmp_path, monkeypatch):
  monkeypatch.setattr(generation, "embedded_source", lambda count, name: pytest.fail("the model was loaded"))
  tmp_path.chmod(0o555)
  try:
    with pytest.raises(PermissionError, match="permission denied"):
      generation.generate(GenerateConfig(out=str(tmp_path / "out")), progress=False)
  finally:
    tmp_path.chmod(0o755)


def test_bench_fidelity_checks_its_json_path_before_measuring(tmp_path, monkeypatch):
  monkeypatch.setattr(fidelity, "measure", lambda *a, **k: pytest.fail("measured"))
  with pytest.raises(IsADirectoryError, match="the output file is a folder"):
    fidelity.run(fidelity.FidelityConfig(), json_out=str(tmp_path))


def test_fidelity_rows_are_valid_json_when_images_are_identical():
  psnr_db, ssim = np.array([np.inf, 30.0]), np.array([1.0, 0.9])  # seed 0 identical to single's
  row = fidelity.Row("main", "displaced", "corrected_async", 2, 4, psnr_db, ssim, 1.0, 2.0)
  as_json = _strict_json(json.dumps(row.to_json(), allow_nan=False))
  assert as_json["psnr_db"] == [None, 30.0] and as_json["identical"] == [True, False]
  assert as_json["psnr_mean"] is None and as_json["ssim_mean"] == pytest.approx(0.95)


# ------------------------------------------------------------------------- each strategy's own mesh

def tiny_dit_source(images: int = 2) -> generation.Source:
  """A random class-conditional pixel-space DiT, small enough to compile in seconds: 4 heads, 2 blocks,
  4 token rows (16 pixels, patch 4)."""
  from models.dit import DiTConfig
  config = DiTConfig(num_attention_heads=4, attention_head_dim=4, num_layers=2, in_channels=3, out_channels=3,
                     sample_size=16, patch_size=4, num_embeds_ada_norm=10)
  dit = random_unet(config, jnp.float32)
  labels = np.arange(images) % 10
  return generation.Source(dit, None, Conditioning(class_labels=labels),
                           Conditioning(class_labels=np.full(images, config.null_class)),
                           [f"class {k}" for k in labels], pixel_space=True, description="tiny DiT")


def test_each_strategy_runs_on_its_own_mesh(tmp_path, monkeypatch):
  """tensor really splits over `tensor` (4: the most of the 8 devices its 4 heads allow), usp over both
  `patch` and `ulysses`, pipefusion over `stage` (2: the DiT's 2 blocks): the reported meshes, the traffic
  by axis read from each compiled program, and every one equal to single (pipefusion fully warmed up)."""
  monkeypatch.setattr(generation, "embedded_source", lambda count, name: tiny_dit_source(count))
  meshes, traffic = [], []
  prepare, compile_and_time = generation.prepare_sample, generation.compile_and_time

  def prepared(*args, mesh, **kwargs):
    meshes.append(dict(mesh.shape))
    return prepare(*args, mesh=mesh, **kwargs)

  def compiled(lowered, *args, **kwargs):
    timed = compile_and_time(lowered, *args, **kwargs)
    phases = comm.traffic_by_axis(timed.compiled.as_text(), meshes[-1])  # {"patch+ulysses": bytes, …} per phase
    traffic.append({axis for phase in phases for axes in phase for axis in axes.split("+")})
    return timed

  monkeypatch.setattr(generation, "prepare_sample", prepared)
  monkeypatch.setattr(generation, "compile_and_time", compiled)
  # 3 steps: PipeFusion's first step is a phase of its own, and the traffic is read from the loop of the others
  config = GenerateConfig(strategies=("single", "tensor", "usp", "pipefusion"), steps=3, warmup_steps=2, images=2,
                          guidance_scale=1.0, out=str(tmp_path / "out"))
  runs = {run.name: run for run in generation.generate(config, progress=False).runs}
  assert [run.mesh for run in runs.values()] == [
      "cfg=1×patch=1", "cfg=1×patch=1×tensor=4", "cfg=1×patch=2×ulysses=2",
      "cfg=1×stage=2×patch=1 (N patches, warm-up 2)"]
  assert [m["tensor"] for m in meshes] == [1, 4, 1, 1] and meshes[2]["ulysses"] == meshes[2]["patch"] == 2
  assert traffic[0] <= {"none"} and traffic[1] == {"tensor"} and {"patch", "ulysses"} <= traffic[2]
  assert "stage" in traffic[3]
  for name in ("tensor", "usp", "pipefusion"):
    assert np.mean(runs[name].psnr_db) > 50, name


def test_default_device_counts_shrink_to_what_fits_and_given_ones_are_kept_or_refused():
  """No compiling: the meshes of the embedded models' configs. A default count shrinks (pipefusion to the DiT's
  4 blocks; tensor to a degree of the tiny DiT's 4 heads); a given one is used as given, or refused, naming the
  fix; a default strategy that fits no count is skipped with the reason, a named one raises it."""
  from dfjax.training import load_default_model
  dit, unet = (load_default_model(name).denoiser.config for name in ("dit", "unet"))
  strategies = lambda *names: [GenerateConfig().strategy(n) for n in names]  # noqa: E731
  meshes, skipped = generation.strategy_meshes(strategies("pipefusion", "asyncdiff", "tensor"), dit, 64,
                                               GenerateConfig(model="dit"), 8)
  assert {name: dict(mesh.shape)["stage"] for name, mesh in meshes.items()} == {"pipefusion": 4, "asyncdiff": 4,
                                                                                "tensor": 1}
  assert dict(meshes["tensor"].shape)["tensor"] == 8 and not skipped
  with pytest.raises(ValueError, match="4 blocks cannot fill 8 stages"):
    generation.strategy_meshes(strategies("pipefusion"), dit, 64, GenerateConfig(strategies=("pipefusion",), stage=8), 8)
  tiny = tiny_dit_source().unet.config
  meshes, _ = generation.strategy_meshes(strategies("tensor"), tiny, 16, GenerateConfig(patch=4), 8)
  assert dict(meshes["tensor"].shape)["tensor"] == 4
  meshes, skipped = generation.strategy_meshes(strategies("tensor", "usp", "asyncdiff"), unet, 64,
                                               GenerateConfig(cfg=2), 8)
  assert list(meshes) == ["asyncdiff"] and dict(meshes["asyncdiff"].shape)["cfg"] == 2
  assert "tensor=4 does not divide" in skipped["tensor"] and "valid tensor degrees: 1" in skipped["tensor"]
  assert "ulysses" in skipped["usp"]
  with pytest.raises(ValueError, match="tensor=8 does not divide"):
    generation.strategy_meshes(strategies("tensor"), unet, 64, GenerateConfig(strategies=("tensor",)), 8)
