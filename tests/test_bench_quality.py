"""`dfjax bench quality` (dfjax/bench/quality.py): its figures are the shipped classifier's verdicts on
the single-device DDIM samples it names (classes 0…K−1 in turn from `initial_noise(0, …)`, the model's
scheduler config), here rebuilt through the public API, of a `dfjax train` folder (the tiny UNet with
random weights: the plumbing is under test, not the model; the embedded UNet compiles for minutes at the
suite's XLA level); bad settings are refused before anything runs."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import dfjax
from dfjax import commands, data
from dfjax.bench import quality as bench_quality
from dfjax.eval.quality import QualityJudge
from dfjax.inputs import initial_noise
from dfjax.training import TrainConfig, load_trained
from dfjax.training.loop import _graphdef, export_run
from dfjax.training.model import VARIANTS

SAMPLES, STEPS = 2, 2  # the fewest a Fréchet distance takes: at the suite's XLA level 0 the UNet runs slowly


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  cfg = TrainConfig(out=str(tmp_path_factory.mktemp("run")), model="tiny", steps=1, batch=2)
  rng = np.random.default_rng(0)
  abstract = nnx.eval_shape(lambda: VARIANTS[cfg.model].build(rngs=nnx.Rngs(0)))
  model = nnx.merge(_graphdef(cfg.model), jax.tree.map(lambda a: (0.1 * rng.normal(size=a.shape)).astype(a.dtype),
                                                       nnx.state(abstract, nnx.Param)))
  return export_run(cfg, model, {"step": [1], "loss": [0.5], "seconds": 1.0}, "dfjax train (test)")


def test_bench_quality_judges_the_samples_it_names(folder, tmp_path, capsys, monkeypatch):
  judge = QualityJudge(reference_images=200, bootstraps=10)  # a small reference: the judge is tested elsewhere
  monkeypatch.setattr(bench_quality, "QualityJudge", lambda: judge)
  recorded = Path(shutil.copytree(folder, tmp_path / "model"))
  assert "quality was not measured" in (recorded / "MODEL_CARD.md").read_text()
  out = tmp_path / "quality.json"
  assert commands.main(["bench", "quality", "--checkpoint", str(recorded), "--samples", str(SAMPLES), "--steps",
                        str(STEPS), "--json", str(out), "--record"]) == 0
  got = json.loads(out.read_text())
  assert json.loads((recorded / "quality.json").read_text()) == got
  card = (recorded / "MODEL_CARD.md").read_text()
  assert "quality was not measured" not in card
  assert f"recognises {100 * got['accuracy']:.0f} % of them" in card and f"{got['frechet']:.2f} ±" in card
  assert load_trained(recorded).scheduler_config == load_trained(folder).scheduler_config  # still loads
  model, labels = load_trained(folder), np.arange(SAMPLES) % data.num_classes
  cond, uncond = model.conditioning(labels)
  images = dfjax.sample(model.denoiser, initial_noise(0, SAMPLES, data.IMAGE_SIZE, data.IMAGE_SIZE, 3), cond,
                        uncond=uncond, scheduler_config=model.scheduler_config, num_steps=STEPS, guidance_scale=4.0)
  expected = judge(np.asarray(images), labels)
  assert got["correct"] == [bool(c) for c in expected.correct]
  assert got["frechet"] == pytest.approx(expected.frechet, rel=1e-3) and got["reference_images"] == 200
  assert got["dataset_floor"] == pytest.approx(expected.dataset_floor, rel=1e-6)
  assert got["per_class"] == {name: float(c) for name, c in zip(data.class_names[:SAMPLES], expected.correct)}
  printed = capsys.readouterr().out
  assert f"class accuracy: {100 * expected.accuracy:.0f} % ({int(expected.correct.sum())} of {SAMPLES})" in printed
  assert "machine: " in printed and "dfjax bench quality" in printed


@pytest.mark.parametrize("flags,message", [(["--samples", "1"], r"samples=1 must be an integer ≥ 2"),
                                           (["--steps", "0"], r"steps=0 must be a positive integer")])
def test_bad_settings_are_refused(flags, message, capsys, tmp_path):
  out = tmp_path / "q.json"
  assert commands.main(["bench", "quality", *flags, "--json", str(out)]) == 2
  assert message.replace("\\", "") in capsys.readouterr().err and not out.exists()


def test_record_needs_a_dfjax_train_folder(folder, tmp_path, capsys):
  converted = Path(shutil.copytree(folder, tmp_path / "model"))
  (converted / "training.json").unlink()
  assert commands.main(["bench", "quality", "--checkpoint", str(converted), "--record"]) == 2
  assert "--record writes quality.json into a `dfjax train` export" in capsys.readouterr().err
  assert not (converted / "quality.json").exists()
