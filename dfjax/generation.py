"""One batch sampled with several strategies and compared with `single`: what `dfjax generate` runs.

The same noise and conditioning go through `dfjax.sample` once per strategy: `single` on one
device (per guidance half), the patch strategies on a `cfg × patch` mesh. Each strategy's
program is compiled first and then run, so compile and sampling times are measured apart. The
images of every strategy, a side-by-side sheet with the amplified difference from `single`, and
the raw arrays are written to the output folder, with PSNR and SSIM against `single` and, for a
class-conditional model of the shapes dataset, each strategy's class accuracy (the share of its
images the shipped classifier names with the class asked for, dfjax/eval/quality.py). The
command (dfjax/commands/generate.py) only parses flags and prints the report.

What is sampled (`Source`):
  * by default, an embedded model (`dfjax.training.load_default_model`): the class-conditional
    pixel-space UNet (`model="unet"`) or DiT (`model="dit"`), 64×64 RGB, one image per class;
  * `checkpoint=` a `dfjax train` model folder (class-conditional, as above), or a
    `dfjax convert`ed diffusers UNet. dfjax has no text encoder or VAE yet, so a converted
    text-to-image UNet is run text-free: its "prompt" is seeded Gaussian token embeddings of the
    right width (zeros for the unconditional half), and its latents are drawn as pictures of
    their first three channels, not decoded images.

Each strategy runs on its own mesh (`strategy_mesh`), built from the axes it splits an image over
and the devices one image gets (all the cfg axis leaves): `single` on one device (per guidance half);
the row-patch and sequence strategies over `patch` (by default cfg=1 × patch=8 on 8 (virtual)
devices: every device owns 8 of the 64 rows, DistriFusion's hardest setting, its 8-GPU column, where
naive patches lose the most context and stale activations matter most); `tensor` over `tensor`; `usp`
over `patch` × `ulysses`; the pipeline strategies (`pipefusion`, `asyncdiff`) over `stage`, at most
`DEFAULT_STAGES` stages unless --stage says otherwise. A device count left to its default shrinks to
the most devices a strategy fits (pipefusion: at most the DiT's blocks; tensor: a degree dividing the
heads); one given (--patch, --stage) is used as given. `cfg=2` splits guidance instead and leaves
each image half the devices. Without named strategies, every one of `DEFAULT_STRATEGIES` that runs
the model's family runs where it fits; the others are reported as skipped, with the reason (each
strategy's own `validate` decides: ulysses needs heads divisible by its degree). Every run's mesh is
printed beside its metrics.
PSNR and SSIM are computed on the images clipped to [0, 1] (data range 1), per image, then
averaged over the batch.

Shape letters: B batch, H rows, W columns, C channels, T tokens, D token width.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from dfjax import data, images, metrics
from dfjax.bench.timing import compile_and_time
from dfjax.eval.quality import QualityJudge
from dfjax.inputs import initial_noise, standin_conditioning
from dfjax.loading import load_model, load_scheduler_config
from dfjax.sampling import Conditioning, prepare_sample
from dfjax.training import load_default_model, load_trained
from dfjax.training.default_model import DEFAULT_EMBEDDED, default_model_dir
from dfjax.training.export import TrainedModel, is_trained_model, latent_encoder_record
from sharding.axes import PATCH, STAGE
from sharding.mesh import axis_sizes, describe, make_mesh
from sharding.strategies import Strategy, strategy_names, with_shared_options

REFERENCE = "single"  # the strategy every other is compared with
# Run, in this order, those that fit the model and the mesh, when no strategy is named.
DEFAULT_STRATEGIES = (REFERENCE, "displaced", "ulysses", "ring", "naive", "pipefusion", "asyncdiff")
# Stages of the pipeline strategies unless --stage is given: AsyncDiff's authors run N ≤ 4 components
# (more would predict from a latent N − 1 steps old), and the embedded DiT has 4 blocks for PipeFusion.
DEFAULT_STAGES = 4
DEFAULT_GUIDANCE = 4.0
DIFF_GAIN = 4.0  # |strategy − single| is drawn this many times brighter


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
  """Settings of one `dfjax generate` run (its flags).

  Attributes:
    model: the embedded model sampled when there is no checkpoint (`EMBEDDED_MODELS`: unet, dit, dit8).
    checkpoint: a model folder; None samples the embedded `model`.
    strategies: strategy names, run in this order; `single` is the reference of the metrics.
      None: those of DEFAULT_STRATEGIES that fit the model and the mesh.
    patch: devices per image of the row-patch, sequence and tensor strategies (row patches; usp's
      ring × Ulysses; the tensor degree); None: every device the cfg axis leaves (row patches capped
      to the largest count the image height allows), shrunk to what each strategy fits.
    stage: `stage` devices of the pipeline strategies (pipefusion's stages, asyncdiff's N + S − 1);
      None: DEFAULT_STAGES or the devices one image has if fewer, shrunk to what each strategy fits.
    cfg: 2 splits the guidance halves over two device groups.
    steps, scheduler, guidance_scale: the sampler.
    warmup_steps, groupnorm: the displaced strategy's options.
    seed: the noise (and a text-free checkpoint's stand-in prompt).
    images: images in the batch (classes cycle); None: one per class (8 without classes).
    size: sample height = width (pixels or latent rows); None: the model's sample_size.
    out: output folder.
  """

  model: str = DEFAULT_EMBEDDED
  checkpoint: str | None = None
  strategies: tuple[str, ...] | None = None
  patch: int | None = None
  stage: int | None = None
  cfg: int = 1
  steps: int = 50
  scheduler: str = "ddim"
  guidance_scale: float = DEFAULT_GUIDANCE
  warmup_steps: int = 4
  groupnorm: str = "corrected_async"
  seed: int = 0
  images: int | None = None
  size: int | None = None
  out: str = "dfjax-out"

  def __post_init__(self):
    default_model_dir(self.model)  # raises on an unknown name, naming the embedded models
    if self.strategies is not None and not self.strategies:
      raise ValueError(f"no strategy given: name at least one of {', '.join(strategy_names())}")
    if self.strategies is not None and len(set(self.strategies)) != len(self.strategies):
      raise ValueError(f"strategies {list(self.strategies)} name one more than once")
    for name, value in (("steps", self.steps), ("images", self.images), ("patch", self.patch),
                        ("stage", self.stage), ("size", self.size)):
      if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"{name}={value!r} must be a positive integer")
    if self.cfg not in (1, 2):
      raise ValueError(f"cfg={self.cfg} must be 1 or 2 (guidance has two halves)")
    if self.cfg == 2 and self.guidance_scale == 1.0:
      raise ValueError("cfg=2 splits the guidance halves, but guidance_scale=1 has no unconditional half")

  def strategy_names(self) -> tuple[str, ...]:
    """The strategies to try: those named, else DEFAULT_STRATEGIES (of which those that fit run)."""
    return DEFAULT_STRATEGIES if self.strategies is None else self.strategies

  def for_model(self, strategies: list[Strategy], model_config) -> list[Strategy]:
    """Of `strategies`, those to try on the model: every named one; of the defaults, those that run
    its family (the others are not offered, rather than skipped with a reason)."""
    return strategies if self.strategies is not None else [s for s in strategies if s.supports(model_config)]

  def strategy(self, name: str) -> Strategy:
    """The named strategy, with those of this run's strategy options (warm-up, GroupNorm mode) it takes."""
    return with_shared_options(name, {"warmup_steps": self.warmup_steps, "groupnorm": self.groupnorm})


@dataclasses.dataclass(frozen=True)
class Source:
  """What is sampled: the denoiser, its inputs, and how its output becomes pictures.

  Attributes:
    unet: the denoiser, a UNet or a DiT (`unet.config` is its UNetConfig or DiTConfig).
    scheduler_config: diffusers scheduler config dict (None: diffusers' defaults).
    cond, uncond: (B, …) conditioning of the batch and of its unconditional half.
    captions: one caption per image (its class name, or its seed).
    pixel_space: the denoiser outputs RGB images in [-1, 1]; False: latents (no VAE to decode them).
    description: one line naming the model, for the report.
    labels: (B,) the dataset class of each image, for a class-conditional model of `dfjax.data`;
      None otherwise (nothing to judge the class of).
  """

  unet: Any
  scheduler_config: dict | None
  cond: Conditioning
  uncond: Conditioning
  captions: list[str]
  pixel_space: bool
  description: str
  labels: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class StrategyRun:
  """One strategy's run: where, how long, what came out, and how close it is to `single`."""

  name: str
  mesh: str
  compile_s: float
  sample_s: float
  pictures: np.ndarray            # (B, H, W, 3) in [-1, 1], as written
  psnr_db: np.ndarray | None      # (B,) against single; None without a single run
  ssim: np.ndarray | None
  correct: np.ndarray | None = None  # (B,) the classifier names the class asked for; None without classes

  @property
  def accuracy(self) -> float | None:
    return None if self.correct is None else float(np.mean(self.correct))


@dataclasses.dataclass(frozen=True)
class GenerateResult:
  """What a run produced: its settings, a line describing it, every strategy's run, the files written."""

  config: GenerateConfig
  description: str
  runs: list[StrategyRun]
  files: list[Path]
  skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # default strategy → why it did not fit


# ------------------------------------------------------------------------------ what is sampled

def embedded_source(count: int | None, name: str = DEFAULT_EMBEDDED) -> Source:
  """The shipped class-conditional model `name` (unet, dit, dit8); `count` images cycling over the classes."""
  return _class_source(load_default_model(name), count, f"embedded {name} ({default_model_dir(name)})")


def checkpoint_source(path: str, count: int | None, seed: int) -> Source:
  """A `dfjax train` folder (class-conditional) or a converted diffusers UNet (text-free)."""
  if is_trained_model(path):
    _refuse_latent_model(path)
    return _class_source(load_trained(path), count, f"class-conditional model {path}")
  unet = load_model(path)
  config, batch = unet.config, count or 8
  side = 8 * (config.sample_size if isinstance(config.sample_size, int) else 128)  # image pixels (VAE ×8)
  return Source(
      unet, load_scheduler_config(path), standin_conditioning(config, batch, (side, side), seed=seed),
      standin_conditioning(config, batch, (side, side), zeros=True),
      [f"seed {seed} #{i}" for i in range(batch)], _is_pixel_space(config),
      f"converted UNet {path}, text-free (random prompt embeddings, zeros unconditional)")


def _refuse_latent_model(path: str) -> None:
  """A `--frozen-encoder` run's model draws latents that no decoder turns into images: nothing to show,
  compare as pictures, or classify."""
  latent = latent_encoder_record(path)
  if latent is not None:
    h, w, channels = latent["latent_shape"]
    raise ValueError(f"{path} was trained with --frozen-encoder {latent['name']}: it draws {h}×{w}×{channels} "
                     "latents of a fixed-seed stand-in VAE encoder, which has no decoder, so they cannot be drawn "
                     "as images or classified; generate with a model trained without --frozen-encoder (or "
                     "sample its latents from Python: dfjax.training.load_trained, "
                     "dfjax.training.export.load_latent_encoder)")


def _class_source(trained: TrainedModel, count: int | None, description: str) -> Source:
  num_classes = trained.num_classes
  labels_b = np.arange(count or num_classes) % num_classes  # B
  names = data.class_names if num_classes == data.num_classes else [f"class {k}" for k in range(num_classes)]
  cond, uncond = trained.conditioning(labels_b)
  return Source(trained.denoiser, trained.scheduler_config, cond, uncond, [names[k] for k in labels_b],
                _is_pixel_space(trained.denoiser.config), f"{description}, {num_classes} classes",
                labels=labels_b if num_classes == data.num_classes else None)


def _is_pixel_space(config) -> bool:
  return config.in_channels == 3 and config.out_channels == 3


# ----------------------------------------------------------------------------------- the runs

def resolve_patch(config, height: int, patch: int | None, cfg: int, device_count: int) -> int:
  """The patch count to use: `patch`, checked, or the most the devices and the height allow."""
  valid = config.valid_row_splits(height)
  if patch is None:
    fitting = [n for n in valid if n * cfg <= device_count]
    if not fitting:
      raise ValueError(f"cfg={cfg} needs {cfg} devices, but {device_count} are available")
    return fitting[-1]
  if patch not in valid:
    raise ValueError(f"patch={patch} does not fit the {height}-row image: every patch needs a multiple "
                     f"of {config.row_granularity} rows (whole rows at the model's coarsest resolution); "
                     f"valid patch counts: {valid}")
  if cfg * patch > device_count:
    raise ValueError(f"cfg={cfg} × patch={patch} needs {cfg * patch} devices, but {device_count} are "
                     f"available: on a CPU, pass --devices {cfg * patch} (virtual devices), or use "
                     f"patch ≤ {device_count // cfg}")
  return patch


def strategy_mesh(strategy: Strategy, config, size: int, cfg: int, devices: int, *, given: bool) -> Mesh:
  """The mesh on which `strategy` splits each image of the model `config` at `size` over `devices` devices.

  Its first split of them (`image_splits`: one axis, or usp's ring × Ulysses) that its `validate`
  accepts; unless the count was `given`, the most devices below it that fit (at least 2: one device
  is `single`, not the method). A strategy that splits nothing runs on one device per guidance half.
  Raises the ValueError of the largest count tried when none fits, naming the valid choices.
  """
  counts = [1] if not strategy.axes else [devices] if given else range(devices, 1, -1)
  first_error = None
  for count in counts:
    splits = strategy.image_splits(count)
    if not splits and first_error is None:
      first_error = ValueError(f"{strategy.name} has no way to split an image over {count} devices "
                               f"(its axes: {', '.join(sorted(strategy.axes))}): use another device count")
    for split in splits:
      mesh = make_mesh(1, cfg, **{PATCH: 1, **split})  # too few devices fail here
      try:
        strategy.validate(config, size, size, axis_sizes(mesh))
        return mesh
      except ValueError as error:
        first_error = first_error or error
  raise first_error


def strategy_meshes(strategies: list[Strategy], config, size: int, run: GenerateConfig, device_count: int
                    ) -> tuple[dict[str, Mesh], dict[str, str]]:
  """{name: mesh} of the strategies that fit (`strategy_mesh`), and {name: why not} of the others.

  The pipeline strategies (those over `stage`) get `run.stage` devices per image, the others
  `run.patch` (each None: as many as fit, see GenerateConfig). When the user named the strategies
  (`run.strategies`), one that does not fit raises its ValueError instead of being skipped.
  """
  if run.patch is not None:
    resolve_patch(config, size, run.patch, run.cfg, device_count)  # a given row count fits the image
  elif device_count < run.cfg:
    raise ValueError(f"cfg={run.cfg} needs {run.cfg} devices, but {device_count} are available")
  per_image = run.patch or device_count // run.cfg
  stages = run.stage or min(DEFAULT_STAGES, per_image)
  meshes, skipped = {}, {}
  for strategy in strategies:
    pipeline = strategy.method_axis == STAGE
    try:
      meshes[strategy.name] = strategy_mesh(strategy, config, size, run.cfg, stages if pipeline else per_image,
                                            given=(run.stage if pipeline else run.patch) is not None)
    except ValueError as error:
      if run.strategies is not None:
        raise
      skipped[strategy.name] = str(error)
  return meshes, skipped


def timed_sample(unet, noise, cond, uncond, *, mesh, strategy, on_compiled=None,
                 **kwargs) -> tuple[np.ndarray, float, float]:
  """Compiles, then runs `dfjax.sample`: (output on the host, compile seconds, sample seconds).

  The run is checked (`check_finite`): what it returns is written, so non-finite inputs or latents
  raise ValueError or FloatingPointError naming the strategy and the first bad step, never NaN
  images. `on_compiled()`, if given, is called between compiling and running.
  """
  program = prepare_sample(unet, noise, cond, uncond=uncond, mesh=mesh, strategy=strategy, check_finite=True,
                           **kwargs)
  timed = compile_and_time(program.lowered, program.inputs, on_compiled=on_compiled)
  try:
    latents = program.latents(timed.output)
  except FloatingPointError as error:
    raise FloatingPointError(f"{strategy.summary()} on {describe(mesh)}: {error}") from None
  return np.asarray(latents), timed.compile_s, timed.run_s


def generate(config: GenerateConfig, *, progress: bool = True) -> GenerateResult:
  """Samples the batch with every strategy of `config`, writes the images, reports the metrics.

  Raises:
    ValueError: an unknown strategy or GroupNorm mode, a patch count that does not fit the
      image, or a mesh larger than the devices — before anything is compiled.
    OSError: `config.out` cannot be written (see `check_output_path`) — before the model loads.
    FloatingPointError: a strategy's latents became NaN or infinite (nothing is written).
  """
  strategies = [config.strategy(name) for name in config.strategy_names()]  # bad names fail here
  check_output_path(Path(config.out), folder=True)
  with tqdm(total=1 + 2 * len(strategies) + 1, desc="load model", unit="stage", disable=not progress) as bar:
    return _generate(config, strategies, bar)


def _generate(config: GenerateConfig, strategies: list[Strategy], bar) -> GenerateResult:
  source = (embedded_source(config.images, config.model) if config.checkpoint is None
            else checkpoint_source(config.checkpoint, config.images, config.seed))
  bar.update()
  unet_config = source.unet.config
  size = config.size or model_size(unet_config)
  unet_config.check_latent_size(size, size)
  strategies = config.for_model(strategies, unet_config)
  meshes, skipped = strategy_meshes(strategies, unet_config, size, config, len(jax.devices()))
  strategies = [s for s in strategies if s.name in meshes]
  bar.total = 2 + 2 * len(strategies)  # loading, then each strategy's compile and run, then writing
  noise = initial_noise(config.seed, len(source.captions), size, size, unet_config.in_channels)
  sampler = dict(scheduler=config.scheduler, scheduler_config=source.scheduler_config,
                 num_steps=config.steps, guidance_scale=config.guidance_scale)

  outputs, times = {}, {}
  for strategy in strategies:
    bar.set_description(f"{strategy.name}: compile")

    def compiled(name=strategy.name):
      bar.update()
      bar.set_description(f"{name}: {config.steps} steps")

    out, compile_s, sample_s = timed_sample(source.unet, noise, source.cond, source.uncond,
                                            mesh=meshes[strategy.name], strategy=strategy,
                                            on_compiled=compiled, **sampler)
    bar.update()
    outputs[strategy.name], times[strategy.name] = out, (compile_s, sample_s)
  bar.set_description("write images")

  reference = outputs.get(REFERENCE)
  judge = QualityJudge() if can_judge(source, size) else None
  runs = []
  for strategy in strategies:
    out = outputs[strategy.name]
    pictures = out if source.pixel_space else images.latents_to_images(out, reference)
    psnr_b = ssim_b = None
    if reference is not None:
      ref_pictures = reference if source.pixel_space else images.latents_to_images(reference, reference)
      unit, ref_unit = metrics.to_unit_range(pictures), metrics.to_unit_range(ref_pictures)
      psnr_b, ssim_b = metrics.psnr(unit, ref_unit), metrics.ssim(unit, ref_unit)
    correct_b = None if judge is None else judge.accuracy(pictures, source.labels)
    runs.append(StrategyRun(strategy.name, _describe(strategy, meshes[strategy.name]),
                            *times[strategy.name], pictures, psnr_b, ssim_b, correct_b))
  files = write_outputs(Path(config.out), runs, source.captions)
  bar.update()
  description = (f"{source.description}; {len(source.captions)} images of {size}×{size}, "
                 f"{config.steps}-step {config.scheduler}, guidance {config.guidance_scale}, "
                 f"seed {config.seed}")
  return GenerateResult(config, description, runs, files, skipped)


def model_size(unet_config) -> int:
  """The side a denoiser config samples at (its sample_size, or the first of its pair)."""
  size = unet_config.sample_size
  if size is None:
    raise ValueError("the model's config has no sample_size: pass the size (--size)")
  return size if isinstance(size, int) else size[0]


def can_judge(source: Source, size: int) -> bool:
  """Whether the classifier can judge the pictures: dataset classes, RGB pixels at the dataset's size."""
  return source.labels is not None and source.pixel_space and size == data.IMAGE_SIZE


def _describe(strategy: Strategy, mesh) -> str:
  options = strategy.options()
  return describe(mesh) + (f" ({options})" if options else "")


# --------------------------------------------------------------------------------- the output

def write_outputs(out: Path, runs: list[StrategyRun], captions: list[str]) -> list[Path]:
  """Each strategy's grid, the comparison sheet, the arrays (samples.npz) and metrics.json."""
  files = []
  for run in runs:
    files.append(images.save_png(images.grid(images.to_uint8(run.pictures), columns=5),
                                 out / f"{run.name}.png", scale=2))
  reference = next((r for r in runs if r.name == REFERENCE), None)
  columns = [(run.name, images.to_uint8(run.pictures)) for run in runs]
  if reference is not None:
    columns += [(f"|{run.name}-{REFERENCE}|x{DIFF_GAIN:g}",
                 images.difference(run.pictures, reference.pictures, DIFF_GAIN))
                for run in runs if run is not reference]
  files.append(images.save_png(images.sheet(columns, row_labels=captions), out / "comparison.png"))
  np.savez_compressed(out / "samples.npz", **{run.name: run.pictures for run in runs})
  files.append(out / "samples.npz")
  summary = {run.name: {"mesh": run.mesh, "compile_s": run.compile_s, "sample_s": run.sample_s,
                        **_metrics_json(run)} for run in runs}
  (out / "metrics.json").write_text(
      json.dumps({"captions": captions, "runs": summary}, indent=2, allow_nan=False) + "\n")
  files.append(out / "metrics.json")
  return files


def _metrics_json(run: StrategyRun) -> dict:
  """PSNR (null for an image identical to single's, flagged in `identical`), SSIM and class accuracy
  (null without classes), as valid JSON."""
  quality = {"accuracy": run.accuracy,
             "correct": None if run.correct is None else [bool(c) for c in run.correct]}
  if run.psnr_db is None:
    return {"psnr_db": None, "identical": None, "ssim": None, **quality}
  return {"psnr_db": metrics.json_values(run.psnr_db), "identical": metrics.identical(run.psnr_db),
          "ssim": metrics.json_values(run.ssim), **quality}


def check_output_path(path: Path, *, folder: bool) -> None:
  """Raises the OSError that writing `path` (a folder to write into, or a file) would raise, before any work.

  Nothing is created: `path`, if it exists, must be of the right kind and writable, else the
  nearest existing folder above it must be a writable folder.
  """
  if path.exists():
    if path.is_dir() != folder:
      raise (NotADirectoryError(errno.ENOTDIR, "the output folder is a file", str(path)) if folder else
             IsADirectoryError(errno.EISDIR, "the output file is a folder", str(path)))
    if not folder:
      _check_writable(path, path, os.W_OK)
      return
  nearest = next(p for p in (path, *path.parents) if p.exists())
  if not nearest.is_dir():
    raise NotADirectoryError(errno.ENOTDIR, f"{path} cannot be written: a file is on its way", str(nearest))
  _check_writable(path, nearest, os.W_OK | os.X_OK)


def _check_writable(path: Path, nearest: Path, mode: int) -> None:
  if os.statvfs(nearest).f_flag & os.ST_RDONLY:
    raise OSError(errno.EROFS, f"{path} cannot be written (read-only file system)", str(nearest))
  if not os.access(nearest, mode):
    raise PermissionError(errno.EACCES, f"{path} cannot be written (permission denied)", str(nearest))
