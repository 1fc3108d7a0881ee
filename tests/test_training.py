"""dfjax.training: a tiny run (UNet and DiT) checkpoints and resumes bit-exactly, exports a loadable
dfjax checkpoint, and the shipped models are trained (they predict the noise far better than 0)."""

import csv
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dfjax import commands, data
from dfjax.loading import load_model
from dfjax.schedulers import SchedulerConfig, prediction_target, train_alphas_cumprod
from dfjax.training import EMBEDDED_MODELS, TrainConfig, load_default_model, load_trained, train
from dfjax.training.model import VARIANTS

TINY = dict(model="tiny", steps=3, batch=2, save_every=2, log_every=2, warmup_steps=2)


def _params(module) -> list[np.ndarray]:
  return [] if module is None else [np.asarray(x) for x in jax.tree.leaves(nnx.state(module, nnx.Param))]


def _loss_csv(folder):
  with open(folder / "loss.csv", newline="") as f:
    return list(csv.DictReader(f))


FLAGS = ["--steps", "3", "--batch", "2", "--save-every", "2", "--log-every", "2", "--warmup-steps", "2"]  # TINY's


def _whole_run(root, model: str):
  """An uninterrupted 3-step run of `model`, through the CLI: its exported model folder."""
  assert commands.main(["train", "--out", str(root / "whole"), "--model", model, *FLAGS]) == 0
  return root / "whole" / "model"


def _resumed_run(root, model: str):
  """The same run stopped after step 1 (inside a logging interval, between checkpoints) and resumed."""
  settings = {**TINY, "model": model}
  assert train(TrainConfig(out=str(root / "split"), **settings), stop_at=1, progress=False) is None
  return train(TrainConfig(out=str(root / "split"), **settings), resume=True, progress=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("train")
  return _whole_run(root, "tiny"), _resumed_run(root, "tiny")


@pytest.fixture(scope="module")
def dit_whole(tmp_path_factory):
  """The DiT's export, for the tests that read it; its resumed twin is built only for the (slow) resume test."""
  return _whole_run(tmp_path_factory.mktemp("train-dit"), "dit-tiny")


@pytest.fixture(scope="module")
def dit_runs(dit_whole):
  return dit_whole, _resumed_run(dit_whole.parent.parent, "dit-tiny")


@pytest.mark.parametrize("pair", ["runs", pytest.param("dit_runs", marks=pytest.mark.slow)])  # the DiT: 15 s
def test_resumed_run_equals_uninterrupted_run(pair, request):
  whole, resumed = request.getfixturevalue(pair)
  a, b = load_trained(whole), load_trained(resumed)
  for x, y in zip(_params(a.denoiser) + _params(a.class_tokens), _params(b.denoiser) + _params(b.class_tokens),
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
  for x, y in zip(unet_params, _params(trained.denoiser), strict=True):
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


def test_a_checkpoint_keeps_the_history_of_its_own_step(runs, tmp_path, monkeypatch):
  """orbax writes a checkpoint's history JSON in a background thread while the loop trains on: held up
  (2 s), it must still write what the history was at its step, not what the loop appended since."""
  from orbax.checkpoint._src.handlers.json_checkpoint_handler import JsonCheckpointHandler
  save = JsonCheckpointHandler._save_fn

  async def slow_save(self, item, directory):
    time.sleep(2)  # blocks orbax's writer thread, not the loop
    return await save(self, item, directory)

  monkeypatch.setattr(JsonCheckpointHandler, "_save_fn", slow_save)
  # the compiled step of `runs` (the intervals do not shape it); step 1's interval still under way at step 2
  cfg = TrainConfig(out=str(tmp_path), **{**TINY, "save_every": 1, "log_every": 3})
  assert train(cfg, stop_at=2, progress=False) is None
  monkeypatch.undo()
  histories = {step: json.loads((tmp_path / "checkpoints" / str(step) / "history" / "metadata").read_text())
               for step in (1, 2)}
  assert [len(histories[step]["pending"]) for step in (1, 2)] == [1, 2]
  assert histories[1]["pending"] == histories[2]["pending"][:1] and histories[2]["step"] == []


def test_dit_export_is_a_class_conditional_dit(dit_whole):
  """The DiT export: its own class embedding (no class tokens), the null class for guidance, a card
  that names the DiT; what it predicts depends on the class."""
  trained = load_trained(dit_whole)
  dit, tokens, scheduler_config = trained
  assert type(dit).__name__ == "DiTTransformer2DModel" and tokens is None
  assert trained.num_classes == data.num_classes == dit.config.null_class
  assert scheduler_config == VARIANTS["dit-tiny"].scheduler_config  # the schedule it was trained with
  manifest = json.loads((dit_whole / "manifest.json").read_text())
  assert manifest["model"] == "DiTTransformer2DModel" and "classes.json" in manifest["files"]
  assert "# dfjax default DiT" in (dit_whole / "MODEL_CARD.md").read_text()
  cond, uncond = trained.conditioning(np.array([0, 3]))
  np.testing.assert_array_equal(uncond.class_labels, [data.num_classes] * 2)
  x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  eps_cond, eps_null = (dit(x, jnp.array([500, 500]), class_labels=c.class_labels) for c in (cond, uncond))
  assert eps_cond.shape == (2, 64, 64, 3) and float(jnp.max(jnp.abs(eps_cond - eps_null))) > 0


def test_a_damaged_dit_export_is_refused(dit_whole, tmp_path):
  import shutil
  shutil.copytree(dit_whole, tmp_path / "dit")
  (tmp_path / "dit" / "classes.json").write_text('{"num_classes": 3}')
  with pytest.raises(ValueError, match="damaged"):
    load_trained(tmp_path / "dit")
  (tmp_path / "dit" / "classes.json").unlink()
  with pytest.raises(ValueError, match="classes.json"):
    load_trained(tmp_path / "dit")


@pytest.mark.parametrize("name", EMBEDDED_MODELS)
def test_default_model_is_trained(name):
  """On noised training images the shipped model's prediction (of its scheduler's target) beats
  predicting 0 by far, for a class label and for the null class."""
  trained = load_default_model(name)
  model, scheduler_config = trained.denoiser, trained.scheduler_config
  assert model.config.sample_size == 64 and model.config.in_channels == 3
  schedule = SchedulerConfig.from_diffusers_config(scheduler_config)
  alphas_cumprod = train_alphas_cumprod(schedule)
  images, labels = data.batch(12345, 6)
  t = np.array([50, 150, 300, 500, 700, 900])
  eps = jax.random.normal(jax.random.key(0), images.shape)
  a = jnp.asarray(np.sqrt(alphas_cumprod[t]), jnp.float32)[:, None, None, None]
  s = jnp.asarray(np.sqrt(1 - alphas_cumprod[t]), jnp.float32)[:, None, None, None]
  noisy = a * images + s * eps
  target = prediction_target(schedule.prediction_type, images, eps, a, s)
  predict = jax.jit(lambda x, c: model(x, jnp.asarray(t), **c))
  for condition in trained.conditioning(labels):
    fields = {k: v for k, v in vars(condition).items() if v is not None}
    err = float(jnp.mean(jnp.square(predict(noisy, fields) - target)))
    zero = float(jnp.mean(jnp.square(target)))
    assert err < 0.25 * zero, (err, zero)
