"""`dfjax bench quality`: how well a class-conditional model draws its classes, on one device.

The figures the model cards and the README's "Sample quality" quote: `samples` images, classes
0 … K−1 in turn from the noise `initial_noise(0, …)` (as `dfjax generate` and `dfjax bench fidelity`
draw them), sampled by `single` with DDIM and the model's own scheduler config, judged by the shipped
classifier (dfjax/eval/quality.py): class accuracy overall and per class, the Fréchet classifier
distance with its bootstrap spread, and the distance fresh dataset images score at the same count.
`--record` keeps them with the model: the folder's quality.json, which its MODEL_CARD.md quotes.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from dfjax.bench.timing import device_name
from dfjax.eval.quality import Quality, QualityJudge
from dfjax.generation import (DEFAULT_GUIDANCE, can_judge, check_output_path, checkpoint_source, embedded_source,
                              model_size, timed_sample)
from dfjax.inputs import initial_noise
from dfjax.training.card import MODEL_CARD, QUALITY, write_model_card
from dfjax.training.default_model import DEFAULT_EMBEDDED, default_model_dir
from dfjax.training.export import TRAINING
from sharding.mesh import make_mesh
from sharding.strategies import Strategy


@dataclasses.dataclass(frozen=True)
class QualityConfig:
  """What `dfjax bench quality` samples.

  Attributes:
    samples: images (sample i draws class i mod K); at least 2 (a Fréchet distance needs 2).
    steps: DDIM steps.
    guidance_scale: the sampler's classifier-free guidance.
    model, checkpoint: the embedded model (`EMBEDDED_MODELS`: unet, dit, dit8), or a `dfjax train` folder instead.
  """

  samples: int = 100
  steps: int = 50
  guidance_scale: float = DEFAULT_GUIDANCE
  model: str = DEFAULT_EMBEDDED
  checkpoint: str | None = None

  def __post_init__(self):
    if not isinstance(self.samples, int) or self.samples < 2:
      raise ValueError(f"samples={self.samples!r} must be an integer ≥ 2 (a Fréchet distance needs 2 images)")
    if not isinstance(self.steps, int) or self.steps < 1:
      raise ValueError(f"steps={self.steps!r} must be a positive integer")
    default_model_dir(self.model)  # raises on an unknown name, naming the embedded models


@dataclasses.dataclass(frozen=True)
class QualityReport:
  """The judged run: `quality` (dfjax.eval.quality.Quality), each class's accuracy by name, the
  model's description and the seconds sampling took (compile excluded)."""

  quality: Quality
  per_class: dict[str, float]
  description: str
  sample_s: float

  def to_json(self) -> dict:
    return {"model": self.description, "per_class": self.per_class, "sample_s": self.sample_s,
            **self.quality.to_json()}


def measure(config: QualityConfig) -> QualityReport:
  """Samples and judges `config.samples` images.

  Raises:
    ValueError: the model is not a class-conditional model of the shapes dataset drawing 64² RGB images
      (nothing the classifier can judge).
  """
  source = (embedded_source(config.samples, config.model) if config.checkpoint is None
            else checkpoint_source(config.checkpoint, config.samples, 0))
  size = model_size(source.unet.config)
  if not can_judge(source, size):
    raise ValueError(f"bench quality judges class-conditional models of dfjax's shapes dataset that draw "
                     f"64×64 RGB images; {source.description} is not one: use the embedded models or a "
                     "`dfjax train` folder")
  noise = initial_noise(0, config.samples, size, size, source.unet.config.in_channels)
  images, _, sample_s = timed_sample(source.unet, noise, source.cond, source.uncond, mesh=make_mesh(1, 1, 1),
                                     strategy=Strategy.single(), scheduler="ddim", num_steps=config.steps,
                                     scheduler_config=source.scheduler_config,
                                     guidance_scale=config.guidance_scale)
  quality = QualityJudge()(images, source.labels)
  names = dict(zip(source.labels.tolist(), source.captions))
  per_class = {names[k]: float(np.mean(quality.correct[source.labels == k])) for k in sorted(names)}
  return QualityReport(quality, per_class, source.description, sample_s)


def format_report(report: QualityReport) -> str:
  q = report.quality
  classes = ", ".join(f"{name} {100 * share:.0f}" for name, share in report.per_class.items())
  return "\n".join([
      f"class accuracy: {100 * q.accuracy:.0f} % ({int(np.sum(q.correct))} of {q.samples}); per class (%): {classes}",
      f"Fréchet classifier distance: {q.frechet:.2f} ± {q.frechet_std:.2f} (bootstrap std; dataset images at "
      f"{q.samples} samples: {q.dataset_floor:.2f}; reference: {q.reference_images} dataset images)"])


def run(config: QualityConfig, json_out: str | None = None, command: str = "dfjax bench quality", *,
        record: bool = False) -> QualityReport:
  """`dfjax bench quality`: measures, prints the figures with machine and command, writes JSON.

  `record`: also write the JSON as the model folder's QUALITY (the checkpoint, or the embedded model's
  folder in the package) and rewrite its model card, which quotes it. An unwritable `json_out` or
  record raises its OSError, and a folder that is no `dfjax train` export a ValueError, before anything runs."""
  outputs = [Path(json_out)] if json_out else []
  if record:
    folder = Path(config.checkpoint) if config.checkpoint is not None else default_model_dir(config.model)
    if not (folder / TRAINING).is_file():
      raise ValueError(f"--record writes {QUALITY} into a `dfjax train` export and rewrites its {MODEL_CARD}; "
                       f"{folder} has no {TRAINING}: drop --record, or use --json")
    outputs.append(folder / QUALITY)
  for path in outputs:
    check_output_path(path, folder=False)
  start = time.perf_counter()
  report = measure(config)
  wall_s = time.perf_counter() - start
  print(f"model: {report.description}; {config.samples} samples, {config.steps}-step DDIM, guidance "
        f"{config.guidance_scale:g}, single device")
  print(f"machine: {device_name()}; command: {command}; wall time {wall_s:.0f} s (sampling {report.sample_s:.0f} s)")
  print(format_report(report))
  text = json.dumps({"machine": device_name(), "command": command, "wall_s": wall_s,
                     "config": dataclasses.asdict(config), **report.to_json()}, indent=2, allow_nan=False) + "\n"
  for path in outputs:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")  # a crash leaves the old file whole
    partial.write_text(text)
    partial.replace(path)
    print(f"wrote {path}")
  if record:
    write_model_card(folder)
    print(f"wrote {folder / MODEL_CARD}")
  return report
