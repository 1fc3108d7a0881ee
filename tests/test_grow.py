"""dfjax.training.grow (`dfjax train --grow-from`): a DiT grown to twice the depth of a trained one starts as
exactly its function, its new blocks learn, a grown run resumes without its source, its card gives both
commands, and what cannot be grown is refused."""

import functools
import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from dfjax import data
from dfjax.training import TrainConfig, load_trained, train
from dfjax.training import grow, loop
from dfjax.training.default_model import default_model_dir
from dfjax.training.model import VARIANTS
from dfjax.training.pipeline_plan import PipelineConfig
from dfjax.training.pipeline_train import train_pipelined

SOURCE = dict(model="dit-tiny", steps=3, batch=2, lr=0.05, warmup_steps=0, ema_decay=0.0, save_every=3, log_every=3)
SOURCE_COMMAND = "dfjax train --model dit-tiny --steps 3 --batch 2 --lr 0.05 --warmup-steps 0 --ema-decay 0"
# A large learning rate and no EMA, so that the exported params are 2 updates away from the init (the
# warm-up's first step has learning rate 0).
GROWN = dict(SOURCE, model="dit-tiny2", save_every=1, log_every=1, seed=1)
GROW_COMMAND = "dfjax train --model dit-tiny2 --grow-from SOURCE --seed 1 (…)"


def _inputs(batch: int = 3):
  keys = jax.random.split(jax.random.key(7), 3)
  x_bhwc = jax.random.normal(keys[0], (batch, data.IMAGE_SIZE, data.IMAGE_SIZE, 3))
  t_b = jax.random.randint(keys[1], (batch,), 0, 1000)
  labels_b = jax.random.randint(keys[2], (batch,), 0, data.num_classes + 1)  # the null class included
  return x_bhwc, t_b, labels_b


# Compiled without backend optimisation, as the tiny variants' training: seconds faster here.
_fast_jit = functools.partial(jax.jit, compiler_options=loop.FAST_COMPILE)


@functools.partial(_fast_jit, static_argnums=0)
def _apply(graphdef, state, x_bhwc, t_b, labels_b):
  return nnx.merge(graphdef, state)(x_bhwc, t_b, class_labels=labels_b)


def _forward(denoiser) -> np.ndarray:
  return np.asarray(_apply(*nnx.split(denoiser), *_inputs()))


def _flat(module) -> dict:
  return {p: np.asarray(v) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def _fresh_dit(variant: str, seed: int, noise: float = 0.0) -> nnx.Module:
  """The joint model of `variant` initialised from `seed`, every param plus `noise` × a normal draw."""
  model = VARIANTS[variant].build(rngs=nnx.Rngs(seed))
  draws = np.random.default_rng(seed)
  state = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(lambda p: p + noise * draws.standard_normal(p.shape, np.float32), state))
  return model


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """A `dit-tiny` export that stands in for a trained one: random params everywhere (its modulation and
  final layer too, which a fresh init zeroes), so that it computes something a wrongly grown DiT would not
  reproduce; exported as a run's model with its command."""
  model = _fresh_dit("dit-tiny", 5, noise=0.2)
  cfg = TrainConfig(out=str(tmp_path_factory.mktemp("source")), **SOURCE)
  return loop.export_run(cfg, model, {"step": [3], "loss": [0.5], "seconds": 1.0}, SOURCE_COMMAND)


@pytest.fixture(scope="module")
def grown_runs(source, tmp_path_factory):
  """A grown 3-step run, and one stopped after step 1 and resumed after its source folder was deleted."""
  root = tmp_path_factory.mktemp("grown")
  whole = train(TrainConfig(out=str(root / "whole"), grow_from=str(source), **GROWN), progress=False,
                command=GROW_COMMAND)
  copy = shutil.copytree(source, root / "source-copy")
  split = TrainConfig(out=str(root / "split"), grow_from=str(copy), **GROWN)
  assert train(split, stop_at=1, progress=False) is None
  shutil.rmtree(copy)
  return whole, train(split, resume=True, progress=False)


def test_grown_dit_computes_the_source_exactly(source, tmp_path):
  trained = load_trained(source).denoiser
  fresh = _flat(_fresh_dit("dit-tiny2", 3))
  model = grow.grown_start(_fresh_dit("dit-tiny2", 3), str(source), "dit-tiny2", tmp_path)
  # block 0 is the trained block, block 1 the fresh model's (the seed's) block 1, the rest the source's
  params, before = _flat(model.denoiser), _flat(trained)
  for path, value in params.items():
    if path[:2] == ("transformer_blocks", 1):
      np.testing.assert_array_equal(value, fresh[("dit", *path)])
    else:
      np.testing.assert_array_equal(value, before[path if path[0] != "transformer_blocks" else (path[0], 0, *path[2:])])
  expected = _forward(trained)
  assert expected.std() > 0.05  # the source computes something
  np.testing.assert_allclose(_forward(model.denoiser), expected, rtol=0, atol=1e-6)


def test_new_blocks_learn(grown_runs):
  """After training, the new block is no longer the identity: the grown DiT differs from itself without it."""
  grown = load_trained(grown_runs[0]).denoiser
  shallow = _fresh_dit("dit-tiny", 0).denoiser
  kept = nnx.state(shallow, nnx.Param)
  pure = nnx.to_pure_dict(nnx.state(grown, nnx.Param))
  nnx.replace_by_pure_dict(kept, {**pure, "transformer_blocks": {0: pure["transformer_blocks"][0]}})
  nnx.update(shallow, kept)
  assert np.abs(_forward(grown) - _forward(shallow)).max() > 1e-3


def test_grown_run_resumes_without_its_source(grown_runs):
  whole, resumed = grown_runs
  a, b = _flat(load_trained(whole).denoiser), _flat(load_trained(resumed).denoiser)
  assert a.keys() == b.keys() and len([p for p in a if p[:2] == ("transformer_blocks", 1)]) > 0
  for path in a:
    np.testing.assert_array_equal(a[path], b[path], err_msg=str(path))


def test_card_gives_the_source_command_then_the_grow_command(source, grown_runs):
  whole, _ = grown_runs
  training = json.loads((whole / "training.json").read_text())
  record = training["grown_from"]
  assert record["command"] == json.loads((source / "training.json").read_text())["command"] == SOURCE_COMMAND
  assert (record["folder"], record["num_layers"], training["config"]["grow_from"]) == (str(source), 1, str(source))
  card = (whole / "MODEL_CARD.md").read_text()
  assert SOURCE_COMMAND in card and GROW_COMMAND in card
  assert card.index(SOURCE_COMMAND) < card.index(GROW_COMMAND)
  assert "Grown from the 1-block DiT" in card and "Initialised as in the DiT paper" not in card


@pytest.mark.parametrize("folder, variant, message", [
    ("missing", "dit-tiny2", "no such folder"),
    ("unet", "dit-tiny2", "holds a UNet2DConditionModel, not a DiTTransformer2DModel"),
    ("grown", "dit-tiny", "its 1 blocks are not a multiple of the source's 2"),
    ("source", "dit8", "differs in attention_head_dim"),
    ("source", "tiny", "it is a UNet"),
])
def test_what_cannot_grow_is_refused(folder, variant, message, source, grown_runs, tmp_path):
  folders = {"missing": tmp_path / "nothing", "unet": default_model_dir("unet"), "grown": grown_runs[0],
             "source": source}
  with pytest.raises(ValueError, match=message):
    grow.load_source(folders[folder], variant)


def test_train_refuses_a_missing_source(tmp_path):
  with pytest.raises(ValueError, match="no such folder"):
    train(TrainConfig(out=str(tmp_path / "run"), grow_from=str(tmp_path / "nothing"), **GROWN), progress=False)


@pytest.mark.slow  # each compiles a 1-step run: 20 s (the pipelined one more)
@pytest.mark.parametrize("pipeline", [None, PipelineConfig(stages=2, microbatches=2, schedule="1f1b")],
                         ids=["single", "pipelined"])
def test_a_first_step_exports_the_source(pipeline, source, tmp_path):
  """Both trainers start a grown run as the source: the warm-up's first step has learning rate 0, so a
  1-step run (no EMA) exports the grown init, which computes the source's output."""
  cfg = TrainConfig(out=str(tmp_path / "run"), grow_from=str(source), **{**GROWN, "steps": 1})
  folder = (train(cfg, progress=False) if pipeline is None
            else train_pipelined(cfg, pipeline, progress=False, echo=lambda _: None))
  grown = load_trained(folder).denoiser
  assert grown.config.num_layers == 2
  np.testing.assert_allclose(_forward(grown), _forward(load_trained(source).denoiser), rtol=0, atol=1e-6)
