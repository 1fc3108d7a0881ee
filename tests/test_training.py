"""dfjax.training: a tiny run checkpoints and resumes bit-exactly, exports a loadable dfjax
checkpoint, and the shipped default model is trained (it predicts the noise far better than 0)."""

import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dfjax import commands, data
from dfjax.loading import load_model
from dfjax.schedulers import SchedulerConfig, prediction_target, train_alphas_cumprod
from dfjax.training import TrainConfig, load_default_model, load_trained, train

TINY = dict(model="tiny", steps=3, batch=2, save_every=2, log_every=2, warmup_steps=2)


def _params(module) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(module, nnx.Param))]


def _loss_csv(folder):
  with open(folder / "loss.csv", newline="") as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """An uninterrupted 3-step run (through the CLI), and one stopped after step 1 (inside a
  logging interval, between checkpoints) and resumed."""
  root = tmp_path_factory.mktemp("train")
  whole, split = root / "whole", root / "split"
  flags = ["--model", "tiny", "--steps", "3", "--batch", "2", "--save-every", "2",
           "--log-every", "2", "--warmup-steps", "2"]
  assert commands.main(["train", "--out", str(whole), *flags]) == 0
  assert train(TrainConfig(out=str(split), **TINY), stop_at=1, progress=False) is None
  resumed = train(TrainConfig(out=str(split), **TINY), resume=True, progress=False)
  return whole / "model", resumed


def test_resumed_run_equals_uninterrupted_run(runs):
  whole, resumed = runs
  a, b = load_trained(whole), load_trained(resumed)
  for x, y in zip(_params(a.unet) + _params(a.class_tokens), _params(b.unet) + _params(b.class_tokens),
                  strict=True):
    np.testing.assert_array_equal(x, y)
  assert _loss_csv(whole) == _loss_csv(resumed)
  assert [int(r["step"]) for r in _loss_csv(whole)] == [2, 3]
  assert all(np.isfinite(float(r["loss"])) for r in _loss_csv(whole))


def test_export_is_a_dfjax_checkpoint(runs):
  folder, _ = runs
  unet = load_model(folder)  # the plain loader reads the UNet part
  trained = load_trained(folder)
  unet_params = _params(unet)
  for x, y in zip(unet_params, _params(trained.unet), strict=True):
    np.testing.assert_array_equal(x, y)
  unet_b, tokens_b, scheduler_config = trained  # unpacks as (unet, class_tokens, scheduler_config)
  assert tokens_b.num_classes == data.num_classes and tokens_b.null_id == data.num_classes
  assert SchedulerConfig.from_diffusers_config(scheduler_config).num_train_timesteps == 1000
  training = json.loads((folder / "training.json").read_text())
  assert training["steps"] == 3 and training["command"].startswith("dfjax")
  assert "## Loss curve" in (folder / "MODEL_CARD.md").read_text()
  assert tokens_b(jnp.array([0, 10])).shape == (2, 2, unet_b.config.encoder_dim)


def test_refuses_to_mix_runs(runs, tmp_path):
  whole_out = runs[0].parent
  with pytest.raises(ValueError, match="--resume"):
    train(TrainConfig(out=str(whole_out), **TINY), progress=False)
  with pytest.raises(ValueError, match="steps=3 \\(now 4\\)"):
    train(TrainConfig(out=str(whole_out), **{**TINY, "steps": 4}), resume=True, progress=False)
  assert commands.main(["train", "--out", str(whole_out), "--model", "tiny", "--steps", "3"]) == 2
  with pytest.raises(ValueError, match="unknown model"):
    TrainConfig(out=str(tmp_path), model="huge")
  with pytest.raises(ValueError, match="without class tokens"):
    (tmp_path / "plain").mkdir()
    import shutil
    shutil.copytree(runs[0], tmp_path / "plain", dirs_exist_ok=True)
    shutil.rmtree(tmp_path / "plain" / "class_tokens")
    load_trained(tmp_path / "plain")


def test_default_model_is_trained():
  """On noised training images the shipped model's prediction (of its scheduler's target) beats
  predicting 0 by far, for a class label and for the null class."""
  unet, tokens, scheduler_config = load_default_model()
  assert unet.config.sample_size == 64 and unet.config.in_channels == 3
  schedule = SchedulerConfig.from_diffusers_config(scheduler_config)
  alphas_cumprod = train_alphas_cumprod(schedule)
  images, labels = data.batch(12345, 6)
  t = np.array([50, 150, 300, 500, 700, 900])
  eps = jax.random.normal(jax.random.key(0), images.shape)
  a = jnp.asarray(np.sqrt(alphas_cumprod[t]), jnp.float32)[:, None, None, None]
  s = jnp.asarray(np.sqrt(1 - alphas_cumprod[t]), jnp.float32)[:, None, None, None]
  noisy = a * images + s * eps
  target = prediction_target(schedule.prediction_type, images, eps, a, s)
  predict = jax.jit(lambda x, c: unet(x, jnp.asarray(t), c))
  for context in (tokens(jnp.asarray(labels)), tokens.null(len(labels))):
    err = float(jnp.mean(jnp.square(predict(noisy, context) - target)))
    zero = float(jnp.mean(jnp.square(target)))
    assert err < 0.25 * zero, (err, zero)
