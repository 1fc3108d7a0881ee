"""`dfjax convert` and `dfjax.load_model` with DiT and PixArt: folders as diffusers (and the hub) write
them → dfjax checkpoint → the right model, whose `dfjax.sample` equals a diffusers loop; and every
refusal (unknown norm_type, differing per-block embedders, a pipeline without its transformer/).
"""

import json
import re
import shutil
from pathlib import Path

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file

from convert import convert_checkpoint, find_source, read_tensors
from dfjax import commands
from dfjax.loading import load_model, load_scheduler_config
from models.dit import DiTTransformer2DModel, PixArtTransformer2DModel
from test_dit import PIXARTS, TINY_DIT, call, expected_nhwc, make_pixart, nchw, perturbed
from test_convert import _assert_nothing_written as assert_nothing_written
from test_dit_sampling import (SCHEDULER, dit, dit_conditioning, dit_predict, noise, pixart_conditioning,  # noqa: F401
                               pixart_predict, reference_loop, relative_error, run)

WEIGHTS = "diffusion_pytorch_model.safetensors"
# What hub configs of DiT and PixArt (`Transformer2DModel`) hold beyond the split-out classes' keys.
HUB_KEYS = {"_class_name": "Transformer2DModel", "num_vector_embeds": None, "only_cross_attention": False,
            "use_linear_projection": False, "double_self_attention": False}


def as_hub_config(folder: Path, drop: tuple[str, ...] = ()) -> Path:
  """Rewrites the saved config.json as the hub's Transformer2DModel spelling, without the `drop` keys."""
  config = {**json.loads((folder / "config.json").read_text()), **HUB_KEYS}
  (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in drop}))
  return folder


def manifest(ckpt: Path) -> dict:
  return json.loads((ckpt / "manifest.json").read_text())


def params(model) -> dict:
  return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def dit_pipeline(dit, tmp_path_factory):
  """A DiTPipeline folder as the hub has it: model_index.json, transformer/ (Transformer2DModel config,
  sharded weights), scheduler/."""
  root = tmp_path_factory.mktemp("dit") / "pipeline"
  dit[0].save_pretrained(root / "transformer", max_shard_size="20KB")
  as_hub_config(root / "transformer")
  diffusers.DDIMScheduler(**SCHEDULER).save_pretrained(root / "scheduler")
  (root / "model_index.json").write_text(json.dumps(
      {"_class_name": "DiTPipeline", "transformer": ["diffusers", "Transformer2DModel"],
       "scheduler": ["diffusers", "DDIMScheduler"]}))
  return root


@pytest.fixture(scope="module")
def dit_checkpoint(dit_pipeline, tmp_path_factory):
  return convert_checkpoint(dit_pipeline, tmp_path_factory.mktemp("ckpt") / "dit")


# ---------------------------------------------------------------------------------- round trips

def test_dit_pipeline_converts_loads_and_samples_like_diffusers(dit, dit_pipeline, dit_checkpoint, noise):
  model = load_model(dit_checkpoint)
  assert type(model) is DiTTransformer2DModel
  record = manifest(dit_checkpoint)
  assert record["model"] == "DiTTransformer2DModel"
  notes = record["components"]["transformer"]["notes"]
  assert any("Transformer2DModel with norm_type 'ada_norm_zero'" in n for n in notes), notes
  assert any(f"repeated in {TINY_DIT['num_layers']} blocks, checked identical, kept once" in n for n in notes), notes
  assert sum(f["path"].startswith("transformer/diffusion_pytorch_model-") for f in record["source"]["files"]) > 1
  scheduler_config = load_scheduler_config(dit_checkpoint)
  assert scheduler_config["_class_name"] == "DDIMScheduler"
  cond, uncond = dit_conditioning()
  expected = reference_loop(dit_predict(dit[0], cond, uncond), noise, "euler", scheduler_config)
  got = run(model, noise, cond, uncond, scheduler="euler", scheduler_config=scheduler_config)
  assert relative_error(got, expected) <= 1e-4


def test_pixart_alpha_hub_folder_gets_its_size_conditions_from_the_weights(noise, tmp_path):
  torch_pixart, _ = make_pixart("alpha")
  torch_pixart.save_pretrained(tmp_path / "alpha")
  # diffusers would decide from sample_size=8 that there are no size conditions; the weights have them
  src = as_hub_config(tmp_path / "alpha", drop=("use_additional_conditions",))
  ckpt = convert_checkpoint(src, tmp_path / "ckpt")
  model = load_model(ckpt)
  assert type(model) is PixArtTransformer2DModel and model.config.use_additional_conditions
  assert json.loads((ckpt / "config.json").read_text())["use_additional_conditions"] is True
  notes = manifest(ckpt)["components"]["transformer"]["notes"]
  assert any("use_additional_conditions: not in the config; set to True" in n for n in notes), notes
  cond, uncond = pixart_conditioning()
  expected = reference_loop(pixart_predict(torch_pixart, cond, uncond), noise, "dpmpp_2m")
  assert relative_error(run(model, noise, cond, uncond, scheduler="dpmpp_2m"), expected) <= 1e-4


def test_pixart_sigma_without_the_key_has_no_size_conditions_because_its_weights_have_none(tmp_path):
  # sample_size 128 is where diffusers' own default switches the size conditions on (the 1024² α models)
  torch_sigma = perturbed(diffusers.PixArtTransformer2DModel(**{**PIXARTS["sigma"], "sample_size": 128}))
  torch_sigma.save_pretrained(tmp_path / "sigma")
  src = as_hub_config(tmp_path / "sigma", drop=("use_additional_conditions",))
  model = load_model(convert_checkpoint(src, tmp_path / "ckpt"))
  assert model.config.use_additional_conditions is False
  rng = np.random.default_rng(3)
  x, text = rng.standard_normal((2, 8, 8, 4), np.float32), rng.standard_normal((2, 5, 12), np.float32)
  t = np.array([20.0, 700.0], np.float32)
  with torch.no_grad():
    expected = expected_nhwc(torch_sigma(nchw(x), encoder_hidden_states=torch.from_numpy(text),
                                         timestep=torch.from_numpy(t), added_cond_kwargs=None).sample)
  got = call(model, jnp.asarray(x), jnp.asarray(t), encoder_hidden_states=jnp.asarray(text))
  assert relative_error(got, expected) <= 1e-4


def test_cli_converts_a_dit_folder_into_the_keymaps_params(dit, tmp_path, capsys):
  torch_dit, reference = dit
  torch_dit.save_pretrained(tmp_path / "dit")
  assert commands.main(["convert", str(tmp_path / "dit"), str(tmp_path / "ckpt")]) == 0
  assert "wrote dfjax checkpoint" in capsys.readouterr().out
  loaded, expected = params(load_model(tmp_path / "ckpt")), params(reference)
  assert loaded.keys() == expected.keys() and ("emb", "class_embedder", "embedding_table", "embedding") in loaded
  for path, value in loaded.items():
    np.testing.assert_array_equal(value, expected[path], err_msg=str(path))


def test_edited_dit_config_does_not_fit_its_weights(dit_checkpoint, tmp_path):
  ckpt = tmp_path / "edited"
  shutil.copytree(dit_checkpoint, ckpt)
  config = json.loads((ckpt / "config.json").read_text())
  (ckpt / "config.json").write_text(json.dumps({**config, "num_layers": 1}))
  with pytest.raises(ValueError, match=r"transformer_blocks\.1\.attn1\.to_q\.kernel: stored, but not in the model"):
    load_model(ckpt)


# ---------------------------------------------------------------------------------- refusals

def refusal(src: Path, dst: Path) -> str:
  """The message of the ValueError converting `src` into `dst` raises, after checking nothing was written."""
  with pytest.raises(ValueError) as info:
    convert_checkpoint(src, dst)
  assert_nothing_written(dst)
  return str(info.value)


def dit_folder_with(dit_pipeline: Path, tmp_path: Path, edit) -> Path:
  """A DiT folder whose tensors went through `edit(dict) -> dict`."""
  folder = tmp_path / "src"
  folder.mkdir()
  shutil.copy(dit_pipeline / "transformer" / "config.json", folder)
  save_file(edit(read_tensors(find_source(dit_pipeline).denoiser)), folder / WEIGHTS)
  return folder


def test_differing_per_block_embedders_are_refused(dit_pipeline, tmp_path):
  def edit(tensors):
    tensors["transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"] += 1.0
    del tensors["transformer_blocks.0.norm1.emb.timestep_embedder.linear_2.bias"]
    return tensors
  message = refusal(dit_folder_with(dit_pipeline, tmp_path, edit), tmp_path / "ckpt")
  assert "are not identical copies" in message
  assert "norm1.emb.class_embedder.embedding_table.weight: blocks [1] differ from block 0" in message
  assert "norm1.emb.timestep_embedder.linear_2.bias: blocks [0] lack it" in message


def test_strict_dit_keymap_lists_every_problem(dit_pipeline, tmp_path):
  def edit(tensors):
    tensors["pos_embed.extra.weight"] = np.zeros(3, np.float32)
    del tensors["proj_out_2.bias"]
    tensors["proj_out_1.weight"] = tensors["proj_out_1.weight"][:, :4]
    return tensors
  message = refusal(dit_folder_with(dit_pipeline, tmp_path, edit), tmp_path / "ckpt")
  assert "1 unknown source keys:\n  pos_embed.extra.weight (3,)" in message
  assert "1 missing params:\n  proj_out_2.bias (32,) (from checkpoint key proj_out_2.bias)" in message
  assert "proj_out_1.weight (32, 4) → proj_out_1.kernel: got (4, 32)" in message


@pytest.mark.parametrize("config, error", [
    ({"_class_name": "Transformer2DModel", "norm_type": "layer_norm"},
     r"Transformer2DModel with norm_type='layer_norm', which dfjax does not map .*'ada_norm_zero' → "
     r"DiTTransformer2DModel, 'ada_norm_single' → PixArtTransformer2DModel"),
    ({"_class_name": "ControlNetModel"},
     r"describes a ControlNetModel, which dfjax does not build; it converts UNet2DConditionModel, "
     r"DiTTransformer2DModel, PixArtTransformer2DModel, .*CLIPTextModel.*T5EncoderModel and Transformer2DModel "
     r"configs"),
    ({"_class_name": "DiTTransformer2DModel", "norm_type": "ada_norm_single"},
     r"DiT config norm_type='ada_norm_single' is not supported by dfjax; supported values: 'ada_norm_zero'"),
], ids=["norm_type", "class", "dit-norm"])
def test_configs_dfjax_does_not_build_are_named(dit_pipeline, tmp_path, config, error):
  src = tmp_path / "src"
  shutil.copytree(dit_pipeline / "transformer", src)
  original = json.loads((src / "config.json").read_text())
  (src / "config.json").write_text(json.dumps({**original, **config}))
  assert re.search(error, refusal(src, tmp_path / "ckpt"))


def test_pipeline_without_its_transformer_folder_says_what_to_copy(dit_pipeline, tmp_path):
  src = tmp_path / "pipeline"
  shutil.copytree(dit_pipeline, src, ignore=shutil.ignore_patterns("transformer"))
  assert re.search(r"names a transformer \(Transformer2DModel\), but .*transformer/config.json is missing: copy "
                   r"the pipeline's whole transformer/ folder", refusal(src, tmp_path / "ckpt"))
  (src / "model_index.json").write_text(json.dumps({"_class_name": "X", "vae": ["diffusers", "AutoencoderKL"]}))
  assert "names no denoiser (unet or transformer; it lists vae)" in refusal(src, tmp_path / "ckpt")
