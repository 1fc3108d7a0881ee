"""`dfjax bench simulate` for the stage strategies: AsyncDiff and PipeFusion, projected from FLOPs.

Stage strategies run different code on each device (a component, or a stage of blocks on a row
patch), so simulate.py's timing of one device's program does not apply, and their full-size models
(SD2.1, SDXL, PixArt-α) do not run on a CPU in useful time. So every device's work is COUNTED, not
timed: the FLOPs of the model's segments (staged.segment_flops, read off the model's layout) summed
over the segments the strategy's own cuts give each device (AsyncDiff's balanced components,
PipeFusion's stage_layers), at a GPU throughput calibrated so that the whole model reproduces a
published single-GPU time (`REFERENCES`; --tflops gives one instead). Communication is the
strategy's `expected_traffic` over a stated link. Per-device compute is FLOPs / rate and
  AsyncDiff   a synchronous warm-up step runs the components in order (the whole model, then every
              activation crossing a cut and the model output, waited for); an asynchronous
              iteration (stride S steps) costs max(slowest component, its traffic): dfjax's
              transfers are carried to the next iteration, so they may overlap (the authors block).
  PipeFusion  the first 1 + warmup_steps steps run the whole image through the stages in order; a
              pipelined step is K = max(M, N) micro-steps, each the slowest stage's work on one patch
              (its FLOPs / M: a patch's queries attend over the whole K/V buffer) plus the patch's
              boundary transfer (not overlapped); the run ends with N − 1 micro-steps of drain. The
              text's work is done once per run, in the first step: the caption projection and every
              cross-attention layer's K/V projections (`text_flops`), and the text states crossing
              each cut (`conditioning_bytes`); no other step repeats it.
  patch       (displaced, ulysses, … beside them) each device 1/N of the model's FLOPs; its warm-up steps
              wait for all their traffic, steady steps as simulate.py: max(compute, overlapped) + sync.
A run is its warm-up steps plus its steady units; × is the single-GPU run over it. These are
projections: ideal FLOP efficiency everywhere (the calibrated rate), links at their full rate with no
contention, no kernel-launch or framework overhead. Published measurements are printed beside them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

from dfjax.bench import simulate, table
from dfjax.bench.models import config_name, model_config
from dfjax.bench.simulate import (LINKS, PIXART_DEVICES, PIXART_SECONDS, PIXART_STEPS, Link, comm_seconds,
                                  projected_step)
from dfjax.bench.table import Column
from dfjax.bench.unet import DTYPES, latent_size
from models.build import segment_names
from dfjax.inputs import TEXT_TOKENS
from dfjax.pipelines.pipeline import KINDS
from models.config import UNetConfig
from models.dit_config import PixArtConfig
from models.presets import FAMILIES
from sharding.accounting import stages as stage_accounting
from sharding.axes import STAGE
from sharding.strategies import Strategy
from sharding.strategies.staged import segment_flops, stages_of

STAGE_STRATEGIES = ("asyncdiff", "pipefusion")
PIXART_TEXT_TOKENS = KINDS["PixArtAlphaPipeline"].max_sequence_length  # 120 T5 tokens per prompt
MASK_ITEMSIZE = 4  # the text keep-mask: the tokenizer's int32 (dfjax/tokenizers.py)
BATCH = 2  # one image with classifier-free guidance on every device, as in both papers
PCIE4 = Link("PCIe 4.0 x16", 32e9, "PCIe 4.0 x16: 16 lanes × 2 GB/s per direction, no NVLink")


@dataclasses.dataclass(frozen=True)
class Reference:
  """A published single-GPU run: what calibrates the compute rate of its GPU on its model."""

  gpu: str
  resolution: int
  steps: int
  seconds: float
  source: str


REFERENCES = {
    "sd21": Reference("A5000", 768, 50, 5.51, "AsyncDiff (Chen et al. 2024): SD2.1, 50 steps, one A5000"),
    "sdxl": Reference("A5000", 1024, 50, 13.81, "AsyncDiff: SDXL, 50 steps, one GPU (A5000, as its SD2.1 runs)"),
    "pixart-alpha-1024": Reference("A100", 1024, PIXART_STEPS, PIXART_SECONDS[1024]["single"],
                                   "PipeFusion paper: PixArt-α, 20 DPM-Solver steps, one A100"),
}
# Relative dense fp16 tensor throughput (spec sheets): the L20 is projected from the A100's calibration.
L20_VS_A100 = 119.5 / 312
# AsyncDiff's measured speedups over one A5000 (50 steps, warm-up 9), {config: {resolution: {(N, S): ×}}}.
ASYNCDIFF_SPEEDUPS = {"sd21": {768: {(2, 1): 1.8, (3, 1): 2.3, (4, 1): 2.6, (2, 2): 3.0, (3, 2): 4.0}},
                      "sdxl": {1024: {(3, 2): 3.8}}}
# PipeFusion paper, PixArt-α 20 steps over PCIe, {platform: (GPUs, {strategy: seconds})}; the issue that
# quotes them gives no resolution: shown beside 1024², the resolution of its NVLink table.
PCIE_SECONDS = {"A100 PCIe": (4, {"pipefusion": 0.866, "displaced": 2.331}),
                "L20 PCIe": (8, {"pipefusion": 1.356, "displaced": 4.43})}
PCIE_RESOLUTION = 1024


@dataclasses.dataclass(frozen=True)
class Platform:
  """GPUs of one kind on one link: the compute rate, the link, and published seconds of runs on it."""

  name: str
  flops_per_s: float
  link: Link
  published: Mapping[tuple[int, str, str], float]  # (resolution, strategy or NkSs label, GPUs) → seconds


# ---------------------------------------------------------------------------------- one configuration

@dataclasses.dataclass(frozen=True)
class StageRun:
  """One configuration's projected run: `warm` synchronous steps, then `units` steady units.

  A unit is what repeats after warm-up: an AsyncDiff iteration (stride steps), a PipeFusion
  micro-step, a patch strategy's step; `units_per_step` converts it to diffusion steps. FLOPs are the
  slowest device's; bytes what the strategy's devices receive.
  """

  resolution: int
  strategy: str
  label: str  # e.g. N3S2, N=4 M=8, N=4
  devices: int
  steps: int
  warm: int
  warm_flops: float
  warm_bytes: float
  units: int
  units_per_step: float
  unit_flops: float
  unit_sync_bytes: float = 0
  unit_async_bytes: float = 0
  unit_collectives: int = 0
  once_flops: float = 0  # done once per run, beside the steps (PipeFusion's text projections, the first step)
  once_bytes: float = 0  # sent once per run (PipeFusion's text states, across each cut)

  def unit_s(self, platform: Platform, latency_s: float) -> float:
    comm = comm_seconds(self.unit_sync_bytes, self.unit_async_bytes, self.unit_collectives, platform.link,
                        latency_s)
    return projected_step(self.unit_flops / platform.flops_per_s, *comm)

  def step_s(self, platform: Platform, latency_s: float) -> float:
    """One steady diffusion step."""
    return self.units_per_step * self.unit_s(platform, latency_s)

  def run_s(self, platform: Platform, latency_s: float) -> float:
    warm_step = self.warm_flops / platform.flops_per_s + self.warm_bytes / platform.link.bytes_per_s
    once = self.once_flops / platform.flops_per_s + self.once_bytes / platform.link.bytes_per_s
    return once + self.warm * warm_step + self.units * self.unit_s(platform, latency_s)

  def published_s(self, platform: Platform) -> float | None:
    name = self.label if self.strategy == "asyncdiff" else self.strategy  # AsyncDiff's figures are per NkSs
    return platform.published.get((self.resolution, name, self.devices))


def text_tokens(config) -> int:
  """The text tokens the model's pipeline conditions on: PixArt-α's 120 T5 tokens, Stable Diffusion's 77
  CLIP tokens (a DiT has none: its class label is not a sequence)."""
  return PIXART_TEXT_TOKENS if isinstance(config, PixArtConfig) else TEXT_TOKENS


def model_flops(config, side: int) -> list[float]:
  """Each segment's FLOPs for one step of the guidance pair (BATCH samples)."""
  return [BATCH * f for f in segment_flops(config, side, side, text_tokens(config))]


def stage_flops(flops: Sequence[float], cuts: Sequence[int]) -> list[float]:
  """The FLOPs of each stage the segment indices `cuts` start."""
  owner = stages_of(cuts, len(flops))
  return [sum(f for f, s in zip(flops, owner) if s == stage) for stage in range(len(cuts) + 1)]


def synchronous_bytes(config, side: int, cuts: Sequence[int], activation_bytes: int) -> float:
  """What a synchronous step through the stages waits for: each activation crossing a cut, once, and
  the model output broadcast from the last stage."""
  owner = stages_of(cuts, len(segment_names(config)))
  values = sum(v for *_, v in stage_accounting.transfers(config, side, side, owner))
  return BATCH * activation_bytes * (values + stage_accounting.prediction_values(config, side, side))


def stage_sizes(devices: int) -> dict[str, int]:
  return simulate.simulated_sizes(1) | {STAGE: devices}


def single_run(config, resolution: int, steps: int) -> StageRun:
  flops = sum(model_flops(config, resolution // 8))
  return StageRun(resolution, "single", "", devices=1, steps=steps, warm=0, warm_flops=0, warm_bytes=0,
                  units=steps, units_per_step=1, unit_flops=flops)


def asyncdiff_run(config, resolution: int, components: int, stride: int, steps: int, warmup_steps: int,
                  activation_bytes: int) -> StageRun:
  """AsyncDiff with N = `components` on N + stride − 1 GPUs, its cuts balanced by the cost model."""
  side, devices = resolution // 8, components + stride - 1
  strategy, sizes = Strategy.asyncdiff(stride=stride, warmup_steps=warmup_steps), stage_sizes(devices)
  strategy.validate(config, side, side, sizes)  # N and S the model's segments allow, with the valid ones
  cuts = strategy.cuts_for(config, side, side, components)
  flops = model_flops(config, side)
  traffic = strategy.expected_traffic(config, side, side, sizes, BATCH, activation_bytes)
  overlapped = sum(b for kind, b in traffic.items() if kind in strategy.overlapped_kinds())
  warm = strategy.phases(steps, sizes)[0].stop
  return StageRun(resolution, "asyncdiff", asyncdiff_label(components, stride), devices, steps, warm,
                  warm_flops=sum(flops), warm_bytes=synchronous_bytes(config, side, cuts, activation_bytes),
                  units=math.ceil((steps - warm) / stride), units_per_step=1 / stride,
                  unit_flops=max(stage_flops(flops, cuts)), unit_sync_bytes=sum(traffic.values()) - overlapped,
                  unit_async_bytes=overlapped)


def asyncdiff_label(components: int, stride: int) -> str:
  return f"N{components}S{stride}"


def pipefusion_run(config, resolution: int, stages: int, patches: int, steps: int,
                   activation_bytes: int) -> StageRun:
  """PipeFusion with N = `stages` GPUs and M = `patches` row patches: its default ⌈L/N⌉ blocks per stage,
  or, where that leaves the last stage empty (28 blocks on 8), the blocks as evenly as they split ("even")."""
  side, sizes, label = resolution // 8, stage_sizes(stages), f"N={stages} M={patches}"
  strategy = Strategy.pipefusion(num_patches=patches)
  blocks = getattr(config, "num_layers", 0)  # a transformer's (validate refuses any other model)
  if 0 < stages <= blocks and blocks - math.ceil(blocks / stages) * (stages - 1) < 1:
    even = [blocks // stages + (s < blocks % stages) for s in range(stages)]
    strategy, label = dataclasses.replace(strategy, stage_layers=even), f"{label} even"
  strategy.validate(config, side, side, sizes)
  cuts = strategy.cuts_for(config, side, side, stages)
  flops = model_flops(config, side)
  micro_steps = max(patches, stages)
  traffic = strategy.expected_traffic(config, side, side, sizes, BATCH, activation_bytes)
  warm = strategy.synchronous_steps(steps)
  units = (steps - warm) * micro_steps + (stages - 1 if steps > warm else 0)  # the drain
  # once per run: each stage's text projections, and the text states (and their mask) across each cut
  text_flops = strategy.text_flops(config, stages, BATCH, text_tokens(config))
  text_bytes = (stages - 1) * strategy.conditioning_bytes(config, BATCH, activation_bytes, text_tokens(config),
                                                           MASK_ITEMSIZE)
  image_flops = [f - text for f, text in zip(stage_flops(flops, cuts), text_flops)]  # each stage's per call
  return StageRun(resolution, "pipefusion", label, stages, steps, warm,
                  warm_flops=sum(image_flops), warm_bytes=synchronous_bytes(config, side, cuts, activation_bytes),
                  units=units, units_per_step=micro_steps, unit_flops=max(image_flops) / patches,
                  unit_sync_bytes=sum(traffic.values()) / micro_steps,  # waited for: not overlapped
                  once_flops=sum(text_flops), once_bytes=text_bytes)


def patch_runs(config, resolution: int, devices: int, name: str, steps: int,
               activation_bytes: int) -> list[StageRun]:
  """A row strategy on `devices` GPUs (each of its splits: usp's ring × Ulysses degrees), 1/N of the FLOPs
  each; its warm-up steps wait for all their traffic."""
  side, runs = resolution // 8, []
  strategy, flops = Strategy.from_name(name), sum(model_flops(config, resolution // 8))
  for split in strategy.image_splits(devices):
    sizes = simulate.simulated_sizes(devices, split)
    strategy.validate(config, side, side, sizes)
    sync, overlapped, collectives = simulate.comm_bytes(config, side, devices, strategy, activation_bytes, split)
    warm = min(steps, strategy.steady_phase(sizes).start)
    label = simulate.describe_split(split) if len(split) > 1 else f"N={devices}"
    runs.append(StageRun(resolution, name, label, devices, steps, warm, warm_flops=flops,
                         warm_bytes=sync + overlapped, units=steps - warm, units_per_step=1,
                         unit_flops=flops / devices, unit_sync_bytes=sync, unit_async_bytes=overlapped,
                         unit_collectives=collectives))
  return runs


# ---------------------------------------------------------------------------------- platforms

def platforms(config, preset: str, tflops: float | None) -> tuple[Platform, ...]:
  """The GPUs and links projected: a UNet on AsyncDiff's A5000s over PCIe; a transformer on A100s over
  NVLink and PCIe and on L20s over PCIe (PipeFusion's platforms). The rate: calibrated, or `tflops`."""
  reference = REFERENCES.get(preset)
  if tflops is None and reference is None:
    raise ValueError(f"no published single-GPU time calibrates {preset!r} (known: {', '.join(REFERENCES)}): "
                     "give the GPU's achieved throughput with --tflops.")
  rate = tflops * 1e12 if tflops is not None else (
      reference.steps * sum(model_flops(config, reference.resolution // 8)) / reference.seconds)
  if isinstance(config, UNetConfig):
    published = {(resolution, asyncdiff_label(n, s), n + s - 1): reference.seconds / speedup
                 for resolution, speedups in ASYNCDIFF_SPEEDUPS.get(preset, {}).items()
                 for (n, s), speedup in speedups.items()}
    if reference:
      published[reference.resolution, "single", 1] = reference.seconds
    return (Platform(f"{reference.gpu if reference else 'GPU'} {PCIE4.name}", rate, PCIE4, published),)
  known = preset == "pixart-alpha-1024"  # the published tables are of this model
  nvlink = {(resolution, name, 1 if name == "single" else PIXART_DEVICES): seconds
            for resolution, figures in PIXART_SECONDS.items() if known for name, seconds in figures.items()}
  single = {key: s for key, s in nvlink.items() if key[1] == "single"}
  pcie = {name: {(PCIE_RESOLUTION, strategy, devices): s for strategy, s in figures.items()} if known else {}
          for name, (devices, figures) in PCIE_SECONDS.items()}
  return (Platform(LINKS[0].name, rate, LINKS[0], nvlink),  # an A100's link
          Platform(f"A100 {PCIE4.name}", rate, PCIE4, single | pcie["A100 PCIe"]),
          Platform(f"L20 {PCIE4.name}", rate * L20_VS_A100, PCIE4, pcie["L20 PCIe"]))


# ---------------------------------------------------------------------------------- the table

def columns(single: Mapping[int, StageRun], targets: Sequence[Platform], latency_s: float) -> tuple[Column, ...]:
  """The table's columns; `single` maps a resolution to its single-GPU run (the reference of ×)."""
  per_platform = []
  for p in targets:
    run_s = lambda run, p=p: run.run_s(p, latency_s)  # noqa: E731
    paper_x = lambda run, p=p: _ratio(single[run.resolution].published_s(p), run.published_s(p))  # noqa: E731
    per_platform += [Column("step ms", lambda run, p=p: run.step_s(p, latency_s), ".1f", 7, 1e3, group=p.name),
                     Column("run s", run_s, ".3f", 6, group=p.name),
                     Column("×", lambda run, r=run_s: r(single[run.resolution]) / r(run), ".2f", 5, group=p.name),
                     Column("paper s", lambda run, p=p: run.published_s(p), ".3f", 7, group=p.name),
                     Column("paper ×", paper_x, ".1f", 7, group=p.name)]
  return (Column("res", "resolution", width=5), Column("strategy", "strategy", width=10, align="<"),
          Column("split", "label", width=14, align="<"), Column("GPUs", "devices", width=4),
          Column("warm", "warm", width=4),
          Column("TFLOP/step", lambda run: run.unit_flops * run.units_per_step, ".2f", 10, 1e-12),
          Column("MiB/step", lambda run: (run.unit_sync_bytes + run.unit_async_bytes) * run.units_per_step, ".1f",
                 8, 1 / simulate.MIB), *per_platform)


def _ratio(a: float | None, b: float | None) -> float | None:
  return None if a is None or b is None else a / b


def run(model: str, config: str | None, resolutions: Sequence[int], strategies: Sequence[str], *,
        stages: Sequence[int] | None = None, strides: Sequence[int] = (1, 2),
        patches_per_stage: Sequence[int] = (1,),
        patch: Sequence[int] = (2, 4, 8), steps: int | None = None, warmup_steps: int = 9,
        tflops: float | None = None, dtype: str = "bf16", latency_us: float = 0.0) -> list[StageRun]:
  """Projects, prints and returns the single-GPU run and every configuration of `strategies`.

  Args:
    stages: AsyncDiff's component counts N (default 2 3 4) and PipeFusion's stage counts N (default `patch`).
    strides: AsyncDiff's strides S (devices = N + S − 1).
    patches_per_stage: PipeFusion's M = k × N for each k.
    patch: GPUs of the row strategies beside them (displaced, ulysses, …).
    steps: diffusion steps (default: the calibrating publication's, else 50).
    warmup_steps: AsyncDiff's synchronous steps (the authors' SD2.1 and SDXL runs: 9 of 50).
  """
  config_ = model_config(model, config)
  preset = config or FAMILIES[model][1]
  unknown = [s for s in strategies if s not in (*STAGE_STRATEGIES, *simulate.simulated_strategies())]
  if unknown:
    raise ValueError(f"unknown strategies {unknown} for simulate; valid: "
                     f"{', '.join((*STAGE_STRATEGIES, *simulate.simulated_strategies()))}.")
  counts = [*(stages or ()), *strides, *patches_per_stage, *patch]
  if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in counts) or latency_us < 0:
    raise ValueError(f"--stages {stages}, --stride {strides}, --patches-per-stage {patches_per_stage} and --patch "
                     f"{patch} must be positive integers, --latency-us {latency_us} ≥ 0.")
  reference = REFERENCES.get(preset)
  steps = steps or (reference.steps if reference else 50)
  activation_bytes = np.dtype(DTYPES[dtype]).itemsize
  for resolution in resolutions:
    latent_size(config_, resolution)  # whole latents and tokens, with the advice in pixels
  targets = platforms(config_, preset, tflops)
  runs = [single_run(config_, resolution, steps) for resolution in resolutions]
  for resolution in resolutions:  # every configuration is checked (bad N or S: ValueError) before printing
    for name in strategies:
      if name == "asyncdiff":
        runs += [asyncdiff_run(config_, resolution, n, s, steps, warmup_steps, activation_bytes)
                 for s in strides for n in (stages or (2, 3, 4))]  # the paper's order: N2S1, N3S1, …
      elif name == "pipefusion":
        runs += [pipefusion_run(config_, resolution, n, k * n, steps, activation_bytes)
                 for n in (stages or patch) for k in patches_per_stage]
      else:
        runs += [r for n in patch for r in patch_runs(config_, resolution, n, name, steps, activation_bytes)]
  runs.sort(key=lambda r: (r.resolution, r.strategy != "single"))
  single = {r.resolution: r for r in runs if r.strategy == "single"}
  _print_header(config_name(model, config), preset, targets, steps, dtype, latency_us)
  print(table.render(columns(single, targets, latency_us * 1e-6), runs))
  return runs


def _print_header(name: str, preset: str, targets: Sequence[Platform], steps: int, dtype: str,
                  latency_us: float) -> None:
  reference = REFERENCES.get(preset)
  calibration = (f"calibrated: the whole model's FLOPs at {reference.resolution}² in {reference.seconds} s for "
                 f"{reference.steps} steps ({reference.source})" if reference else "given by --tflops")
  print(f"simulate (stage strategies): {name}, {steps} steps, CFG batch {BATCH} per GPU, {dtype} activations. "
        f"PROJECTIONS FROM FLOP COUNTS, nothing timed: compute = FLOPs / the GPU's rate ({calibration}); "
        f"comm = the strategy's expected bytes / link + {latency_us:g} µs per collective.")
  for p in targets:
    print(f"  {p.name}: {p.flops_per_s / 1e12:.1f} TFLOP/s achieved, {p.link.bytes_per_s / 1e9:.0f} GB/s per GPU "
          f"per direction ({p.link.source})")
  if any(p.name.startswith("L20") for p in targets):  # PipeFusion's platforms
    print(f"  L20: the A100 rate × {L20_VS_A100:.3f} (their dense fp16 tensor TFLOP/s, spec sheets); PCIe figures "
          f"shown at {PCIE_RESOLUTION}², the issue quoting them gives no resolution; PipeFusion 'even': its blocks "
          "split as evenly as they go, where the default ⌈L/N⌉ per stage leaves the last one empty")
  print("warm: synchronous steps; TFLOP/step, MiB/step: the slowest GPU's steady step; run s: the whole run; "
        "× = single-GPU run / run; paper s, paper ×: published measurements on that platform (AsyncDiff's: the "
        "single-GPU seconds / its speedup).")
