"""The export of a `dfjax train --frozen-encoder vae` run (dfjax/training/export.py): the model draws
the frozen encoder's latents, so its config says the latents' size, and the folder holds the encoder
it was trained with (its weights bit for bit, hashed in the manifest), which encodes images into the
latents the run trained on; damaged encoder files are refused; `dfjax generate` refuses the model
(no decoder turns its samples into images). The exported DiT computes on the latents what it computed
in training. Slow: a real encoder run, stopped and resumed, gives the uninterrupted run's loss curve
and weights, and its export is the same as the default tests' one."""

import csv
import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dfjax import commands, data
from dfjax.generation import GenerateConfig, generate
from dfjax.training import TrainConfig, export, load_trained
from dfjax.training.export import ENCODER_CONFIG, ENCODER_DIR, load_latent_encoder
from dfjax.training.loop import FAST_COMPILE, _graphdef, export_run, latent_config
from dfjax.training.model import VARIANTS
from dfjax.training.fixed_weights import fixed_seed_params
from dfjax.training.pipeline_frozen import ENCODER_SEED, FROZEN_ENCODERS, encoder_part
from dfjax.training.pipeline_plan import PipelineConfig
from dfjax.training.pipeline_train import latent_encoder, plan_for, train_pipelined
from models.dit_blocks import PatchEmbed
from models.dit_config import DiTConfig
from models.vae import Encoder

IMAGE = (data.IMAGE_SIZE, data.IMAGE_SIZE, 3)  # what `dfjax train` trains on: 64² RGB
LATENT_SIDE = data.IMAGE_SIZE // 2  # the "vae" encoder's 2 levels halve the side
PIPELINE = PipelineConfig(2, 2, 1, "diffusionpipe", frozen_encoder="vae")
FLAGS = ["--model", "tiny", "--steps", "3", "--batch", "4", "--save-every", "2", "--log-every", "2",
         "--warmup-steps", "2", "--pipeline-stages", "2", "--micro-batches", "2", "--schedule", "diffusionpipe",
         "--frozen-encoder", "vae"]


def _cfg(out):
  return TrainConfig(out=str(out), model="tiny", steps=3, batch=4, save_every=2, log_every=2, warmup_steps=2)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """An encoder run's export, through the trainer's own export path (`latent_encoder` of its plan and
  frozen state, `export_run`) after its last step, of the tiny UNet with random weights (drawn on the
  host: initialising it compiles for half a minute; the slow test exports a trained one)."""
  cfg = _cfg(tmp_path_factory.mktemp("run"))
  rng = np.random.default_rng(0)
  abstract = nnx.eval_shape(lambda: VARIANTS[cfg.model].build(rngs=nnx.Rngs(0)))
  model = nnx.merge(_graphdef(cfg.model), jax.tree.map(lambda a: (0.1 * rng.normal(size=a.shape)).astype(a.dtype),
                                                       nnx.state(abstract, nnx.Param)))
  history = {"step": [2, 3], "loss": [0.5, 0.25], "seconds": 3.0}
  frozen = {"vae_encoder": jax.tree.map(jnp.copy, _vae_params())}  # as the training state holds it
  return export_run(cfg, model, history, "dfjax train (test)", latent_encoder=latent_encoder(plan_for(cfg, PIPELINE),
                                                                                            frozen))


def _vae_params():
  """The frozen VAE encoder's fixed weights, made as the stand-in's are (an independent call)."""
  return fixed_seed_params(Encoder, FROZEN_ENCODERS["vae"], ENCODER_SEED)


@functools.cache
def _images():
  return data.batch((0, 0), 4)[0]  # 4, 64, 64, 3


@functools.cache
def _trained_latents():
  """The latents the run trains on: the executor's frozen part, one sample at a time, from the fixed weights."""
  part = encoder_part("vae", IMAGE)
  graphdef = nnx.split(nnx.eval_shape(lambda: Encoder(FROZEN_ENCODERS["vae"], rngs=nnx.Rngs(0))), nnx.Param)[0]
  run = jax.jit(lambda p, x: part.run(nnx.merge(graphdef, p), x), compiler_options=FAST_COMPILE)
  return np.asarray(run(_vae_params(), _images()))


def _check_latent_export(folder):
  """What every encoder run's export must be: its config the latents', the encoder stored bit for bit
  and encoding images into the run's latents, the files hashed, the record saying what it draws."""
  config = json.loads((folder / "config.json").read_text())
  assert (config["sample_size"], config["in_channels"], config["out_channels"]) == (LATENT_SIDE, 3, 3)
  model = load_trained(folder)
  assert model.denoiser.config.sample_size == LATENT_SIDE
  loaded = load_latent_encoder(folder)
  assert (loaded.name, loaded.image_size, loaded.latent_shape) == ("vae", data.IMAGE_SIZE, (LATENT_SIDE, LATENT_SIDE, 3))
  stored = nnx.to_flat_state(nnx.state(loaded.encoder, nnx.Param))
  expected = nnx.to_flat_state(_vae_params())
  assert [p for p, _ in stored] == [p for p, _ in expected]
  for (path, a), (_, b) in zip(stored, expected):
    assert np.asarray(a).dtype == np.asarray(b).dtype == np.float32
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
  latents = np.asarray(loaded.encode(_images()))  # the whole batch at once: equal up to rounding
  assert latents.shape == (4, LATENT_SIDE, LATENT_SIDE, 3)
  np.testing.assert_allclose(latents, _trained_latents(), rtol=1e-5, atol=1e-5)
  assert np.std(latents) > 0.01  # not a constant
  manifest = json.loads((folder / "manifest.json").read_text())
  assert ENCODER_CONFIG in manifest["files"] and any(f.startswith(f"{ENCODER_DIR}/") for f in manifest["files"])
  training = json.loads((folder / "training.json").read_text())["latent_encoder"]
  assert training["latent_shape"] == [LATENT_SIDE, LATENT_SIDE, 3] and "no decoder" in training["note"]
  card = (folder / "MODEL_CARD.md").read_text()
  assert "samples are latents, not images, and there is no decoder" in card
  assert f"It draws {LATENT_SIDE}×{LATENT_SIDE}×3 latents" in card and "64×64 RGB pixels directly" not in card


def test_encoder_export_draws_the_encoders_latents(exported):
  _check_latent_export(exported)


def test_damaged_encoder_files_are_refused(exported, tmp_path):
  edited = tmp_path / "edited"
  shutil.copytree(exported, edited)
  record = json.loads((edited / ENCODER_CONFIG).read_text())
  (edited / ENCODER_CONFIG).write_text(json.dumps({**record, "seed": 1}, indent=2) + "\n")
  for load in (load_latent_encoder, load_trained):
    with pytest.raises(ValueError, match=rf"damaged.*\({ENCODER_CONFIG}: "):
      load(edited)
  flipped = tmp_path / "flipped"
  shutil.copytree(exported, flipped)
  file = max((f for f in (flipped / ENCODER_DIR).rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
  raw = bytearray(file.read_bytes())
  raw[len(raw) // 2] ^= 0xFF
  file.write_bytes(bytes(raw))
  with pytest.raises(ValueError, match=rf"damaged.*{ENCODER_DIR}/.*contents changed"):
    load_latent_encoder(flipped)
  missing = tmp_path / "missing"
  shutil.copytree(exported, missing)
  shutil.rmtree(missing / ENCODER_DIR)
  with pytest.raises(ValueError, match=rf"lacks {ENCODER_DIR}/"):
    load_latent_encoder(missing)


def test_generate_refuses_a_model_of_latents(exported, tmp_path, capsys):
  with pytest.raises(ValueError, match=r"trained with --frozen-encoder vae: it draws 32×32×3 latents .* no decoder"):
    generate(GenerateConfig(checkpoint=str(exported), strategies=("single",), out=str(tmp_path / "a")), progress=False)
  assert commands.main(["generate", "--checkpoint", str(exported), "--strategy", "single",
                        "--out", str(tmp_path / "b")]) == 2
  error = capsys.readouterr().err
  assert "dfjax generate: error: " in error and "a model trained without --frozen-encoder" in error


def test_exported_dit_computes_on_latents_what_it_trained_with():
  """A DiT's positions are measured in its sample_size grid (its patch embedding is what reads the
  sample size): built from the exported config (sample size 32), it embeds 32² latents as the DiT built
  from the variant's 64² config, which training ran, did. The plain sample_size 32 would not (the check
  that this test can fail)."""
  variant = VARIANTS["dit-tiny"].denoiser_config
  configs = {"trained": variant, "exported": latent_config(variant, (LATENT_SIDE, LATENT_SIDE, 3)),
             "resized only": {**variant, "sample_size": LATENT_SIDE}}
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, LATENT_SIDE, LATENT_SIDE, 3)), jnp.float32)  # B, h, w, L
  params, out = None, {}
  for name, config in configs.items():
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: PatchEmbed(DiTConfig.from_diffusers_config(config),
                                                                     rngs=nnx.Rngs(0))))
    if params is None:
      params = jax.tree.map(lambda a: jnp.asarray(0.2 * rng.normal(size=a.shape), a.dtype), abstract)
    out[name] = np.asarray(jax.jit(lambda p, x: nnx.merge(graphdef, p)(x), compiler_options=FAST_COMPILE)(params, x))
  np.testing.assert_allclose(out["exported"], out["trained"], rtol=1e-6, atol=1e-6)
  assert np.max(np.abs(out["resized only"] - out["trained"])) > 0.1


@pytest.mark.parametrize("change", [{"in_channels": 4, "out_channels": 4}, {"sample_size": data.IMAGE_SIZE}],
                         ids=["channels", "image side"])
def test_a_config_that_does_not_draw_the_latents_is_refused(exported, tmp_path, change):
  model, config = load_trained(exported), json.loads((exported / "config.json").read_text())
  with pytest.raises(ValueError, match=r"cannot draw the 32×32×3 latents its frozen encoder makes"):
    export.write_model(tmp_path / "model", model.denoiser, model.class_tokens, denoiser_config={**config, **change},
                       scheduler_config=json.loads((exported / "scheduler_config.json").read_text()),
                       class_names=data.class_names, training={}, loss_rows=[],
                       latent_encoder=load_latent_encoder(exported))
  assert not (tmp_path / "model").exists()


def _loss_csv(folder):
  with open(folder / "loss.csv") as f:
    return list(csv.DictReader(f))


@pytest.mark.slow
def test_encoder_run_exports_its_encoder_and_resumes_exactly(tmp_path):
  """`dfjax train … --frozen-encoder vae` for 3 steps exports a model of the encoder's latents (the
  state's encoder, bit for bit the fixed one); the same run stopped after step 1 (inside a logging
  interval) and resumed gives the same loss curve, denoiser and encoder."""
  whole = tmp_path / "whole"
  assert commands.main(["train", "--out", str(whole), *FLAGS]) == 0
  _check_latent_export(whole / "model")
  cfg = _cfg(tmp_path / "split")
  assert train_pipelined(cfg, PIPELINE, stop_at=1, progress=False, echo=lambda _: None) is None
  resumed = train_pipelined(cfg, PIPELINE, resume=True, progress=False, echo=lambda _: None)
  assert _loss_csv(whole / "model") == _loss_csv(resumed)
  for load in (lambda f: load_trained(f).denoiser, lambda f: load_latent_encoder(f).encoder):
    a, b = nnx.state(load(whole / "model"), nnx.Param), nnx.state(load(resumed), nnx.Param)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
