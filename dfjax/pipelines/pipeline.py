"""`dfjax.load_pipeline(DIR)` → a text-to-image pipeline: tokenize → encode → sample → decode.

The checkpoint is a whole diffusers pipeline converted by `dfjax convert` (convert/convert.py): the
denoiser at its root, `vae/`, `text_encoder/` (and `text_encoder_2/`), the tokenizer folders and the
scheduler config, with the pipeline's class and options in the manifest. Each stage is one jitted
program: the prompt encoding (dfjax/pipelines/prompts.py), the whole sampling loop (`dfjax.sample`, any
strategy, on any mesh) and the VAE decode (dfjax/vae_decode.py: exact patch parallelism over `patch`
when `vae_patch` asks for it). Images come out as diffusers' `output_type="np"` gives them: (B, H, W, 3)
float in [0, 1].

Shape letters: B images, H, W image rows and columns, h, w latent rows and columns, C latent channels.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from dfjax.inputs import initial_noise
from dfjax.loading import component_folder, load_model, load_scheduler_config, verify_files
from dfjax.pipelines.prompts import ClipPrompts, SDXLPrompts, T5Prompts
from dfjax.sampling import sample
from dfjax.schedulers import SchedulerConfig, make_scheduler
from dfjax.tokenizers import load_tokenizer
from dfjax.vae_decode import decode_latents
from convert.format import read_manifest
from sharding.mesh import make_mesh
from sharding.strategies import Strategy

OUTPUT_TYPES = ("np", "pil", "latent")


@dataclasses.dataclass(frozen=True)
class PipelineKind:
  """What a diffusers pipeline class needs: its text components, prompt scheme and diffusers' defaults."""

  text_components: tuple[str, ...]
  guidance_scale: float
  max_sequence_length: int | None = None  # T5 tokens per prompt (PixArt); CLIP uses model_max_length


KINDS = {
    "StableDiffusionPipeline": PipelineKind(("text_encoder", "tokenizer"), 7.5),
    "StableDiffusionXLPipeline": PipelineKind(("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"), 5.0),
    "PixArtAlphaPipeline": PipelineKind(("text_encoder", "tokenizer"), 4.5, max_sequence_length=120),
    "PixArtSigmaPipeline": PipelineKind(("text_encoder", "tokenizer"), 4.5, max_sequence_length=300),
}
"""The diffusers pipeline classes `load_pipeline` runs, by model_index.json's `_class_name`."""


@dataclasses.dataclass(frozen=True)
class StageTimes:
  """Seconds of the last call's stages (compilation included on a first call of a shape)."""

  encode_s: float
  sample_s: float
  decode_s: float


class TextToImagePipeline:
  """A converted diffusers text-to-image pipeline; call it with prompts (see `__call__`).

  Attributes:
    denoiser, vae: the models (`model.config` each); prompts: the prompt encoder of its scheme.
    pipeline_class: the diffusers pipeline class it was converted from.
    scheduler_config: its diffusers scheduler config dict.
    vae_scale_factor: image pixels per latent pixel along each side.
    last_times: the `StageTimes` of the last call (None before one).
  """

  def __init__(self, path: Path, pipeline_class: str, denoiser, vae, prompts, scheduler_config: dict | None):
    self.path = path
    self.pipeline_class = pipeline_class
    self.kind = KINDS[pipeline_class]
    self.denoiser, self.vae, self.prompts = denoiser, vae, prompts
    self.scheduler_config = scheduler_config or {}
    self.vae_scale_factor = vae.config.downsample_factor
    self.last_times: StageTimes | None = None

  @property
  def default_size(self) -> tuple[int, int] | None:
    """(height, width) in pixels when none is given: the denoiser's sample_size (latent pixels, one side or
    both) times the VAE's factor, as diffusers; None when the config has no sample_size."""
    size = self.denoiser.config.sample_size
    if size is None:
      return None
    rows, cols = (size, size) if isinstance(size, int) else size
    return rows * self.vae_scale_factor, cols * self.vae_scale_factor

  @property
  def size_multiple(self) -> int:
    """What image sides must be multiples of: the VAE's factor times the denoiser's row granularity."""
    return self.vae_scale_factor * self.denoiser.config.row_granularity

  def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
               height: int | None = None, width: int | None = None, num_steps: int = 50,
               guidance_scale: float | None = None, seed: int = 0, latents: Any = None,
               mesh: jax.sharding.Mesh | None = None, strategy: Strategy | None = None,
               vae_patch: int | None = None, output_type: str = "np", scheduler: str | None = None,
               clip_skip: int | None = None, max_sequence_length: int | None = None):
    """Images of `prompt`.

    Args:
      prompt: one prompt or a list (one image each); `negative_prompt` the same (a string: for every prompt).
      height, width: image size in pixels (None: the denoiser's sample_size × the VAE factor).
      num_steps, guidance_scale: the sampler (guidance None: diffusers' default of the pipeline class;
        1.0 samples without guidance).
      seed: the noise, when `latents` is None: image i's noise depends on (seed, i) only.
      latents: (B, h, w, C) unit Gaussian noise (NHWC) to start from instead.
      mesh, strategy: how the sampling loop is spread (`dfjax.sample`'s arguments).
      vae_patch: decode with the latent rows split over this many devices (exact); None: one device.
      output_type: "np" (B, H, W, 3) float in [0, 1]; "pil" a list of PIL images; "latent" the sampled latents.
      scheduler: a dfjax scheduler name; None: the checkpoint's scheduler class.
      clip_skip: CLIP layers to skip from the layer the pipeline reads (diffusers' clip_skip).
      max_sequence_length: T5 tokens per prompt (PixArt; None: the pipeline class's default).
    Raises:
      ValueError: bad prompts, a size the VAE and denoiser cannot take (naming the nearest valid one),
        latents of the wrong shape, an unknown output type, or what `dfjax.sample` refuses.
    """
    if output_type not in OUTPUT_TYPES:
      raise ValueError(f"output_type={output_type!r}; choose one of {', '.join(map(repr, OUTPUT_TYPES))}")
    prompts, negatives = _prompt_lists(prompt, negative_prompt)
    height, width = self.check_size(height, width)
    guidance_scale = self.kind.guidance_scale if guidance_scale is None else float(guidance_scale)
    lengths = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    if lengths and not isinstance(self.prompts, T5Prompts):
      raise ValueError("max_sequence_length sets T5's tokens per prompt (PixArt); CLIP tokenizers pad to their "
                       "model_max_length: pass None")
    start = time.perf_counter()
    cond, uncond = self.prompts.encode(prompts, negatives, guided=guidance_scale != 1.0, height=height,
                                       width=width, clip_skip=clip_skip, **lengths)
    jax.block_until_ready((cond, uncond))
    encoded = time.perf_counter()
    noise = self._noise(latents, seed, len(prompts), height, width)
    sampled = sample(self.denoiser, noise, cond, uncond=uncond,
                     scheduler=scheduler or self._scheduler_name(num_steps), scheduler_config=self.scheduler_config,
                     num_steps=num_steps, guidance_scale=guidance_scale, mesh=mesh, strategy=strategy)
    sampled = jax.block_until_ready(sampled)
    done_sampling = time.perf_counter()
    if output_type == "latent":
      self.last_times = StageTimes(encoded - start, done_sampling - encoded, 0.0)
      return np.asarray(sampled)
    decode_mesh = None if vae_patch in (None, 1) else make_mesh(patch=vae_patch)
    decoded = np.asarray(decode_latents(self.vae, sampled, mesh=decode_mesh))  # B, H, W, 3 in about [-1, 1]
    self.last_times = StageTimes(encoded - start, done_sampling - encoded, time.perf_counter() - done_sampling)
    images = np.clip(decoded / 2 + 0.5, 0.0, 1.0)  # diffusers' VaeImageProcessor.postprocess
    return images if output_type == "np" else to_pil(images)

  def check_size(self, height: int | None, width: int | None) -> tuple[int, int]:
    """(height, width) in pixels, defaults filled; a ValueError naming the nearest valid size otherwise."""
    default = self.default_size
    if default is None and (height is None or width is None):
      raise ValueError(f"the denoiser's config has no sample_size: pass height and width (multiples of "
                       f"{self.size_multiple} pixels)")
    height = default[0] if height is None else height
    width = default[1] if width is None else width
    unit = self.size_multiple
    bad = [(n, v) for n, v in (("height", height), ("width", width))
           if not isinstance(v, int) or isinstance(v, bool) or v < unit or v % unit]
    if bad:
      nearest = {n: max(unit, round(v / unit) * unit) if isinstance(v, (int, float)) else unit for n, v in bad}
      raise ValueError(
          f"{', '.join(f'{n}={v!r}' for n, v in bad)}: image sides must be positive multiples of {unit} pixels (the "
          f"VAE's factor {self.vae_scale_factor} × the {type(self.denoiser).__name__}'s latent granularity "
          f"{self.denoiser.config.row_granularity}); nearest valid: "
          + ", ".join(f"{n}={v}" for n, v in nearest.items()))
    return height, width

  def _noise(self, latents, seed: int, count: int, height: int, width: int) -> jax.Array:
    channels = self.denoiser.config.in_channels
    shape = (count, height // self.vae_scale_factor, width // self.vae_scale_factor, channels)
    if latents is None:
      return initial_noise(seed, *shape)
    if tuple(getattr(latents, "shape", ())) != shape:
      raise ValueError(f"latents of shape {tuple(getattr(latents, 'shape', ()))}, but {count} prompt(s) at "
                       f"{height}×{width} need {shape} (B, h, w, C: NHWC unit Gaussian noise)")
    return jax.numpy.asarray(latents, jax.numpy.float32)

  def _scheduler_name(self, num_steps: int) -> str:
    """The checkpoint's scheduler class, when dfjax runs it; else a ValueError saying what to pass."""
    name = self.scheduler_config.get("_class_name", "DDIMScheduler")
    try:
      make_scheduler(name, SchedulerConfig.from_diffusers_config(self.scheduler_config), num_steps)
    except ValueError as e:
      raise ValueError(f"{self.path}'s scheduler config ({name}) cannot be run as it is: {e}. Pass scheduler="
                       "'ddim', 'euler' or 'dpmpp_2m' (its noise schedule is kept)") from e
    return name


def _prompt_lists(prompt, negative_prompt) -> tuple[list[str], list[str] | None]:
  prompts = [prompt] if isinstance(prompt, str) else list(prompt)
  if not prompts or not all(isinstance(p, str) for p in prompts):
    raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
  if negative_prompt is None:
    return prompts, None
  negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
  if len(negatives) != len(prompts) or not all(isinstance(p, str) for p in negatives):
    raise ValueError(f"negative_prompt must be a string or a list of {len(prompts)} strings (one per prompt), "
                     f"got {negative_prompt!r}")
  return prompts, negatives


def to_pil(images: np.ndarray) -> list:
  """(B, H, W, 3) floats in [0, 1] → PIL images, rounded as diffusers' `numpy_to_pil`."""
  from PIL import Image
  return [Image.fromarray((image * 255).round().astype(np.uint8)) for image in images]


def load_pipeline(path: str | os.PathLike, *, dtype: Any = None, param_dtype: Any = None,
                  verify: bool = True) -> TextToImagePipeline:
  """The text-to-image pipeline of a checkpoint `dfjax convert` wrote from a diffusers pipeline folder.

  Args:
    path: the checkpoint folder.
    dtype, param_dtype, verify: as `dfjax.load_model`, for every model of the pipeline.
  Raises:
    ValueError: not a dfjax checkpoint, one converted from a model folder alone or from a pipeline class
      dfjax does not run, a component the pipeline needs missing (named), or what `load_model` refuses.
  """
  path = Path(path)
  load = lambda component=None: load_model(path, dtype=dtype, param_dtype=param_dtype, verify=verify,
                                           component=component)
  denoiser = load()  # checks the checkpoint first
  manifest = read_manifest(path)
  pipeline_class = (manifest.get("pipeline") or {}).get("class")
  if pipeline_class not in KINDS:
    found = f"a {pipeline_class}" if pipeline_class else "a model folder alone (no model_index.json)"
    raise ValueError(f"{path} was converted from {found}; dfjax.load_pipeline runs {', '.join(KINDS)} "
                     "checkpoints: convert the whole diffusers pipeline folder (or use dfjax.load_model)")
  kind = KINDS[pipeline_class]
  for component in ("vae", *kind.text_components):
    if component.startswith("tokenizer"):
      if component not in manifest["pipeline"].get("tokenizers", ()):
        raise ValueError(f"{path} holds no {component}/ folder, which a {pipeline_class} needs: its source "
                         f"pipeline lacked it; copy the pipeline's {component}/ folder there and convert again")
      if verify:
        verify_files(path, manifest, (component,))
    else:
      component_folder(path, manifest, component)  # names a missing one
  options = manifest["pipeline"].get("options", {})
  vae = load("vae")
  if pipeline_class == "StableDiffusionXLPipeline":
    prompts = SDXLPrompts((load_tokenizer(path / "tokenizer"), load_tokenizer(path / "tokenizer_2")),
                          (load("text_encoder"), load("text_encoder_2")),
                          force_zeros_for_empty_prompt=bool(options.get("force_zeros_for_empty_prompt", True)))
  elif kind.max_sequence_length is not None:
    prompts = T5Prompts(load_tokenizer(path / "tokenizer"), load("text_encoder"),
                        max_sequence_length=kind.max_sequence_length,
                        size_conditions="resolution" in denoiser.config.conditioning_fields)
  else:
    prompts = ClipPrompts(load_tokenizer(path / "tokenizer"), load("text_encoder"))
  return TextToImagePipeline(path, pipeline_class, denoiser, vae, prompts, load_scheduler_config(path))
