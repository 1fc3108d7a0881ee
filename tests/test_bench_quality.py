"""`dfjax bench quality` (dfjax/bench/quality.py): its figures are the shipped classifier's verdicts on
the single-device DDIM samples it names (classes 0…K−1 in turn from `initial_noise(0, …)`, the model's
scheduler config), here rebuilt through the public API, of a `dfjax train` folder (the tiny UNet with
random weights: the plumbing is under test, not the model; the embedded UNet compiles for minutes at the
suite's XLA level); bad settings are refused before anything runs."""

import json

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
  out = tmp_path / "quality.json"
  assert commands.main(["bench", "quality", "--checkpoint", str(folder), "--samples", str(SAMPLES), "--steps",
                        str(STEPS), "--json", str(out)]) == 0
  got = json.loads(out.read_text())
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
