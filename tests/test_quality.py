"""dfjax.eval: the Fréchet distance against closed forms, the shipped classifier's accuracy on fresh data,
the metrics on inputs with known answers (dataset, noise, shuffled labels), `dfjax train classifier`
(resumable, exported, loadable) and the accuracy / Fréchet columns of `dfjax generate` and `bench fidelity`."""

import json

import numpy as np
import pytest
import scipy.linalg

from dfjax import commands, data, generation
from dfjax.bench import fidelity
from dfjax.commands import generate as generate_command
from dfjax.commands import train as train_command
from dfjax.commands.options import config_from_args
from dfjax.eval import quality
from dfjax.eval.classifier import classify, load_classifier, read_card_record
from dfjax.eval.quality import QualityJudge, Reference, frechet_distance, gaussian_stats
from dfjax.eval.train_classifier import ClassifierTrainConfig, train_classifier

FRESH_SEED = (123_456, 7)  # neither a training batch, nor the held-out stream, nor the judge's draws
TINY = dict(channels=(4, 8), features=8, steps=3, batch=4, save_every=2, log_every=2, warmup_steps=1,
            eval_images=20)


@pytest.fixture(scope="module")
def judge():
  return QualityJudge(reference_images=500, bootstraps=50)


@pytest.fixture(scope="module")
def cycling_labels():
  return np.arange(100) % data.num_classes


# ------------------------------------------------------------------------ the Fréchet distance

def test_frechet_distance_equals_the_matrix_square_root_formula():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
  cov1, cov2 = a @ a.T + 0.1 * np.eye(6), b @ b.T  # do not commute
  mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
  expected = np.sum((mu1 - mu2) ** 2) + np.trace(cov1 + cov2 - 2 * scipy.linalg.sqrtm(cov1 @ cov2).real)
  assert frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(expected, rel=1e-8)
  assert frechet_distance(mu1, cov1, mu1, cov1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_gaussian_samples_approaches_the_closed_form():
  """N(μ₁, diag s₁) vs N(μ₂, diag s₂): d² = |μ₁ − μ₂|² + Σ (√s₁ − √s₂)²; the bootstrap spread covers the error."""
  rng = np.random.default_rng(1)
  mu1, mu2 = np.array([0.0, 1.0, -1.0]), np.array([0.5, 1.0, 0.0])
  s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 0.25])
  closed_form = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)  # 1.25 + 1.1716
  x = mu1 + np.sqrt(s1) * rng.normal(size=(20_000, 3))
  y = mu2 + np.sqrt(s2) * rng.normal(size=(20_000, 3))
  value, spread = Reference(*gaussian_stats(y)).distance_with_spread(x, bootstraps=30)
  assert abs(value - closed_form) < max(4 * spread, 0.02), (value, spread, closed_form)
  assert 0 < spread < 0.1


def test_gaussian_stats_refuse_too_few_rows():
  with pytest.raises(ValueError, match="B >= 2"):
    gaussian_stats(np.zeros((1, 4)))
  with pytest.raises(ValueError, match="one F"):
    frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


# ------------------------------------------------------------------------ the shipped classifier

def test_shipped_classifier_is_accurate_on_fresh_samples():
  images, labels = data.batch(FRESH_SEED, 500)
  accuracy = np.mean(classify(load_classifier(), images)[1].argmax(axis=1) == labels)
  assert accuracy >= 0.98, accuracy
  card = read_card_record()
  assert card["held_out"]["accuracy"] >= 0.98 and card["held_out"]["images"] >= 1000
  assert card["command"].startswith("dfjax") and "train classifier" in card["command"]


def test_dataset_images_score_their_accuracy_and_the_dataset_floor(judge, cycling_labels):
  images, _ = data.batch(FRESH_SEED, len(cycling_labels), labels=cycling_labels)
  q = judge(images, cycling_labels)
  assert q.accuracy >= 0.97 and q.samples == 100 and q.reference_images == 500
  # Another draw of the dataset is as far from the reference as the judge's own floor draw.
  assert q.frechet < 1.5 * q.dataset_floor + 3 * q.frechet_std, (q.frechet, q.dataset_floor, q.frechet_std)
  noise = np.clip(np.random.default_rng(0).normal(size=images.shape), -1, 1)
  n = judge(noise, cycling_labels)
  assert n.accuracy <= 0.3, n.accuracy  # ≈ chance (0.1) for images of no class
  assert n.frechet > 20 * q.frechet + 10 * n.frechet_std, (n.frechet, q.frechet)


def test_shuffled_labels_score_low(judge, cycling_labels):
  images, _ = data.batch(FRESH_SEED, len(cycling_labels), labels=cycling_labels)
  shuffled = np.random.default_rng(0).permutation(cycling_labels)
  assert np.mean(judge.accuracy(images, shuffled)) <= 0.25
  with pytest.raises(ValueError, match=r"labels must be \(100,\) class ids in \[0, 10\)"):
    judge(images, cycling_labels[:10])
  with pytest.raises(ValueError, match=r"\(B, 64, 64, 3\)"):
    judge.accuracy(images[:, :32], cycling_labels)


# ------------------------------------------------------------------------ training

@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
  """A tiny uninterrupted run through the CLI, and one stopped after step 1 and resumed."""
  root = tmp_path_factory.mktemp("classifier")
  flags = ["--channels", "4", "8", "--features", "8", "--steps", "3", "--batch", "4", "--save-every", "2",
           "--log-every", "2", "--warmup-steps", "1", "--eval-images", "20"]
  assert commands.main(["train", "classifier", "--out", str(root / "whole"), *flags]) == 0
  split = ClassifierTrainConfig(out=str(root / "split"), **TINY)
  assert train_classifier(split, stop_at=1, progress=False) is None
  return root / "whole" / "model", train_classifier(split, resume=True, progress=False)


@pytest.mark.slow
def test_resumed_classifier_run_equals_uninterrupted_run(tiny_runs):
  whole, resumed = (load_classifier(folder) for folder in tiny_runs)
  images, _ = data.batch(FRESH_SEED, 4)
  np.testing.assert_array_equal(classify(whole, images)[1], classify(resumed, images)[1])
  record = read_card_record(tiny_runs[0])
  assert record["steps"] == 3 and record["held_out"]["images"] == 20
  assert len(record["held_out"]["per_class"]) == data.num_classes
  assert "## Held-out accuracy" in (tiny_runs[0] / "MODEL_CARD.md").read_text()


def test_classifier_flags_default_to_the_config_and_train_keeps_its_own():
  parser = commands.build_parser()
  args = parser.parse_args(["train", "classifier", "--out", "run"])
  assert config_from_args(ClassifierTrainConfig, args) == ClassifierTrainConfig(out="run")
  assert args.run is train_command.run_classifier
  assert parser.parse_args(["train", "--out", "run"]).run is train_command.run


@pytest.mark.slow
def test_classifier_runs_refuse_to_mix_runs(tiny_runs):
  out = tiny_runs[0].parent
  with pytest.raises(ValueError, match="--resume"):
    train_classifier(ClassifierTrainConfig(out=str(out), **TINY), progress=False)
  with pytest.raises(ValueError, match="steps=3 \\(now 4\\)"):
    train_classifier(ClassifierTrainConfig(out=str(out), **{**TINY, "steps": 4}), resume=True, progress=False)


def test_classifier_settings_and_folders_are_checked(tmp_path, capsys):
  with pytest.raises(ValueError, match="not a dfjax shapes classifier"):
    load_classifier(tmp_path)
  with pytest.raises(ValueError, match="multiples of groups=4"):
    ClassifierTrainConfig(out="x", channels=(6,))
  assert commands.main(["train"]) == 2  # `train` without a target still needs --out
  assert "train needs --out" in capsys.readouterr().err


# ------------------------------------------------------------------------ the commands' columns

def _dataset_or_noise(labels, noisy: set):
  """A `timed_sample` stand-in: dataset images of `labels` for most strategies, noise for those in `noisy`."""
  def sample(unet, noise, cond, uncond, *, mesh, strategy, on_compiled=None, **kwargs):
    if on_compiled:
      on_compiled()
    if strategy.name in noisy:
      return np.clip(np.random.default_rng(1).normal(size=noise.shape), -1, 1).astype(np.float32), 0.0, 0.0
    return data.batch(FRESH_SEED, len(noise), labels=np.resize(labels, len(noise)))[0], 0.0, 0.0
  return sample


def test_generate_reports_class_accuracy_per_strategy(tmp_path, monkeypatch, returned):
  labels = np.arange(data.num_classes)
  monkeypatch.setattr(generation, "timed_sample", _dataset_or_noise(labels, {"naive"}))
  results = returned(generate_command, "run")
  assert commands.main(["generate", "--out", str(tmp_path)]) == 0
  runs = {run.name: run for run in results[0].runs}
  assert runs["single"].accuracy == runs["displaced"].accuracy == 1.0  # dataset images: every class right
  assert runs["naive"].accuracy <= 0.3
  summary = json.loads((tmp_path / "metrics.json").read_text())["runs"]
  assert summary["naive"]["accuracy"] == runs["naive"].accuracy and len(summary["naive"]["correct"]) == 10


def test_bench_fidelity_adds_accuracy_and_frechet_per_row(monkeypatch, tmp_path, capsys):
  monkeypatch.setattr(quality, "REFERENCE_IMAGES", 500)
  labels = np.arange(4) % data.num_classes
  monkeypatch.setattr(fidelity, "timed_sample", _dataset_or_noise(labels, {"naive"}))
  rows = fidelity.run(fidelity.FidelityConfig(seeds=4, patch=(2,), groupnorm=("sync",), ablation_patch=0,
                                              asyncdiff_components=(2,), asyncdiff_strides=(1,), asyncdiff_warmup=(3,)),
                      json_out=str(tmp_path / "f.json"))
  by_name = {r.strategy: r for r in rows}
  assert list(by_name) == ["single", "displaced", "naive", "asyncdiff"] and by_name["single"].psnr_db is None
  assert by_name["single"].quality.accuracy == by_name["asyncdiff"].quality.accuracy == 1.0
  assert by_name["naive"].quality.accuracy <= 0.5
  assert by_name["naive"].quality.frechet > 5 * by_name["single"].quality.frechet
  assert "Fréchet classifier distance" in capsys.readouterr().out
  saved = json.loads((tmp_path / "f.json").read_text())["rows"]
  assert saved[0]["quality"]["samples"] == 4 and saved[0]["quality"]["reference_images"] == 500
  assert "psnr_db" not in saved[0]
