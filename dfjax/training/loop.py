"""`dfjax train`: DDPM training of a class-conditional UNet or DiT on the procedural dataset.

One jitted step over the `nnx.split` state (params, AdamW state, EMA params, step counter): draw
timesteps and noise, drop labels to the null class for classifier-free guidance, regress the
prediction target of the variant's scheduler config (ε for the shipped UNet, the clean image for the
shipped DiT; mean squared error), update.
Everything random is a pure function of (seed, step): the batch is
`dfjax.data.batch((seed, step), batch)` and the step's PRNG key is `fold_in(key(seed), step)`.
A run interrupted and resumed from an orbax checkpoint therefore gives bit-identical params to
an uninterrupted one.

Output folder:
  train_config.json   the run's settings; resuming checks the command still matches
  checkpoints/        {state, history} every `save_every` steps (dfjax/training/checkpointed.py)
  model/              the final model (EMA params when `ema_decay` > 0), `export.write_model`

Shape letters: B batch, H rows, W columns, C channels.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dfjax import data
from dfjax.schedulers import SchedulerConfig, prediction_target, train_alphas_cumprod
from dfjax.training import export, grow
from dfjax.training.checkpointed import RunFields, loss_rows, run_record, run_steps
from dfjax.training.fixed_weights import FAST_COMPILE
from dfjax.training.model import VARIANTS, run_spec
from models.class_tokens import drop_labels
from models.dit_config import DiTConfig

MODEL = "model"


@dataclasses.dataclass(frozen=True)
class TrainConfig(RunFields):
  """Settings of one training run (`dfjax train` flags).

  Attributes:
    out: output folder.
    model: a `dfjax.training.model.VARIANTS` name.
    steps: optimiser steps; batch: images per step.
    lr: peak AdamW learning rate, reached after `warmup_steps`, then cosine decay to
      `lr * final_lr_fraction` (constant after warm-up when `cosine` is False).
    weight_decay: AdamW decoupled weight decay; grad_clip: global-norm clipping.
    ema_decay: EMA of the params (0 disables; the exported model is the EMA when enabled).
    label_drop: probability of replacing a label by the null class (classifier-free guidance).
    frozen_text: "none" (the UNet's learned class tokens), or a frozen text encoder of the class captions
      (dfjax/training/captions.py `FROZEN_TEXT`) whose output is the UNet's context; the UNet alone trains.
    seed: fixes the init, the data, the noise and the label drops.
    save_every: orbax checkpoint interval in steps (and at the end).
    log_every: loss-curve interval in steps (mean loss over the interval).
    export: where the final model goes (default OUT/model).
    grow_from: a trained DiT's model folder that step 0 starts from, its blocks interleaved with fresh
      identity blocks up to the variant's depth (dfjax/training/grow.py); None: a fresh init.
  """

  out: str
  model: str = "default"
  steps: int = 1800
  batch: int = 16
  lr: float = 2e-3
  warmup_steps: int = 100
  cosine: bool = True
  final_lr_fraction: float = 0.05
  weight_decay: float = 0.0
  grad_clip: float = 1.0
  ema_decay: float = 0.999
  label_drop: float = 0.1
  frozen_text: str = "none"
  seed: int = 0
  save_every: int = 200
  log_every: int = 25
  export: str | None = None
  grow_from: str | None = None

  def __post_init__(self):
    run_spec(self.model, self.frozen_text)  # raises on an unknown model, or frozen text it cannot read
    self.check_run_fields()
    for name in ("ema_decay", "label_drop", "final_lr_fraction"):
      if not 0.0 <= getattr(self, name) < 1.0 + (name == "final_lr_fraction"):
        raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

  def static(self) -> TrainConfig:
    return dataclasses.replace(super().static(), grow_from=None)  # only step 0 reads it, outside the jit


# ---------------------------------------------------------------------------------- the step

def make_optimizer(cfg: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Global-norm clipping then AdamW, with linear warm-up and cosine (or constant) learning rate."""
  warmup = max(cfg.warmup_steps, 1)
  if cfg.cosine:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, warmup, max(cfg.steps, warmup + 1), end_value=cfg.lr * cfg.final_lr_fraction)
  else:
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.lr, warmup), optax.constant_schedule(cfg.lr)], [warmup])
  optimizer = optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                          optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=cfg.weight_decay))
  return optimizer, schedule


@functools.lru_cache(maxsize=None)
def _graphdef(model: str, frozen_text: str = "none") -> nnx.GraphDef:
  """The structure of a variant's model as a run trains it (abstract: nothing is initialised)."""
  abstract = nnx.eval_shape(lambda: run_spec(model, frozen_text).build(rngs=nnx.Rngs(0)))
  return nnx.split(abstract, nnx.Param)[0]


def init_state(seed: jax.Array, *, cfg: TrainConfig) -> dict:
  """Fresh training state {params, opt_state, ema, step} (`train` runs it jitted)."""
  return state_of(run_spec(cfg.model, cfg.frozen_text).build(rngs=nnx.Rngs(jax.random.key(seed))), cfg)


def state_of(model: nnx.Module, cfg: TrainConfig) -> dict:
  """The training state that starts from `model`'s params."""
  params = nnx.state(model, nnx.Param)
  return {"params": params, "opt_state": make_optimizer(cfg)[0].init(params),
          "ema": jax.tree.map(jnp.copy, params), "step": jnp.zeros((), jnp.int32)}


def train_step(state: dict, images_bhwc: jax.Array, labels_b: jax.Array, *, cfg: TrainConfig
               ) -> tuple[dict, jax.Array]:
  """One optimiser step on a batch: (state, images, labels) → (state, loss). `state` is donated.

  `cfg` is static: pass `cfg.static()` so that runs differing only in paths share the program.
  Variants marked `fast_compile` (the tests' model) skip backend optimisation.
  """
  jitted = _train_step_fast_compile if VARIANTS[cfg.model].fast_compile else _train_step
  return jitted(state, images_bhwc, labels_b, cfg=cfg)


def _step(state: dict, images_bhwc: jax.Array, labels_b: jax.Array, *, cfg: TrainConfig
          ) -> tuple[dict, jax.Array]:
  graphdef = _graphdef(cfg.model, cfg.frozen_text)
  key = jax.random.fold_in(jax.random.key(cfg.seed), state["step"])
  loss, grads = jax.value_and_grad(_loss)(state["params"], graphdef, images_bhwc, labels_b, key, cfg)
  updates, opt_state = make_optimizer(cfg)[0].update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  # EMA with the usual warm-up of its decay, so early steps are not averaged with the init.
  step = state["step"].astype(jnp.float32)
  decay = jnp.minimum(cfg.ema_decay, (1.0 + step) / (10.0 + step))
  ema = jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), state["ema"], params)
  return {"params": params, "opt_state": opt_state, "ema": ema, "step": state["step"] + 1}, loss


# The compile options are part of a variant: they change float results in the last bits.
_init_state = jax.jit(init_state, static_argnames="cfg")
_init_state_fast_compile = jax.jit(init_state, static_argnames="cfg", compiler_options=FAST_COMPILE)
_train_step = jax.jit(_step, static_argnames="cfg", donate_argnums=0)
_train_step_fast_compile = jax.jit(_step, static_argnames="cfg", donate_argnums=0,
                                   compiler_options=FAST_COMPILE)


def noised_batch(key: jax.Array, x0_bhwc: jax.Array, labels_b: jax.Array, cfg: TrainConfig):
  """A step's random draws from its key, for the variant's own noise schedule and target (the
  pipelined trainer makes the same ones): (noisy images, timesteps, regression target, labels
  dropped to the null class)."""
  spec = VARIANTS[cfg.model]
  alphas_cumprod = train_alphas_cumprod(SchedulerConfig.from_diffusers_config(spec.scheduler_config))
  sqrt_ab = jnp.asarray(np.sqrt(alphas_cumprod), jnp.float32)  # T
  sqrt_1mab = jnp.asarray(np.sqrt(1.0 - alphas_cumprod), jnp.float32)  # T
  t_key, noise_key, drop_key = jax.random.split(key, 3)
  t_b = jax.random.randint(t_key, (x0_bhwc.shape[0],), 0, sqrt_ab.shape[0])  # B
  eps_bhwc = jax.random.normal(noise_key, x0_bhwc.shape, jnp.float32)  # B, H, W, C
  alpha_b111, sigma_b111 = sqrt_ab[t_b, None, None, None], sqrt_1mab[t_b, None, None, None]
  x_bhwc = alpha_b111 * x0_bhwc + sigma_b111 * eps_bhwc  # B, H, W, C
  target_bhwc = prediction_target(spec.prediction_type, x0_bhwc, eps_bhwc, alpha_b111, sigma_b111)
  dropped_b = drop_labels(labels_b, drop_key, spec.num_classes, cfg.label_drop)  # B
  return x_bhwc, t_b, target_bhwc, dropped_b


def _loss(params, graphdef, x0_bhwc, labels_b, key, cfg: TrainConfig) -> jax.Array:
  """MSE of the scheduler's prediction target at uniform timesteps, labels dropped at random."""
  x_bhwc, t_b, target_bhwc, labels_b = noised_batch(key, x0_bhwc, labels_b, cfg)
  pred_bhwc = nnx.merge(graphdef, params)(x_bhwc, t_b, labels_b)  # B, H, W, C
  return jnp.mean(jnp.square(pred_bhwc.astype(jnp.float32) - target_bhwc))


# ---------------------------------------------------------------------------------- the run

def train(cfg: TrainConfig, *, resume: bool = False, stop_at: int | None = None,
          progress: bool = True, command: str | None = None) -> Path | None:
  """Runs (or, with `resume`, continues) a training run; returns the exported model folder.

  Args:
    cfg: the run's settings.
    resume: continue from the latest checkpoint in `cfg.out` (starts fresh when there is none).
    stop_at: checkpoint and return None after this step, leaving the run to a later `resume`
      (to split a long run; the result is the same as one uninterrupted run).
    progress: show a tqdm progress bar.
    command: the command line recorded in training.json (default: this process's argv).
  Raises:
    ValueError: `cfg.out` holds checkpoints and `resume` is False, or it holds a run with
      different settings.
  """
  spec = VARIANTS[cfg.model]
  schedule = make_optimizer(cfg)[1]
  jitted_init = _init_state_fast_compile if spec.fast_compile else _init_state
  if cfg.grow_from is not None:
    jitted_init = functools.partial(_grown_init, jitted_init, cfg)
  finished = run_steps(cfg, init_state=init_state, train_step=train_step, resume=resume, stop_at=stop_at,
                       jitted_init=jitted_init, schedule=schedule, progress=progress)
  if finished is None:
    return None
  state, history = finished
  model = nnx.merge(_graphdef(cfg.model, cfg.frozen_text), state["ema"] if cfg.ema_decay > 0 else state["params"])
  return export_run(cfg, model, history, command)


def _grown_init(fresh_init, run: TrainConfig, seed: jax.Array, *, cfg: TrainConfig) -> dict:
  """Step 0 of a `grow_from` run: the fresh state of `seed` with the source's params grown in."""
  fresh = nnx.merge(_graphdef(cfg.model), fresh_init(seed, cfg=cfg)["params"])
  return state_of(grow.grown_start(fresh, run.grow_from, cfg.model, run.out), cfg)


def export_run(cfg: TrainConfig, model: nnx.Module, history: dict, command: str | None,
               latent_encoder: export.LatentEncoder | None = None) -> Path:
  """The finished run's model folder (cfg.export or OUT/model) with its loss curve and training.json;
  `latent_encoder`: the frozen encoder whose latents the model was trained on (a `--frozen-encoder`
  run), stored beside it, the config then describing those latents."""
  spec, schedule = run_spec(cfg.model, cfg.frozen_text), make_optimizer(cfg)[1]
  out = Path(cfg.out).absolute()
  rows = loss_rows(history, schedule)
  training = {**run_record(cfg, history, command), "model": spec.to_json(),
              "exported_weights": "ema" if cfg.ema_decay > 0 else "params",
              **(grow.training_record(out) if cfg.grow_from is not None else {})}
  denoiser_config = (spec.denoiser_config if latent_encoder is None
                     else latent_config(spec.denoiser_config, latent_encoder.latent_shape))
  return export.write_model(cfg.export or out / MODEL, model.denoiser, model.class_tokens,
                            denoiser_config=denoiser_config, scheduler_config=spec.scheduler_config,
                            class_names=data.class_names, training=training, loss_rows=rows,
                            latent_encoder=latent_encoder)


def latent_config(denoiser_config: dict, latent_shape: tuple[int, int, int]) -> dict:
  """The variant's config for its denoiser trained on (h, w, L) latents: sample_size h. The backbone
  was built (and trained) from the variant's config for the images; a DiT's positions are measured in
  units of its `sample_size` grid (models/dit_blocks.py `sincos_2d`), so its `interpolation_scale`
  shrinks with the side, and the exported DiT computes the same positions on the latents as in training.
  (`export.write_model` checks that the config then draws the latents.)
  """
  h = latent_shape[0]
  config = {**denoiser_config, "sample_size": h}
  if denoiser_config.get("_class_name") == "DiTTransformer2DModel":
    trained = DiTConfig.from_diffusers_config(denoiser_config)
    config["interpolation_scale"] = trained.pos_interpolation_scale * h / trained.sample_size
  return config
