"""Inputs are checked before the long work starts.

`dfjax.sample` checks every input before tracing: each bad input is a ValueError naming the
argument and the shape it must have, and with `check_finite=True` non-finite inputs are reported
as inputs, before any step runs. The benchmarks refuse impossible patch counts before running
`single`, and a config that is not a UNet's before building anything.
"""

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest

from dfjax import sampling
from dfjax.bench import strategies, unet
from dfjax.bench.unet import random_unet
from dfjax.sampling import Conditioning, sample
from models.config import UNetConfig

BATCH, SIDE, TOKENS, WIDTH = 2, 8, 5, 8


@pytest.fixture(scope="module")
def model():
  config = UNetConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                      num_attention_heads=2, cross_attention_dim=WIDTH,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
  return random_unet(config, jnp.float32)


@pytest.fixture
def nothing_is_traced(monkeypatch):
  """Every case here must fail before the sampling program is traced."""
  def traced(*args, **kwargs):
    raise AssertionError("the sampling program was traced")
  monkeypatch.setattr(sampling, "_sample_jit", traced)


def _text(batch=BATCH, tokens=TOKENS, seed=0):
  return np.random.default_rng(seed).standard_normal((batch, tokens, WIDTH), np.float32)


def _noise(batch=BATCH):
  return np.random.default_rng(9).standard_normal((batch, SIDE, SIDE, 4), np.float32)


def _sample(model, noise, cond, uncond=None, **kwargs):
  return sample(model, noise, cond, uncond=uncond, num_steps=2, **kwargs)


ESH = "encoder_hidden_states"


@pytest.mark.parametrize("noise, cond, uncond, message", [
    pytest.param(_noise(0), _text(0), _text(0, seed=1), r"noise has shape \(0, 8, 8, 4\).*at least 1",
                 id="batch 0"),
    pytest.param(_noise(), _text(tokens=0), _text(tokens=0, seed=1),
                 rf"cond.{ESH} has shape \(2, 0, 8\).*text token.*\(B, T, D\)", id="zero tokens"),
    pytest.param(_noise(), None, _text(), rf"cond lacks '{ESH}' \(\(B, T, D\)\)", id="cond None"),
    pytest.param(_noise(), _text(), None, rf"uncond lacks '{ESH}' \(\(B, T, D\)\)", id="uncond None"),
    pytest.param(_noise().tolist(), _text(), _text(seed=1),
                 r"noise must be an array of shape NHWC \(B, H, W, C\).*got list", id="noise list"),
    pytest.param(_noise(), _text(), _text(tokens=3),
                 rf"uncond.{ESH} has shape \(2, 3, 8\) but cond.{ESH} has \(2, 5, 8\).*token count",
                 id="token counts differ"),
    pytest.param(_noise(), _text()[:, 0], _text(seed=1)[:, 0], rf"cond.{ESH} has shape \(2, 8\).*\(B, T, D\)",
                 id="text rank 2"),
    pytest.param(_noise(), _text()[None], _text(seed=1)[None],
                 rf"cond.{ESH} has shape \(1, 2, 5, 8\).*\(B, T, D\)", id="text rank 4"),
    pytest.param(_noise(), _text().tolist(), _text(seed=1),
                 rf"cond.{ESH} must be an array of shape \(B, T, D\).*got list", id="text list"),
    pytest.param(_noise(), _text(3), _text(3, seed=1), rf"noise has batch 2 but cond.{ESH} has batch 3",
                 id="batches differ"),
])
def test_bad_input_is_a_value_error_naming_the_argument_and_shape(model, nothing_is_traced, noise, cond,
                                                                  uncond, message):
  with pytest.raises(ValueError, match=message):
    _sample(model, noise, Conditioning(cond), Conditioning(uncond))


def test_unguided_text_of_the_wrong_rank_is_named(model, nothing_is_traced):
  with pytest.raises(ValueError, match=rf"cond.{ESH} has shape \(2, 8\).*\(B, T, D\)"):
    _sample(model, _noise(), {ESH: _text()[:, 0]}, guidance_scale=1.0)


def test_fields_of_one_conditioning_share_its_batch():
  labels = np.zeros(3, np.int32)
  with pytest.raises(ValueError, match=rf"cond.class_labels has batch 3 but cond.{ESH} has batch 2"):
    Conditioning.of(Conditioning(_text(), class_labels=labels), (ESH, "class_labels"))
  with pytest.raises(ValueError, match=r"cond.time_ids has shape \(6,\).*\(B, 6\)"):
    Conditioning.of(Conditioning(_text(), time_ids=np.zeros(6)), (ESH, "time_ids"))


@pytest.mark.parametrize("where, message", [
    ("noise", r"noise holds NaN or infinite values"),
    ("cond", rf"cond.{ESH} holds NaN or infinite values"),
    ("uncond", rf"uncond.{ESH} holds NaN or infinite values"),
])
def test_checked_runs_report_non_finite_inputs_as_inputs(model, nothing_is_traced, where, message):
  inputs = {"noise": _noise(), "cond": _text(), "uncond": _text(seed=1)}
  inputs[where] = inputs[where].copy()
  inputs[where].flat[3] = np.inf if where == "cond" else np.nan
  with pytest.raises(ValueError, match=message + ".*input"):
    _sample(model, jnp.asarray(inputs["noise"]), Conditioning(inputs["cond"]), Conditioning(inputs["uncond"]),
            check_finite=True)


@pytest.mark.parametrize("scale", [float("nan"), float("inf")])
def test_a_non_finite_guidance_scale_is_refused(model, nothing_is_traced, scale):
  with pytest.raises(ValueError, match=r"guidance_scale=(nan|inf) must be a finite number"):
    _sample(model, _noise(), Conditioning(_text()), Conditioning(_text(seed=1)), guidance_scale=scale)


TWO_LEVEL_UNET = {"_class_name": "UNet2DConditionModel", "block_out_channels": [8, 16], "layers_per_block": 1,
                  "norm_num_groups": 4, "attention_head_dim": 2, "cross_attention_dim": WIDTH,
                  "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                  "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]}


def test_bench_strategies_refuses_an_impossible_patch_count_before_running_single(tmp_path, monkeypatch, capsys):
  config = tmp_path / "config.json"
  config.write_text(json.dumps(TWO_LEVEL_UNET))
  monkeypatch.setattr(strategies, "_measure", lambda *a, **k: pytest.fail("a strategy ran"))
  # 128 pixels: 16 latent rows, 8 rows at the lower level; 3 patches do not split them, but 3 stages
  # of AsyncDiff's components do: the row strategies are skipped with the valid patch counts.
  unet_config = UNetConfig.from_diffusers_config(TWO_LEVEL_UNET)
  every = [strategies.with_shared_options(name, {"warmup_steps": 1}) for name in strategies.strategy_names()
           if strategies.strategy_class(name).axes and strategies.strategy_class(name).supports(unet_config)]
  fitting = strategies.runs_that_fit(unet_config, 16, [3], 1, every)
  assert {strategy.name for strategy, _ in fitting} == {"asyncdiff"}
  assert re.search(r"exact on .*skipped: .*height 16 over 3 row patches.*valid patch counts.*\[1, 2, 4, 8\]",
                   capsys.readouterr().out)
  with pytest.raises(ValueError, match="patch=16 = 16 devices, but only 8"):
    strategies.run(str(config), 128, [16], cfg=1, steps=2, warmup_steps=1, dtype="fp32", iters=1)


def test_bench_unet_says_a_vae_config_is_not_a_unet_config(tmp_path):
  vae = tmp_path / "config.json"
  vae.write_text(json.dumps({"_class_name": "AutoencoderKL", "latent_channels": 4}))
  with pytest.raises(ValueError, match=r"config.json describes a AutoencoderKL, not a UNet"):
    unet.load_config(str(vae))
  vae.write_text("{not json")
  with pytest.raises(ValueError, match=r"config.json: cannot read JSON"):
    unet.load_config(str(vae))
