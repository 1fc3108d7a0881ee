"""`dfjax train --pipeline-stages S --micro-batches M [--data D] [--schedule …]`: pipelined training.

`train_pipelined` plans the run (dfjax/training/pipeline_plan.py), prints the partition and the
per-device timeline, writes it as OUT/pipeline.png, and runs the resumable step loop every
`dfjax train` shares (dfjax/training/checkpointed.py) with the pipelined step: the same orbax
checkpoints, now of the per-stage state (each stage's rows are saved from, and restored onto, its
own devices), the same loss curve and export.

The backbone is the UNet or the DiT (dfjax/training/pipeline_backbone.py). A step's condition (the
UNet's frozen class tokens, or with `--frozen-text` its frozen text encoder's context of the class
captions; the DiT's labels) and, with `--frozen-encoder vae`, the latents it trains
on come from the previous step's bubbles (cross-iteration overlap); the first step of a process
computes them up front, which gives the same values, so a resumed run continues exactly. Such a run's
export holds the encoder beside the denoiser, whose config then describes the latents it draws
(dfjax/training/export.py).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
from flax import nnx

from dfjax import data
from dfjax.training import grow
from dfjax.training.checkpointed import CHECKPOINTS, run_steps
from dfjax.training.export import LatentEncoder
from dfjax.training.loop import TrainConfig, export_run, make_optimizer
from dfjax.training.pipeline_chart import describe, draw
from dfjax.training.pipeline_calibrate import describe_costs
from dfjax.training.pipeline_frozen import X0
from dfjax.training.pipeline_plan import PipelineConfig, PipelinePlan, analytic_costs, make_plan
from dfjax.training.pipeline_step import executor_for

PIPELINE_CONFIG = "pipeline_config.json"
CHART = "pipeline.png"


class Pipelined:
  """One run's pipelined step as `run_steps` calls it, carrying the frozen outputs between steps."""

  def __init__(self, cfg: TrainConfig, plan: PipelinePlan):
    self.cfg, self.plan = cfg, plan
    self.executor = executor_for(cfg, plan)
    self._inputs = None  # the frozen parts' outputs for the batch of step self._step
    self._step: int | None = None

  def init_state(self, seed, *, cfg=None):
    return self.executor.fresh_state(seed)

  def jitted_init(self, seed, *, cfg=None):
    if self.cfg.grow_from is None:
      state = self.executor.init_state(seed)
    else:  # step 0 of a `--grow-from` run: the fresh model with the source's params grown in
      fresh = self.executor.backbone.build(rngs=nnx.Rngs(jax.random.key(seed)))
      state = self.executor.state_from(grow.grown_start(fresh, self.cfg.grow_from, self.cfg.model, self.cfg.out))
    return jax.device_put(state, self.executor.shardings())

  def train_step(self, state: dict, images, labels, *, cfg=None):
    if self._step is None:  # the first step of this process: its frozen work up front
      self._step = int(state["step"])
      self._inputs = self.executor.frozen_outputs(state, images, labels)
    next_images, next_labels = data.batch((self.cfg.seed, self._step + 1), self.cfg.batch)
    state, loss, self._inputs = self.executor.step(state, self._inputs, next_images, next_labels)
    self._step += 1
    return state, loss


def plan_for(cfg: TrainConfig, pipeline: PipelineConfig) -> PipelinePlan:
  """The plan of `dfjax train`'s pipelined step (its batch of `data.IMAGE_SIZE`² RGB images)."""
  return make_plan(pipeline, cfg.model, cfg.batch, (data.IMAGE_SIZE, data.IMAGE_SIZE, 3), frozen_text=cfg.frozen_text)


def train_pipelined(cfg: TrainConfig, pipeline: PipelineConfig, *, resume: bool = False,
                    stop_at: int | None = None, progress: bool = True, command: str | None = None,
                    echo=print) -> Path | None:
  """`dfjax.training.train` with the step pipelined; prints the plan and writes OUT/pipeline.png.

  Raises:
    ValueError: the pipeline does not fit the model, batch or devices (the valid choices named),
      or OUT holds a run with another pipeline configuration.
  """
  plan = plan_for(cfg, pipeline)
  out = Path(cfg.out)
  recorded, settings = out / PIPELINE_CONFIG, dataclasses.asdict(pipeline)
  if resume and recorded.is_file() and json.loads(recorded.read_text()) != settings:
    raise ValueError(f"cannot resume {out}: its run was pipelined as {json.loads(recorded.read_text())}, "
                     f"now {settings}; use the original flags or another --out")
  runner = Pipelined(cfg, plan)
  if pipeline.calibrate:
    echo(describe_costs(plan.segment_names,
                        analytic_costs(cfg.model, plan.backbone_shape, plan.microbatch, cfg.frozen_text)[0],
                        (plan.forward, plan.backward)))
  echo(plan.describe_partition())
  echo(describe(plan.timeline))
  out.mkdir(parents=True, exist_ok=True)
  echo(f"timeline chart: {draw(plan.timeline, out / CHART)}")
  if resume or not (out / CHECKPOINTS).is_dir():  # else run_steps refuses to mix runs
    recorded.write_text(json.dumps(settings, indent=2) + "\n")
  finished = run_steps(cfg, init_state=runner.init_state, train_step=runner.train_step, resume=resume,
                       stop_at=stop_at, jitted_init=runner.jitted_init, schedule=make_optimizer(cfg)[1],
                       progress=progress, state_shardings=runner.executor.shardings())
  if finished is None:
    return None
  state, history = finished
  return export_run(cfg, runner.executor.model(state, ema=cfg.ema_decay > 0), history, command,
                    latent_encoder=latent_encoder(plan, state["frozen"]))


def latent_encoder(plan: PipelinePlan, frozen: dict) -> LatentEncoder | None:
  """The plan's frozen VAE encoder with the weights it ran with (`frozen`: the training state's frozen
  parts), for the export; None when the backbone trained on the images."""
  part = next((part for part in plan.frozen_parts if part.makes == X0), None)
  if part is None:
    return None
  return LatentEncoder(part.encoder_module(jax.device_get(frozen[part.name])), part.encoder_config, part.encoder,
                       part.encoder_seed, plan.image_shape[0])
