"""`dfjax train classifier`: cross-entropy training of the shapes classifier, resumable.

The run reuses `dfjax train`'s machinery: its resumable step loop (dfjax/training/checkpointed.py:
orbax checkpoints, the refusal to mix runs in one folder, signals that let a checkpoint finish),
its warm-up + cosine AdamW with global-norm clipping and its machine record (loop.py). As there, everything random is a pure
function of (seed, step): step s trains on `dfjax.data.batch((seed, s), batch)` with Gaussian
pixel noise of a random strength (a little robustness to the grain of generated samples), so an
interrupted run resumed from its orbax checkpoint ends with bit-identical weights.

The held-out accuracy is measured at the end on `eval_images` fresh images drawn from a seed
stream the training never touches (`held_out_seed`), and written to the exported folder's
training.json and MODEL_CARD.md (dfjax/eval/classifier_export.py).

Output folder: train_config.json, checkpoints/, model/ (or `export`).
Shape letters: B batch, H rows, W columns, C channels, K classes.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dfjax import data
from dfjax.eval.classifier import ClassifierConfig, ShapeClassifier, classify
from dfjax.eval.classifier_export import write_classifier
from dfjax.training.checkpointed import RunFields, loss_rows, run_record, run_steps
from dfjax.training.loop import MODEL, make_optimizer

HELD_OUT_STREAM = 2**32 - 1  # first seed word of the held-out images; training seeds are (seed, step)


def held_out_seed(seed: int, index: int) -> tuple[int, int, int]:
  """The `dfjax.data.batch` seed of held-out chunk `index` (never a training batch's)."""
  return (HELD_OUT_STREAM, seed, index)


@dataclasses.dataclass(frozen=True)
class ClassifierTrainConfig(RunFields):
  """Settings of one `dfjax train classifier` run (its flags).

  Attributes:
    out: output folder.
    channels, features: the architecture (`ClassifierConfig`).
    steps, batch: optimiser steps and images per step.
    lr, warmup_steps, cosine, final_lr_fraction, weight_decay, grad_clip: AdamW and its schedule,
      as in `dfjax train`.
    noise_augment: each training image gets Gaussian noise of std uniform in [0, noise_augment]
      (images span [-1, 1]).
    seed: fixes the init, the data and the augmentation.
    save_every, log_every: checkpoint and loss-curve intervals (steps).
    eval_images: fresh held-out images the final accuracy is measured on.
    export: where the classifier goes (default OUT/model).
  """

  out: str
  channels: tuple[int, ...] = ClassifierConfig.channels
  features: int = ClassifierConfig.features
  steps: int = 2000
  batch: int = 32
  lr: float = 3e-3
  warmup_steps: int = 100
  cosine: bool = True
  final_lr_fraction: float = 0.02
  weight_decay: float = 1e-4
  grad_clip: float = 1.0
  noise_augment: float = 0.1
  seed: int = 0
  save_every: int = 250
  log_every: int = 50
  eval_images: int = 5000
  export: str | None = None

  def __post_init__(self):
    object.__setattr__(self, "channels", tuple(self.channels))
    self.architecture()  # raises on a bad architecture
    self.check_run_fields("eval_images")
    if self.noise_augment < 0:
      raise ValueError(f"noise_augment must be >= 0, got {self.noise_augment}")

  def architecture(self) -> ClassifierConfig:
    return ClassifierConfig(channels=self.channels, features=self.features, num_classes=data.num_classes,
                            image_size=data.IMAGE_SIZE)



# ---------------------------------------------------------------------------------- the step

def init_state(seed: jax.Array, *, cfg: ClassifierTrainConfig) -> dict:
  """Fresh training state {params, opt_state, step}."""
  model = ShapeClassifier(cfg.architecture(), rngs=nnx.Rngs(jax.random.key(seed)))
  params = nnx.state(model, nnx.Param)
  return {"params": params, "opt_state": make_optimizer(cfg)[0].init(params),
          "step": jnp.zeros((), jnp.int32)}


@functools.lru_cache(maxsize=None)
def _graphdef(architecture: ClassifierConfig) -> nnx.GraphDef:
  abstract = nnx.eval_shape(lambda: ShapeClassifier(architecture, rngs=nnx.Rngs(0)))
  return nnx.split(abstract, nnx.Param)[0]


def _loss(params, images_bhwc, labels_b, key, cfg: ClassifierTrainConfig) -> jax.Array:
  """Mean cross-entropy of the noise-augmented batch."""
  std_key, noise_key = jax.random.split(key)
  std_b111 = cfg.noise_augment * jax.random.uniform(std_key, (images_bhwc.shape[0], 1, 1, 1))  # B, 1, 1, 1
  noisy_bhwc = images_bhwc + std_b111 * jax.random.normal(noise_key, images_bhwc.shape)  # B, H, W, C
  logits_bk = nnx.merge(_graphdef(cfg.architecture()), params)(noisy_bhwc)  # B, K
  return optax.softmax_cross_entropy_with_integer_labels(logits_bk, labels_b).mean()


@functools.partial(jax.jit, static_argnames="cfg", donate_argnums=0)
def train_step(state: dict, images_bhwc: jax.Array, labels_b: jax.Array, *, cfg: ClassifierTrainConfig
               ) -> tuple[dict, jax.Array]:
  """One optimiser step: (state, images, labels) → (state, loss); `cfg` static (`cfg.static()`)."""
  key = jax.random.fold_in(jax.random.key(cfg.seed), state["step"])
  loss, grads = jax.value_and_grad(_loss)(state["params"], images_bhwc, labels_b, key, cfg)
  updates, opt_state = make_optimizer(cfg)[0].update(grads, state["opt_state"], state["params"])
  return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
          "step": state["step"] + 1}, loss


# ---------------------------------------------------------------------------------- the run

def train_classifier(cfg: ClassifierTrainConfig, *, resume: bool = False, stop_at: int | None = None,
                     progress: bool = True, command: str | None = None) -> Path | None:
  """Runs (or, with `resume`, continues) a classifier run; returns the exported folder.

  Args:
    cfg: the run's settings.
    resume: continue from the latest checkpoint in `cfg.out` (fresh when there is none).
    stop_at: checkpoint and return None after this step (finish later with `resume`).
    progress: show a progress bar.
    command: the command line recorded in training.json (default: this process's argv).
  Raises:
    ValueError: `cfg.out` holds checkpoints and `resume` is False, or a run with other settings.
  """
  schedule = make_optimizer(cfg)[1]
  finished = run_steps(cfg, init_state=init_state, train_step=train_step, resume=resume, stop_at=stop_at,
                       schedule=schedule, progress=progress, desc="train classifier")
  if finished is None:
    return None
  state, history = finished
  model = nnx.merge(_graphdef(cfg.architecture()), state["params"])
  held_out = held_out_accuracy(model, cfg.eval_images, cfg.seed)
  training = run_record(cfg, {**history, "seconds": history["seconds"] + held_out["seconds"]}, command)
  return write_classifier(cfg.export or Path(cfg.out).absolute() / MODEL, model,
                          training={**training, "held_out": held_out}, loss_rows=loss_rows(history, schedule))


def held_out_accuracy(model: ShapeClassifier, count: int, seed: int, chunk: int = 1000) -> dict:
  """Accuracy on `count` fresh images with uniformly random labels (the held-out stream of `seed`).

  Returns:
    {"images", "seed", "accuracy", "per_class" (K accuracies), "seconds"}.
  """
  began = time.perf_counter()
  correct_k, total_k = np.zeros(data.num_classes), np.zeros(data.num_classes)
  for index, start in enumerate(range(0, count, chunk)):
    images, labels = data.batch(held_out_seed(seed, index), min(chunk, count - start))
    hit_b = classify(model, images)[1].argmax(axis=1) == labels  # B
    np.add.at(correct_k, labels, hit_b)
    np.add.at(total_k, labels, 1)
  return {"images": count, "seed": list(held_out_seed(seed, 0))[:2] + ["chunk index"],
          "accuracy": float(correct_k.sum() / total_k.sum()),
          "per_class": [float(c / max(t, 1)) for c, t in zip(correct_k, total_k)],
          "seconds": round(time.perf_counter() - began, 1)}
