"""`dfjax bench fidelity`: the shape of DistriFusion's Table 1 on dfjax's embedded model.

How close do patch-parallel images come to the one-device image? For every patch count and
every GroupNorm mode, `displaced` (DistriFusion) and `naive` (independent patches) sample the
same seeds as `single`, and each image's PSNR and SSIM against its `single` twin is reported as
mean ± std over the seeds. A second table ablates the displaced warm-up steps with a 10-step
DPM-Solver++(2M) run, where a warm-up step is a larger share of the run. A third, on the main
table's sampler, runs the pipeline methods that run the model: AsyncDiff over a grid of components
N, stride S and warm-up steps (stage = N + S − 1 devices), and, on a DiT (`model="dit"`),
PipeFusion over stages N, patches M = N and 2N, and warm-up (stage = N devices); a grid point the
model or the devices do not allow is skipped with the reason. The last judges every run,
`single` included, without reference to `single`: the class accuracy of its images and their
Fréchet classifier distance to dataset images of the same classes (dfjax/eval/quality.py), with
the distance the dataset's own images score at the same sample count beside it.

All seeds go through one `dfjax.sample` call per configuration (batch = seeds); seed i samples
class i mod K from noise that depends only on i. On a CPU the devices are virtual: the
metrics are what they would be on real devices, the times are not speedups.

The paper (SDXL, 1024², 50-step DDIM): DistriFusion 24.6 / 23.0 / 22.0 dB PSNR on 2 / 4 / 8
GPUs, naive patches 14.0 / 10.7 / 7.7 dB. AsyncDiff's and PipeFusion's papers report no PSNR against
one GPU (they are not pixel-faithful by design; AsyncDiff reports LPIPS 0.21–0.38 against the
original, CLIP score and FID), hence the class accuracy and Fréchet distance of every row.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from dfjax import metrics
from dfjax.bench import table
from dfjax.bench.table import Column
from dfjax.bench.timing import device_name
from dfjax.eval.quality import Quality, QualityJudge
from dfjax.generation import (DEFAULT_GUIDANCE, REFERENCE, Source, can_judge, check_output_path, checkpoint_source,
                              embedded_source, model_size, resolve_patch, timed_sample)
from dfjax.inputs import initial_noise
from dfjax.training.default_model import DEFAULT_EMBEDDED, default_model_dir
from models.config import UNetConfig
from sharding.axes import PATCH
from sharding.exchange.groupnorm import GroupNormMode
from sharding.mesh import axis_sizes, describe, make_mesh
from sharding.strategies import Strategy

ABLATION_WARMUPS = (0, 1, 2, 4)
ABLATION_SCHEDULER, ABLATION_STEPS = "dpmpp_2m", 10
TABLES = ("main", "warmup", "pipeline")
PAPER_PSNR = {"displaced": {2: 24.6, 4: 23.0, 8: 22.0}, "naive": {2: 14.0, 4: 10.7, 8: 7.7}}


@dataclasses.dataclass(frozen=True)
class FidelityConfig:
  """Settings of one `dfjax bench fidelity` run.

  Attributes:
    seeds: images per configuration (seed i samples class i mod K).
    steps: DDIM steps of the main table.
    patch: patch counts of the main table.
    groupnorm: GroupNorm modes of the displaced rows.
    warmup_steps: warm-up of the main table's displaced rows.
    ablation_patch: patch count of the warm-up ablation (None: the largest of `patch`; 0: skip).
    asyncdiff_components, asyncdiff_strides, asyncdiff_warmup: the AsyncDiff grid (N, S, warm-up
      steps; the paper runs N2S1, N3S1, N4S1, N2S2, N3S2 and warm-up 9 of 50).
    pipefusion_stages, pipefusion_patches_per_stage, pipefusion_warmup: the PipeFusion grid (N, M / N,
      warm-up steps after its first synchronous step), for models it runs (DiT, PixArt).
    tables: which tables run: "main" (displaced and naive by patch count), "warmup" (the ablation),
      "pipeline" (AsyncDiff and PipeFusion).
    guidance_scale: the sampler's guidance.
    model, checkpoint: the embedded model (`EMBEDDED_MODELS`: unet, dit, dit8), or a `dfjax train` folder instead.
  """

  seeds: int = 16
  steps: int = 50
  patch: tuple[int, ...] = (2, 4, 8)
  groupnorm: tuple[str, ...] = tuple(m.value for m in GroupNormMode)
  warmup_steps: int = 4
  ablation_patch: int | None = None
  asyncdiff_components: tuple[int, ...] = (2, 3, 4)
  asyncdiff_strides: tuple[int, ...] = (1, 2)
  asyncdiff_warmup: tuple[int, ...] = (1, 3, 9)
  pipefusion_stages: tuple[int, ...] = (2, 4, 8)
  pipefusion_patches_per_stage: tuple[int, ...] = (1, 2)
  pipefusion_warmup: tuple[int, ...] = (0, 1, 2)
  tables: tuple[str, ...] = TABLES
  guidance_scale: float = DEFAULT_GUIDANCE
  model: str = DEFAULT_EMBEDDED
  checkpoint: str | None = None

  def __post_init__(self):
    if not isinstance(self.seeds, int) or self.seeds < 1:
      raise ValueError(f"seeds={self.seeds!r} must be a positive integer")
    if not isinstance(self.steps, int) or self.steps < 1:
      raise ValueError(f"steps={self.steps!r} must be a positive integer")
    if not self.patch or any(p < 2 for p in self.patch):
      raise ValueError(f"patch counts {list(self.patch)} must be 2 or more (1 is `single` itself)")
    for mode in self.groupnorm:
      GroupNormMode.parse(mode)
    if not self.tables or set(self.tables) - set(TABLES):
      raise ValueError(f"tables={list(self.tables)}: name one or more of {', '.join(TABLES)}")
    default_model_dir(self.model)  # raises on an unknown name, naming the embedded models


@dataclasses.dataclass(frozen=True)
class Row:
  """One configuration's per-seed metrics: against `single` (None for `single` itself) and on their own."""

  table: str             # "main" or "warmup"
  strategy: str
  groupnorm: str | None
  patch: int
  warmup_steps: int | None
  psnr_db: np.ndarray | None  # (seeds,)
  ssim: np.ndarray | None
  compile_s: float
  sample_s: float
  quality: Quality | None = None  # None: a model without the dataset's classes
  mesh: str = ""     # the pipeline rows' mesh, e.g. "cfg=1×stage=3×patch=1"
  options: str = ""  # the pipeline rows' strategy options, e.g. "stride 2, warm-up 3"

  @property
  def setting(self) -> str:
    """Where and how it ran, in words: "patch=4, corrected_async, warm-up 4", "stage=3, stride 2, warm-up 3"."""
    if self.mesh:
      return f"{self.mesh}, {self.options}"
    words = [f"patch={self.patch}"] + [self.groupnorm] * (self.groupnorm is not None)
    return ", ".join(words + [f"warm-up {self.warmup_steps}"] * (self.warmup_steps is not None))

  def to_json(self) -> dict:
    """The row as valid JSON: a PSNR of ∞ (an image identical to single's) is null, flagged in `identical`."""
    fields = {**{k: getattr(self, k) for k in ("table", "strategy", "groupnorm", "patch", "warmup_steps",
                                               "mesh", "options", "compile_s", "sample_s")},
              "quality": None if self.quality is None else self.quality.to_json()}
    if self.psnr_db is None:
      return fields
    with np.errstate(invalid="ignore"):  # the std of values with an ∞ is NaN: null
      (psnr_mean, psnr_std), (ssim_mean, ssim_std) = (metrics.json_values([np.mean(v), np.std(v)])
                                                      for v in (self.psnr_db, self.ssim))
    return {**fields, "psnr_db": metrics.json_values(self.psnr_db), "identical": metrics.identical(self.psnr_db),
            "ssim": metrics.json_values(self.ssim), "psnr_mean": psnr_mean, "psnr_std": psnr_std,
            "ssim_mean": ssim_mean, "ssim_std": ssim_std}


def _configurations(config: FidelityConfig, ablation_patch: int, groupnorm: tuple[str, ...]):
  """(table, patch, strategy, its GroupNorm mode, its warm-up) of every patch run, in run order.

  `groupnorm`: the displaced rows' modes (those of `config` that change the model's image). The mode and
  warm-up are None for naive, which has neither.
  """
  if "main" in config.tables:
    for patch in config.patch:
      for mode in groupnorm:
        yield "main", patch, Strategy.displaced(config.warmup_steps, mode), mode, config.warmup_steps
      yield "main", patch, Strategy.naive(), None, None
  if "warmup" in config.tables and ablation_patch:
    for warmup in ABLATION_WARMUPS:
      yield "warmup", ablation_patch, Strategy.displaced(warmup, "corrected_async"), "corrected_async", warmup


def _pipeline_grid(config: FidelityConfig) -> list[tuple[Strategy, int]]:
  """(strategy, `stage` devices) of every point of the AsyncDiff and PipeFusion grids (bad options raise here)."""
  if "pipeline" not in config.tables:
    return []
  asyncdiff = [(Strategy.asyncdiff(stride=stride, warmup_steps=warmup), n + stride - 1)
               for n in config.asyncdiff_components for stride in config.asyncdiff_strides
               for warmup in config.asyncdiff_warmup]
  pipefusion = [(Strategy.pipefusion(num_patches=per_stage * n, warmup_steps=warmup), n)
                for n in config.pipefusion_stages for per_stage in config.pipefusion_patches_per_stage
                for warmup in config.pipefusion_warmup]
  return asyncdiff + pipefusion


def _pipeline_runs(grid, model_config, size: int, device_count: int) -> tuple[list[tuple[Strategy, object]], list[str]]:
  """The grid points that run the model and fit it and the devices, on their meshes; why each other does not
  (a strategy that does not run the model's family at all is left out, not reported)."""
  fitting, skipped = [], []
  for strategy, stage in grid:
    if not strategy.supports(model_config):
      continue
    where = f"{strategy.summary()} on stage={stage}"
    if stage > device_count:
      skipped.append(f"{where}: needs {stage} devices, {device_count} are available (--cpu-devices {stage})")
      continue
    mesh = make_mesh(1, 1, 1, stage=stage)
    try:
      strategy.validate(model_config, size, size, axis_sizes(mesh))
    except ValueError as error:
      skipped.append(f"{where}: {error}")
      continue
    fitting.append((strategy, mesh))
  return fitting, skipped


def measure(config: FidelityConfig, *, progress: bool = True) -> tuple[list[Row], Source, list[str]]:
  """Runs every configuration; returns its rows (per-seed metrics), what was sampled, and the grid
  points skipped, with the reason."""
  import jax

  grid = _pipeline_grid(config)
  source = (embedded_source(config.seeds, config.model) if config.checkpoint is None
            else checkpoint_source(config.checkpoint, config.seeds, 0))
  if not source.pixel_space:
    raise ValueError("bench fidelity compares images; this checkpoint outputs latents and dfjax has "
                     "no VAE to decode them yet: use the embedded model or a `dfjax train` folder")
  unet = source.unet
  size = model_size(unet.config)
  if "main" in config.tables:
    for patch in config.patch:  # every patch count fits before anything runs
      resolve_patch(unet.config, size, patch, 1, len(jax.devices()))
      make_mesh(1, 1, patch)
  ablation_patch = max(config.patch) if config.ablation_patch is None else config.ablation_patch
  if "warmup" in config.tables and ablation_patch:
    resolve_patch(unet.config, size, ablation_patch, 1, len(jax.devices()))
  pipelines, skipped = _pipeline_runs(grid, unet.config, size, len(jax.devices()))
  groupnorm = config.groupnorm
  if "main" in config.tables and not isinstance(unet.config, UNetConfig) and len(groupnorm) > 1:
    groupnorm = groupnorm[:1]  # the mode only says how GroupNorm moments combine: one row says it all
    skipped.append(f"displaced with GroupNorm {', '.join(config.groupnorm[1:])}: the model has no GroupNorm, "
                   f"so each mode samples the {groupnorm[0]} row's image")
  noise = initial_noise(0, config.seeds, size, size, unet.config.in_channels)
  runs = [(table, make_mesh(1, 1, patch), strategy, mode, warmup_steps)
          for table, patch, strategy, mode, warmup_steps in _configurations(config, ablation_patch, groupnorm)]
  runs += [("pipeline", mesh, strategy, None, strategy.warmup_steps) for strategy, mesh in pipelines]
  main = dict(scheduler="ddim", num_steps=config.steps)
  samplers = {"main": main, "pipeline": main, "warmup": dict(scheduler=ABLATION_SCHEDULER, num_steps=ABLATION_STEPS)}
  if not runs:
    raise ValueError("nothing to run: " + ("; ".join(skipped) or f"tables {list(config.tables)} have no rows"))
  reference_tables = {}  # one `single` reference per sampler, labelled with the first table that uses it
  for name in TABLES:
    if any(table == name for table, *_ in runs):
      reference_tables.setdefault(samplers[name]["scheduler"], name)
  judge = QualityJudge() if can_judge(source, size) else None

  bar = tqdm(total=len(reference_tables) + len(runs), unit="run", disable=not progress)

  def run(table, mesh, strategy):
    bar.set_description(f"{table}: {strategy.summary()} on {describe(mesh)}")
    out, compile_s, sample_s = timed_sample(
        unet, noise, source.cond, source.uncond, mesh=mesh, strategy=strategy,
        scheduler_config=source.scheduler_config, guidance_scale=config.guidance_scale, **samplers[table])
    bar.update()
    return out, compile_s, sample_s, None if judge is None else judge(out, source.labels)

  rows, references = [], {}
  for scheduler, name in reference_tables.items():
    out, compile_s, sample_s, quality = run(name, make_mesh(1, 1, 1), Strategy.single())
    references[scheduler] = metrics.to_unit_range(out)
    rows.append(Row(name, REFERENCE, None, 1, None, None, None, compile_s, sample_s, quality))
  for table, mesh, strategy, groupnorm, warmup_steps in runs:
    out, compile_s, sample_s, quality = run(table, mesh, strategy)
    images, reference = metrics.to_unit_range(out), references[samplers[table]["scheduler"]]
    pipeline = table == "pipeline"
    rows.append(Row(table, strategy.name, groupnorm, axis_sizes(mesh)[PATCH], warmup_steps,
                    metrics.psnr(images, reference), metrics.ssim(images, reference), compile_s, sample_s, quality,
                    mesh=describe(mesh) if pipeline else "", options=strategy.options() if pipeline else ""))
  bar.close()
  return rows, source, skipped


def _cell(values: np.ndarray, digits: int) -> str:
  with np.errstate(invalid="ignore"):  # the std of PSNRs with an ∞ (identical images) is NaN
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def format_tables(rows: list[Row], config: FidelityConfig) -> str:
  """The main table (PSNR and SSIM by method × patch count), the warm-up ablation, the pipeline methods,
  and the quality of every run (each of those that ran)."""
  main = [r for r in rows if r.table == "main" and r.psnr_db is not None]
  patches = sorted({r.patch for r in main})
  by_patch = (Column("method", lambda line: line[0], width=10, align="<"),
              Column("groupnorm", lambda line: line[1], width=16, align="<"),
              *(Column(f"patch={p}", lambda line, p=p: line[2].get(p), width=15) for p in patches))
  methods = list(dict.fromkeys((r.strategy, r.groupnorm) for r in main))
  lines = []
  for metric, digits, unit in (("psnr_db", 2, "PSNR dB"), ("ssim", 3, "SSIM")) if main else ():
    lines.append(f"{unit} vs single (mean ± std over {config.seeds} seeds), {config.steps}-step DDIM, "
                 f"displaced warm-up {config.warmup_steps}:")
    cells = [(strategy, groupnorm, {r.patch: _cell(getattr(r, metric), digits) for r in main
                                    if (r.strategy, r.groupnorm) == (strategy, groupnorm)})
             for strategy, groupnorm in methods]
    if metric == "psnr_db":
      cells += [("paper", f"SDXL {name}", {p: str(v) for p, v in PAPER_PSNR[name].items()})
                for name in ("displaced", "naive")]
    lines += [table.render(by_patch, cells, indent="  "), ""]
  warmup = [r for r in rows if r.table == "warmup" and r.psnr_db is not None]
  if warmup:
    lines.append(f"Warm-up ablation: {ABLATION_STEPS}-step DPM-Solver++(2M), displaced corrected_async, "
                 f"patch={warmup[0].patch}, vs single with the same sampler:")
    lines.append(table.render((Column("warm-up", "warmup_steps", width=7), *VS_SINGLE), warmup, indent="  "))
  pipeline = [r for r in rows if r.table == "pipeline" and r.psnr_db is not None]
  if pipeline:
    lines += ["", f"Pipeline methods vs single (mean ± std over {config.seeds} seeds), {config.steps}-step DDIM "
              "(asyncdiff: N components + stride S − 1 stage devices; pipefusion: N stages, M patches):",
              table.render((*METHOD_COLUMNS, *VS_SINGLE), pipeline, indent="  ")]
  judged = [r for r in rows if r.quality is not None]
  if judged:
    q = judged[0].quality
    lines += ["", f"Class accuracy and Fréchet classifier distance (FID analogue; ± bootstrap std) of each run's "
              f"{q.samples} images against {q.reference_images:,} dataset images of the same classes; "
              f"{q.samples} fresh dataset images score {q.dataset_floor:.2f}, the floor at this sample count:",
              table.render(QUALITY_COLUMNS, judged, indent="  ")]
  return "\n".join(lines).rstrip()


VS_SINGLE = (Column("PSNR dB", lambda r: _cell(r.psnr_db, 2), width=15),
             Column("SSIM", lambda r: _cell(r.ssim, 3), width=15))
METHOD_COLUMNS = (Column("method", "strategy", width=10, align="<"), Column("setting", "setting", width=44, align="<"))
QUALITY_COLUMNS = (
    Column("table", "table", width=8, align="<"), *METHOD_COLUMNS,
    Column("class acc", lambda r: r.quality.accuracy, ".0%", 9),
    Column("Fréchet", lambda r: f"{r.quality.frechet:.2f} ± {r.quality.frechet_std:.2f}", width=15))


def run(config: FidelityConfig, json_out: str | None = None, command: str = "dfjax bench fidelity") -> list[Row]:
  """`dfjax bench fidelity`: measures, prints the tables with machine and command, writes JSON.

  An unwritable `json_out` raises its OSError before anything runs (`check_output_path`); a run
  whose latents turn NaN or infinite raises FloatingPointError naming it, and nothing is written.
  """
  if json_out:
    check_output_path(Path(json_out), folder=False)
  start = time.perf_counter()
  rows, source, skipped = measure(config)
  wall_s = time.perf_counter() - start
  print(f"model: {source.description}; guidance {config.guidance_scale}")
  for reason in skipped:
    print(f"skipped {reason}")
  print(f"machine: {device_name()}; command: {command}; wall time {wall_s:.0f} s")
  print(format_tables(rows, config))
  if json_out:
    Path(json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(json_out).write_text(json.dumps(
        {"model": source.description, "machine": device_name(), "command": command, "wall_s": wall_s,
         "config": dataclasses.asdict(config), "skipped": skipped, "rows": [r.to_json() for r in rows]}, indent=2, allow_nan=False)
        + "\n")
    print(f"wrote {json_out}")
  return rows
