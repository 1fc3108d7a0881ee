"""Conversion diffusers → dfjax checkpoint → NNX model: parity with diffusers, and every refusal.

Tiny random diffusers UNets are saved with `save_pretrained` in each layout diffusers writes
(one file, shards, fp16 variant, pipeline folder), converted, loaded and run against diffusers.
"""

import copy
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import convert.convert as convert_module  # noqa: E402
from convert import convert_checkpoint, convert_state_dict, find_source, read_tensors  # noqa: E402
from convert.keymap import conv_to_kernel, linear_to_kernel, source_key_for  # noqa: E402
from dfjax.loading import load_model, load_scheduler_config  # noqa: E402
from models.build import unet_param_shapes  # noqa: E402

_TINY = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
             cross_attention_dim=32, sample_size=16)
CONFIGS = {
    # SD1.x-like: conv proj_in/proj_out (use_linear_projection=False), one head size.
    "sd": dict(_TINY, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8),
    # SDXL-like: linear projections, 2 transformer layers, text_time micro-conditioning.
    "sdxl": dict(_TINY, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                 transformer_layers_per_block=(1, 2), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=32 + 6 * 8),
}
WEIGHTS = "diffusion_pytorch_model.safetensors"


# ---------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def torch_unets():
  """name → (random diffusers UNet in fp32, eval mode)."""
  torch.manual_seed(0)
  unets = {}
  for name, config in CONFIGS.items():
    unet = diffusers.UNet2DConditionModel(**config).eval()
    with torch.no_grad():  # random norms and biases too, so a swapped scale/bias shows
      for p in unet.parameters():
        p.add_(0.1 * torch.randn_like(p))
    unets[name] = unet
  return unets


@pytest.fixture(scope="module")
def saved(torch_unets, tmp_path_factory):
  """Folders as diffusers writes them: {"sd": UNet folder, "sdxl": …, "sharded": …,
  "both": fp32 + fp16 variant, "pipeline": model_index.json + unet/ (sharded) + scheduler/}."""
  root = tmp_path_factory.mktemp("diffusers")
  for name, unet in torch_unets.items():
    unet.save_pretrained(root / name)
  sd = torch_unets["sd"]
  sd.save_pretrained(root / "sharded", max_shard_size="200KB")
  sd.save_pretrained(root / "both")
  copy.deepcopy(sd).half().save_pretrained(root / "both", variant="fp16")
  sd.save_pretrained(root / "pipeline" / "unet", max_shard_size="200KB")
  diffusers.DDIMScheduler(beta_schedule="scaled_linear").save_pretrained(root / "pipeline" / "scheduler")
  (root / "pipeline" / "model_index.json").write_text(json.dumps(
      {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
       "scheduler": ["diffusers", "DDIMScheduler"]}))
  return {name: root / name for name in ("sd", "sdxl", "sharded", "both", "pipeline")}


@pytest.fixture(scope="module")
def converted(saved, tmp_path_factory):
  """The tiny SD UNet converted once, for the tests that only load or compare."""
  return convert_checkpoint(saved["sd"], tmp_path_factory.mktemp("ckpt") / "sd")


@pytest.fixture(scope="module")
def reference_params(converted):
  """path → numpy param of the converted tiny SD UNet."""
  return _params(load_model(converted))


def _inputs(name: str, batch: int = 2):
  """Random (x NCHW, t, context, added) for the tiny configs, as numpy float32."""
  rng = np.random.default_rng(1)
  x = rng.standard_normal((batch, 4, 16, 16), dtype=np.float32)
  t = np.array([10, 700][:batch], dtype=np.int32)
  context = rng.standard_normal((batch, 7, 32), dtype=np.float32)
  added = {}
  if name == "sdxl":
    added = {"text_embeds": rng.standard_normal((batch, 32), dtype=np.float32),
             "time_ids": np.tile(np.array([16, 16, 0, 0, 16, 16], np.float32), (batch, 1))}
  return x, t, context, added


def _torch_out(unet, name):
  x, t, context, added = _inputs(name)
  kwargs = {"added_cond_kwargs": {k: torch.from_numpy(v) for k, v in added.items()}} if added else {}
  with torch.no_grad():
    out = unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(context), **kwargs)
  return out.sample.numpy().transpose(0, 2, 3, 1)  # NCHW → NHWC


@nnx.jit
def _forward(model, x, t, context, **added):
  return model(x, t, context, **added)


def _jax_out(model, name):
  x, t, context, added = _inputs(name)
  extra = {k: jnp.asarray(v) for k, v in added.items()}
  out = _forward(model, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(context),
                 **extra)
  return np.asarray(out, np.float32)


def _rel_err(a, b) -> float:
  return float(np.abs(a - b).max() / np.abs(b).max())


def _params(model) -> dict:
  return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _siblings(folder: Path) -> list[str]:
  return sorted(p.name for p in folder.parent.iterdir())


# ---------------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_matches_diffusers(name, torch_unets, saved, tmp_path):
  dst = convert_checkpoint(saved[name], tmp_path / "ckpt")
  model = load_model(dst)
  assert model.config is not None
  assert _rel_err(_jax_out(model, name), _torch_out(torch_unets[name], name)) <= 1e-4
  manifest = json.loads((dst / "manifest.json").read_text())
  assert manifest["dtype"] == "float32" and manifest["source"]["variant"] is None
  weights = [f for f in manifest["source"]["files"] if f["path"] == WEIGHTS]
  assert weights[0]["bytes"] == (saved[name] / WEIGHTS).stat().st_size
  assert len(weights[0]["sha256"]) == 64
  assert _siblings(dst) == ["ckpt"]  # no temporary folder left


def test_sharded_pipeline_folder_gives_same_params_and_scheduler(saved, converted, reference_params,
                                                                tmp_path):
  dst = convert_checkpoint(saved["pipeline"], tmp_path / "ckpt")
  params = _params(load_model(dst))
  assert params.keys() == reference_params.keys()
  for path, value in params.items():
    np.testing.assert_array_equal(value, reference_params[path], err_msg=str(path))
  scheduler = load_scheduler_config(dst)
  assert scheduler["_class_name"] == "DDIMScheduler"
  assert scheduler["beta_schedule"] == "scaled_linear"
  assert load_scheduler_config(converted) is None
  assert find_source(saved["pipeline"] / "unet").scheduler_config is not None  # unet/ of a pipeline
  files = {f["path"] for f in json.loads((dst / "manifest.json").read_text())["source"]["files"]}
  assert {"unet/config.json", "scheduler/scheduler_config.json",
          "unet/diffusion_pytorch_model.safetensors.index.json"} <= files
  assert sum(f.startswith("unet/diffusion_pytorch_model-") for f in files) > 1


def test_fp16_variant(saved, reference_params, torch_unets, tmp_path):
  assert find_source(saved["both"]).variant is None  # full precision preferred by default
  dst = convert_checkpoint(saved["both"], tmp_path / "ckpt", variant="fp16")
  assert json.loads((dst / "manifest.json").read_text())["dtype"] == "float16"
  model = load_model(dst, param_dtype="float32")  # fp16-rounded weights, fp32 maths
  for path, value in _params(model).items():
    rounded = reference_params[path].astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(value, rounded, err_msg=str(path))
  assert _rel_err(_jax_out(model, "sd"), _torch_out(torch_unets["sd"], "sd")) <= 1e-2


def test_dtype_cast_and_sharding(saved, tmp_path):
  dst = convert_checkpoint(saved["sd"], tmp_path / "ckpt", dtype="bf16")
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  model = load_model(dst, sharding=replicated)
  kernel = model.conv_in.kernel[...]
  assert kernel.dtype == jnp.bfloat16 and kernel.sharding == replicated
  with pytest.raises(ValueError, match="cannot hold param"):
    load_model(dst, sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))


def test_overwrite(converted, saved):
  before = json.loads((converted / "manifest.json").read_text())
  with pytest.raises(FileExistsError, match="overwrite"):
    convert_checkpoint(saved["sd"], converted)
  convert_checkpoint(saved["sharded"], converted, overwrite=True)
  after = json.loads((converted / "manifest.json").read_text())
  assert after["source"]["path"] != before["source"]["path"]
  assert _siblings(converted) == ["sd"]  # old one and temporary folder gone


def test_failure_while_writing_leaves_old_checkpoint_and_no_temp(converted, saved, monkeypatch):
  before = (converted / "manifest.json").read_text()

  def disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(convert_module, "write_manifest", disk_full)  # after params and config are written
  with pytest.raises(OSError, match="No space"):
    convert_checkpoint(saved["sharded"], converted, overwrite=True)
  with pytest.raises(OSError, match="No space"):
    convert_checkpoint(saved["sd"], converted.parent / "new")
  monkeypatch.undo()
  assert (converted / "manifest.json").read_text() == before
  assert _siblings(converted) == ["sd"]
  assert (converted / "params").is_dir()


def test_refuses_to_overwrite_what_is_not_a_checkpoint(saved, tmp_path):
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "keep.txt").write_text("precious")
  with pytest.raises(FileExistsError, match="not a dfjax checkpoint"):
    convert_checkpoint(saved["sd"], tmp_path / "notes", overwrite=True)
  with pytest.raises(ValueError, match="holds\\) the source"):
    convert_checkpoint(saved["sd"], saved["sd"], overwrite=True)
  assert (tmp_path / "notes" / "keep.txt").read_text() == "precious"


# ---------------------------------------------------------------------------------- bad sources

def _folder_with(saved, tmp_path, edit) -> Path:
  """A copy of the SD UNet folder whose tensors went through `edit(dict) -> dict`."""
  folder = tmp_path / "src"
  folder.mkdir()
  shutil.copy(saved["sd"] / "config.json", folder)
  save_file(edit(read_tensors(find_source(saved["sd"]).denoiser)), folder / WEIGHTS)
  return folder


def _assert_nothing_written(dst: Path):
  assert not dst.exists()
  assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}")]


def test_strict_key_map_lists_every_problem(saved, tmp_path):
  def edit(tensors):
    tensors["extra.weight"] = np.zeros(3, np.float32)
    del tensors["conv_in.bias"]
    tensors["conv_out.weight"] = np.zeros((4, 32, 1, 1), np.float32)
    return tensors
  src, dst = _folder_with(saved, tmp_path, edit), tmp_path / "ckpt"
  with pytest.raises(ValueError) as info:
    convert_checkpoint(src, dst)
  message = str(info.value)
  assert "extra.weight (3,)" in message
  assert "conv_in.bias (32,)" in message
  assert "conv_out.weight (4, 32, 1, 1)" in message and "(3, 3, 32, 4)" in message
  _assert_nothing_written(dst)


def test_nan_weights_refused(saved, tmp_path):
  def edit(tensors):
    tensors["conv_in.weight"][0, 0, 0, 0] = np.nan
    return tensors
  src, dst = _folder_with(saved, tmp_path, edit), tmp_path / "ckpt"
  with pytest.raises(ValueError, match="conv_in.weight .1 of 1152 values NaN/inf"):
    convert_checkpoint(src, dst)
  _assert_nothing_written(dst)


def test_corrupted_safetensors_named(saved, tmp_path):
  src = tmp_path / "src"
  shutil.copytree(saved["sd"], src)
  data = (src / WEIGHTS).read_bytes()
  (src / WEIGHTS).write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match=f"{WEIGHTS}: cannot read as safetensors"):
    convert_checkpoint(src, tmp_path / "ckpt")
  _assert_nothing_written(tmp_path / "ckpt")


def test_missing_shard_named(saved, tmp_path):
  src = tmp_path / "src"
  shutil.copytree(saved["sharded"], src)
  shard = sorted(src.glob("diffusion_pytorch_model-*.safetensors"))[1]
  shard.unlink()
  with pytest.raises(ValueError, match=f"1 are missing.*{shard.name}"):
    convert_checkpoint(src, tmp_path / "ckpt")


def test_bin_only_folder(torch_unets, tmp_path):
  torch_unets["sd"].save_pretrained(tmp_path / "src", safe_serialization=False)
  with pytest.raises(ValueError, match="safe_serialization=True"):
    convert_checkpoint(tmp_path / "src", tmp_path / "ckpt")


def test_no_weights_and_unknown_variant(saved, tmp_path):
  (tmp_path / "empty").mkdir()
  shutil.copy(saved["sd"] / "config.json", tmp_path / "empty")
  with pytest.raises(ValueError, match="no diffusion_pytorch_model.*safetensors weights"):
    convert_checkpoint(tmp_path / "empty", tmp_path / "ckpt")
  with pytest.raises(ValueError, match="no weights of variant 'bf16'; available: full precision"):
    convert_checkpoint(saved["both"], tmp_path / "ckpt", variant="bf16")


# ---------------------------------------------------------------------------------- bad loads

def test_config_weights_mismatch_at_load(converted, tmp_path):
  ckpt = tmp_path / "edited"
  shutil.copytree(converted, ckpt)
  config = json.loads((ckpt / "config.json").read_text())
  config["cross_attention_dim"] = 48
  (ckpt / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="attn2.to_k.kernel: stored \\(32, 32\\), model expects "
                                       "\\(48, 32\\)"):
    load_model(ckpt)


def test_loading_a_diffusers_folder_says_convert_first(saved, tmp_path):
  with pytest.raises(ValueError, match="dfjax convert"):
    load_model(saved["pipeline"])
  with pytest.raises(ValueError, match="not a dfjax checkpoint"):
    load_model(tmp_path)


# ---------------------------------------------------------------------------------- key map

def test_linear_and_1x1_conv_layouts_are_interchangeable():
  w = np.arange(6, dtype=np.float32).reshape(3, 2)  # Linear (O=3, I=2)
  np.testing.assert_array_equal(linear_to_kernel(w, (2, 3)), w.T)
  np.testing.assert_array_equal(linear_to_kernel(w, (1, 1, 2, 3)), w.T[None, None])
  np.testing.assert_array_equal(conv_to_kernel(w[:, :, None, None], (2, 3)), w.T)
  np.testing.assert_array_equal(conv_to_kernel(w[:, :, None, None], (1, 1, 2, 3)), w.T[None, None])


def test_key_map_renames_and_finds_duplicates():
  path = ("down_blocks", 0, "attentions", 0, "transformer_blocks", 0, "attn1", "to_out", "kernel")
  assert source_key_for(path) == "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight"
  ff = ("down_blocks", 0, "attentions", 0, "transformer_blocks", 0, "ff", "proj_in", "kernel")
  assert source_key_for(ff) == "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight"
  twin = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.weight"  # no ".0"
  with pytest.raises(ValueError, match=f"1 duplicates:\n.*and {twin} both map to"):
    convert_state_dict({source_key_for(path): np.zeros((32, 32)), twin: np.zeros((32, 32))},
                       {path: (32, 32)})


def test_class_embedding_becomes_an_embedding_table():
  config = dict(CONFIGS["sd"], num_class_embeds=10)
  state = {k: v.numpy() for k, v in diffusers.UNet2DConditionModel(**config).state_dict().items()}
  params = convert_state_dict(state, unet_param_shapes(config))
  np.testing.assert_array_equal(params["class_embedding", "embedding"], state["class_embedding.weight"])
