"""Checkpoint integrity: the manifest's sha256s catch a flipped bit, missing or unreadable orbax
files and manifests give one clear ValueError, non-finite weights are refused, and checkpoints
written before hashes were recorded still load (with a warning)."""

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from convert import convert_checkpoint  # noqa: E402
from dfjax.loading import load_model  # noqa: E402
from dfjax.training.default_model import default_model_dir  # noqa: E402

TINY = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
            sample_size=16, attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  root = tmp_path_factory.mktemp("integrity")
  torch.manual_seed(0)
  diffusers.UNet2DConditionModel(**TINY).save_pretrained(root / "src")
  return convert_checkpoint(root / "src", root / "ckpt")


@pytest.fixture
def ckpt(converted, tmp_path):
  """A fresh copy of the converted checkpoint, to damage."""
  return Path(shutil.copytree(converted, tmp_path / "ckpt"))


def _largest_data_file(ckpt: Path) -> Path:
  return max((f for f in (ckpt / "params").rglob("*") if f.is_file() and f.parent.name == "d"),
             key=lambda f: f.stat().st_size)


def _flip_bit(file: Path, offset: int) -> None:
  data = bytearray(file.read_bytes())
  data[offset] ^= 0x04
  file.write_bytes(bytes(data))


def _hashes(folder: Path, top: str) -> dict[str, str]:
  """Independent reference: relative path → sha256 of every file under folder/top."""
  out = {}
  for root, _, names in os.walk(folder / top):
    for name in names:
      file = Path(root) / name
      out[file.relative_to(folder).as_posix()] = hashlib.sha256(file.read_bytes()).hexdigest()
  return out


def _drop_hashes(ckpt: Path) -> None:
  manifest = json.loads((ckpt / "manifest.json").read_text())
  del manifest["files"]
  (ckpt / "manifest.json").write_text(json.dumps(manifest))


# ---------------------------------------------------------------------------------- what is recorded

def test_manifest_records_every_params_file_and_the_config(converted):
  files = json.loads((converted / "manifest.json").read_text())["files"]
  expected = {**_hashes(converted, "params"),
              "config.json": hashlib.sha256((converted / "config.json").read_bytes()).hexdigest()}
  assert {path: record["sha256"] for path, record in files.items()} == expected
  assert all(record["bytes"] == (converted / path).stat().st_size for path, record in files.items())


def test_shipped_model_manifest_covers_its_files():
  folder = default_model_dir()
  files = json.loads((folder / "manifest.json").read_text())["files"]
  expected = {**_hashes(folder, "params"), **_hashes(folder, "class_tokens")}
  for name in ("config.json", "scheduler_config.json", "class_tokens.json"):
    expected[name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
  assert {path: record["sha256"] for path, record in files.items()} == expected


def test_loading_writes_nothing(converted):
  before = _hashes(converted, ".")
  load_model(converted)
  assert _hashes(converted, ".") == before


# ---------------------------------------------------------------------------------- damage

def test_flipped_bit_in_params_names_checkpoint_and_file(ckpt):
  data = _largest_data_file(ckpt)
  _flip_bit(data, data.stat().st_size // 2)
  name = data.relative_to(ckpt).as_posix()
  with pytest.raises(ValueError, match=f"checkpoint {ckpt} is damaged.*{name}: contents changed"):
    load_model(ckpt)


def test_flipped_bit_in_orbax_metadata(ckpt):
  _flip_bit(ckpt / "params" / "_METADATA", 10)
  with pytest.raises(ValueError, match="params/_METADATA: contents changed"):
    load_model(ckpt)
  with pytest.raises(ValueError, match=f"checkpoint params are unreadable or incomplete: {ckpt}/params "
                                       "\\(.*\\); re-run dfjax convert"):
    load_model(ckpt, verify=False)


@pytest.mark.parametrize("verify", [True, False])
def test_missing_orbax_files(ckpt, verify):
  data = _largest_data_file(ckpt)
  data.unlink()
  with pytest.raises(ValueError, match="params are unreadable or incomplete: .*re-run dfjax convert"):
    load_model(ckpt, verify=verify)
  (ckpt / "params" / "_METADATA").unlink()
  with pytest.raises(ValueError, match="checkpoint params are unreadable or incomplete"):
    load_model(ckpt, verify=verify)
  shutil.rmtree(ckpt / "params")
  with pytest.raises(ValueError, match=f"unreadable or incomplete: {ckpt} lacks params"):
    load_model(ckpt, verify=verify)


def test_manifest_that_is_not_json(ckpt):
  (ckpt / "manifest.json").write_text('{"format": "dfjax-checkpoint", ')
  with pytest.raises(ValueError, match="manifest.json is not valid JSON"):
    load_model(ckpt)


def test_edited_config_that_still_fits_the_weights(ckpt):
  config = json.loads((ckpt / "config.json").read_text())
  config["norm_eps"] = 1e-3
  (ckpt / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="config.json changed since the checkpoint was written"):
    load_model(ckpt)
  assert load_model(ckpt, verify=False).config is not None


def _write_nan_weight(ckpt: Path) -> None:
  """Rewrites params/ with one NaN (bypassing the writer's checks) and drops the stale hashes."""
  with ocp.StandardCheckpointer() as checkpointer:
    tree = checkpointer.restore((ckpt / "params").absolute())
  tree["conv_in"]["kernel"] = np.array(tree["conv_in"]["kernel"])
  tree["conv_in"]["kernel"][0, 0, 0, :3] = [np.nan, np.inf, 0.0]
  shutil.rmtree(ckpt / "params")
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save((ckpt / "params").absolute(), tree)
  _drop_hashes(ckpt)


def test_non_finite_weights_named(ckpt):
  _write_nan_weight(ckpt)
  with pytest.raises(ValueError, match="1 params hold NaN or inf .*conv_in.kernel \\(2 values\\)"):
    load_model(ckpt)
  assert not np.isfinite(np.asarray(load_model(ckpt, verify=False).conv_in.kernel[...])).all()


def test_old_checkpoint_without_hashes_loads_with_one_warning(ckpt, caplog):
  _drop_hashes(ckpt)
  with caplog.at_level(logging.WARNING, logger="dfjax.loading"):
    model = load_model(ckpt)
  warnings = [r for r in caplog.records if r.name == "dfjax.loading"]
  assert len(warnings) == 1 and "cannot be verified" in warnings[0].getMessage()
  assert "\n" not in warnings[0].getMessage()
  assert model.conv_in.kernel[...].dtype == jnp.float32


# ---------------------------------------------------------------------------------- dtypes

def test_dtype_aliases_and_non_float_dtypes(converted):
  model = load_model(converted, dtype="bf16", param_dtype="fp16")
  assert model.conv_in.kernel[...].dtype == jnp.float16
  assert model.conv_in.dtype == jnp.bfloat16
  for bad in ("int8", "bool"):
    with pytest.raises(ValueError, match=f"dtype '{bad}' is not a float dtype; use float32, float16 or "
                                         "bfloat16 \\(or fp32, fp16, half, bf16\\)"):
      load_model(converted, dtype=bad)
  with pytest.raises(ValueError, match="param_dtype 'int32' is not a float dtype"):
    load_model(converted, param_dtype="int32")
  with pytest.raises(ValueError, match="dtype 'float99' is not a dtype"):
    load_model(converted, dtype="float99")
