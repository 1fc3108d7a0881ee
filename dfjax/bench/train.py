"""`dfjax bench train`: data parallel, GPipe, 1F1B and DiffusionPipe training side by side.

Measured: every method trains the same model on the same global batch through the same executor
(dfjax/training/pipeline_step.py; data parallel is its one-stage case over every device): steps per
second after compilation, each device's idle fraction in the executed schedule (its timeline
under the analytic per-segment FLOPs: a virtual CPU device has no clock of its own; with
`--calibrate`, under each segment's forward and backward timed once on this machine, the costs the
partition is then planned with too), and the
compiled step's temporary memory per device (XLA's memory analysis of the SPMD program: 1F1B's
activation stash holds about S micro-batches where GPipe's holds all M). On a CPU the
devices share the cores, so the steps/s say what the executor costs, not what a pipeline gains.

Projected: the planner's iteration times at full size — SD2.1's UNet (models/presets.py) at a
96 × 96 latent with its frozen OpenCLIP ViT-H text encoder and the SD VAE's encoder as the frozen
jobs (analytic FLOPs, written out below) — beside the paper's 1.41× (over pipeline baselines) and
1.28× (over data parallel). Labelled projections: device FLOP/s and the gradient all-reduce
bandwidth are assumptions stated in the table's notes; pipeline activation transfers are left out.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from dfjax.bench.flops import segment_flops
from dfjax.bench.table import Column, render
from dfjax.bench.timing import device_name
from dfjax.training.loop import TrainConfig
from dfjax.training.pipeline_backbone import Backbone
from dfjax.training.pipeline_calibrate import describe_costs
from dfjax.training.pipeline_plan import PipelineConfig, analytic_costs, make_plan
from dfjax.training.pipeline_schedule import FrozenJob, Timeline, plan
from dfjax.training.pipeline_step import executor_for
from models.build import unet_param_shapes
from models.config import UNetConfig
from models.presets import unet_preset

PAPER = {"gpipe": 1.41, "1f1b": 1.41, "data": 1.28}  # DiffusionPipe's reported speedups (up to)


@dataclasses.dataclass(frozen=True)
class TrainRow:
  """One method's measurement (or projection: seconds are then modelled)."""

  method: str
  stages: int
  microbatches: int
  data: int
  step_seconds: float
  idle: tuple[float, ...]  # per device, from the schedule's timeline
  temp_bytes: int | None = None  # the compiled step's temporaries per device (measured rows only)
  stash_slots: int | None = None  # activations a stage keeps between ticks (pipelined rows only)
  speedup_of_diffusionpipe: float | None = None
  paper: float | None = None

  @property
  def steps_per_second(self) -> float:
    return 1.0 / self.step_seconds

  @property
  def mean_idle(self) -> float:
    return float(np.mean(self.idle))


def device_idle(timeline: Timeline) -> tuple[float, ...]:
  """Each device's idle fraction of the iteration (the leftover frozen work spread over the stages)."""
  span = timeline.makespan
  share = timeline.leftover / timeline.stages
  return tuple(1.0 - (timeline.busy(s) + share) / span if span else 0.0 for s in range(timeline.stages))


def _methods(devices: int, microbatches: int, calibrate: bool, encoder: str) -> list[tuple[str, PipelineConfig]]:
  return [("data", PipelineConfig(1, 1, devices, "1f1b", calibrate, encoder)),
          *((name, PipelineConfig(devices, microbatches, 1, name, calibrate, encoder))
            for name in ("gpipe", "1f1b", "diffusionpipe"))]


def measure(model: str = "tiny", batch: int = 8, image_size: int = 32, devices: int = 4, microbatches: int = 4,
            iters: int = 3, *, calibrate: bool = False, frozen_encoder: str = "none", frozen_text: str = "none",
            echo=print) -> list[TrainRow]:
  """Steps/s and idle fractions of the four methods on `devices` devices, one global batch
  (`calibrate`: planned with timed segment costs, which `echo` prints beside the analytic FLOPs;
  `frozen_encoder`: every method trains on that frozen encoder's latents of the images; `frozen_text`:
  the UNet reads that frozen text encoder's captions, `dfjax train --frozen-text`)."""
  cfg = TrainConfig(out="", model=model, batch=batch, warmup_steps=1, frozen_text=frozen_text)
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (batch, image_size, image_size, 3)).astype(np.float32)
  labels = rng.integers(0, 4, batch).astype(np.int32)
  rows = []
  for method, pipeline in _methods(devices, microbatches, calibrate, frozen_encoder):
    run_plan = make_plan(pipeline, model, batch, (image_size, image_size, 3), frozen_text=frozen_text)
    if calibrate and method == "diffusionpipe":
      analytic = analytic_costs(model, run_plan.backbone_shape, run_plan.microbatch, frozen_text)[0]
      echo(f"{method}'s segment costs per micro-batch of {run_plan.microbatch} (planned with the timed ones):\n"
           + describe_costs(run_plan.segment_names, analytic, (run_plan.forward, run_plan.backward))
           + "\n" + run_plan.describe_partition())
    ex = executor_for(cfg, run_plan)
    state = jax.device_put(ex.init_state(0), ex.shardings())
    inputs = ex.frozen_outputs(state, images, labels)
    step = ex.step.lower(state, inputs, images, labels).compile()  # the one compile: timed and measured
    state, loss, inputs = step(state, inputs, images, labels)
    jax.block_until_ready(loss)
    times = []
    for _ in range(iters):
      began = time.perf_counter()
      state, loss, inputs = step(state, inputs, images, labels)
      jax.block_until_ready(loss)
      times.append(time.perf_counter() - began)
    rows.append(TrainRow(method, pipeline.stages, pipeline.microbatches, pipeline.data, float(np.median(times)),
                         device_idle(run_plan.timeline), step.memory_analysis().temp_size_in_bytes,
                         run_plan.activation_slots().count if pipeline.stages > 1 else None))
  return _with_speedups(rows)


def _with_speedups(rows: list[TrainRow]) -> list[TrainRow]:
  ours = next(r for r in rows if r.method == "diffusionpipe").step_seconds
  return [dataclasses.replace(r, speedup_of_diffusionpipe=r.step_seconds / ours, paper=PAPER.get(r.method))
          for r in rows]


# ---------------------------------------------------------------------------------- projection

def clip_text_layer_flops(width: int = 1024, mlp: int = 4096, tokens: int = 77) -> float:
  """One transformer layer of the text encoder, per sample: Q, K, V, O and the MLP's two matmuls,
  and the two attention matmuls (2 FLOPs per multiply-add)."""
  return 2.0 * tokens * (4 * width * width + 2 * width * mlp) + 2.0 * 2 * tokens * tokens * width


def vae_encoder_block_flops(resolution: int) -> tuple[float, ...]:
  """The SD VAE (KL-f8) encoder per sample, by block: conv_in, four down blocks (two 3×3 resnets each,
  a stride-2 conv but in the last), the mid block (two resnets, one attention), conv_out."""
  def conv(side, cin, cout, k=3):
    return 2.0 * side * side * k * k * cin * cout

  def resnet(side, cin, cout):
    return conv(side, cin, cout) + conv(side, cout, cout) + (conv(side, cin, cout, 1) if cin != cout else 0.0)

  channels, side, blocks = (128, 128, 256, 512, 512), resolution, [conv(resolution, 3, 128)]
  for level in range(4):
    cin, cout = channels[level], channels[level + 1]
    flops = resnet(side, cin, cout) + resnet(side, cout, cout)
    if level < 3:
      flops += conv(side // 2, cout, cout)
      side //= 2
    blocks.append(flops)
  tokens = side * side
  blocks.append(2 * resnet(side, 512, 512) + 2.0 * tokens * 4 * 512 * 512 + 2.0 * 2 * tokens * tokens * 512)
  blocks.append(conv(side, 512, 8))
  return tuple(blocks)


def project(stages: int = 4, microbatches: int = 8, microbatch: int = 8, resolution: int = 768,
            device_flops: float = 125e12, allreduce_bytes_per_second: float = 50e9) -> list[TrainRow]:
  """Modelled iteration times of the four methods for SD2.1 on `stages` devices (one pipeline; data
  parallel runs the same global batch, `stages` replicas), seconds = FLOPs / `device_flops`."""
  config = UNetConfig.from_diffusers_config(unet_preset("sd21"))
  latent = resolution // 8
  forward = [microbatch * f / device_flops for f in segment_flops(config, latent, latent, text_tokens=77).values()]
  backward = [2 * f for f in forward]
  samples = microbatches * microbatch
  text = FrozenJob("text_encoder", (samples * clip_text_layer_flops() / device_flops,) * 24, samples)
  vae = FrozenJob("vae_encoder", tuple(samples * f / device_flops for f in vae_encoder_block_flops(resolution)),
                  samples)
  rows = []
  for name in ("gpipe", "1f1b", "diffusionpipe"):
    timeline = plan(name, forward, backward, stages, microbatches, frozen=[text, vae])
    rows.append(TrainRow(name, stages, microbatches, 1, timeline.makespan, device_idle(timeline)))
  # data parallel: each device runs samples / stages through the whole model and the frozen parts,
  # then a ring all-reduce of the fp32 gradients
  params = sum(int(np.prod(shape)) for shape in unet_param_shapes(unet_preset("sd21")).values())
  compute = (sum(forward) + sum(backward)) * microbatches / stages + (text.cost + vae.cost) / stages
  allreduce = 2 * (stages - 1) / stages * 4 * params / allreduce_bytes_per_second
  rows.insert(0, TrainRow("data", 1, 1, stages, compute + allreduce, (allreduce / (compute + allreduce),) * stages))
  return _with_speedups(rows)


COLUMNS = [Column("method", "method", align="<", width=13), Column("S", "stages"), Column("M", "microbatches"),
           Column("D", "data"), Column("step s", "step_seconds", ".3g", width=8),
           Column("steps/s", "steps_per_second", ".3g", width=8),
           Column("idle per device", lambda r: " ".join(f"{100 * i:.0f}%" for i in r.idle), align="<", width=16),
           Column("mean idle", "mean_idle", ".1%", width=9),
           Column("stash", "stash_slots", "d", width=5),
           Column("temp MiB", lambda r: None if r.temp_bytes is None else r.temp_bytes / 2**20, ".3g", width=8),
           Column("DiffusionPipe ×", "speedup_of_diffusionpipe", ".2f"), Column("paper ×", "paper", ".2f")]


def run(model: str, batch: int, image_size: int, devices: int, microbatches: int, iters: int,
        calibrate: bool = False, frozen_encoder: str = "none", frozen_text: str = "none") -> tuple[list, list]:
  measured = measure(model, batch, image_size, devices, microbatches, iters, calibrate=calibrate,
                     frozen_encoder=frozen_encoder, frozen_text=frozen_text)
  costs = "segment costs timed on this device (--calibrate)" if calibrate else "analytic FLOPs"
  encoder = "" if frozen_encoder == "none" else f" through the frozen {frozen_encoder!r} VAE encoder (its latents)"
  encoder += "" if frozen_text == "none" else f", conditioned by the frozen {frozen_text!r} text encoder"
  print(f"measured: {model} ({Backbone.of(model).kind}), global batch {batch} of {image_size}² images{encoder}, {devices} "
        f"devices ({device_name()}; virtual CPU devices share the cores: steps/s are the executor's cost, not a "
        f"pipeline's gain); idle = the executed schedule's timeline under {costs}")
  print(render(COLUMNS, measured))
  projected = project()
  print("\nprojection (modelled, not measured): SD2.1 UNet at 768² + frozen OpenCLIP ViT-H text encoder + "
        "SD VAE encoder, 4 devices, 8 micro-batches of 8; 125 TFLOP/s per device, gradient all-reduce "
        "at 50 GB/s, activation transfers left out")
  print(render(COLUMNS, projected))
  return measured, projected

