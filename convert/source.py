"""What a diffusers source folder holds: which of its model folders dfjax converts, and the scheduler.

A source is either a pipeline folder (`model_index.json` naming its components, one subfolder
each: `unet/` or `transformer/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`…) or one model
folder saved alone (`config.json` + weights, possibly a pipeline's `unet/` or `transformer/` named
directly). Of a pipeline, every model component dfjax builds is converted (the denoiser, the VAE, the
text encoders) and every tokenizer folder is copied; components it does not run (a safety checker, a
feature extractor) are left out, and said so in the manifest. A model folder alone is its denoiser.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from convert.format import read_json
from convert.safetensors_io import WEIGHTS_STEM, ModelFiles, find_weights

DENOISERS = ("unet", "transformer")
"""The pipeline components that are the denoiser, by diffusers' component names."""
MODELS = ("vae", "text_encoder", "text_encoder_2")
"""The other pipeline components dfjax converts (besides the denoiser), in the manifest's order."""
TOKENIZERS = ("tokenizer", "tokenizer_2")
"""The pipeline components that are tokenizer folders, copied whole."""
_NOT_MODELS = ("scheduler", *TOKENIZERS)
MODEL_INDEX = "model_index.json"
SCHEDULER_CONFIG_PATH = Path("scheduler") / "scheduler_config.json"


@dataclasses.dataclass(frozen=True)
class SourceFiles:
  """The files of one diffusers source.

  Attributes:
    root: the folder the user named (pipeline or model folder).
    components: (pipeline component name, its files) of each model to convert, the denoiser first
      (its name None for a model folder alone: its family's component name).
    scheduler_config: `scheduler/scheduler_config.json` of the pipeline, when present.
    tokenizers: (component name, folder) of each tokenizer folder of the pipeline.
    pipeline: the pipeline's `model_index.json` (its class, `force_zeros_for_empty_prompt`…); None for a
      model folder.
    skipped: the components the pipeline lists that dfjax does not convert (safety_checker…).
  """

  root: Path
  components: tuple[tuple[str | None, ModelFiles], ...]
  scheduler_config: Path | None = None
  tokenizers: tuple[tuple[str, Path], ...] = ()
  pipeline: dict | None = None
  skipped: tuple[str, ...] = ()

  @property
  def denoiser(self) -> ModelFiles:
    return self.components[0][1]

  @property
  def variant(self) -> str | None:
    """The denoiser's weights variant (None: full precision)."""
    return self.denoiser.variant

  @property
  def all_files(self) -> tuple[Path, ...]:
    """Every file the checkpoint is read from, for the manifest."""
    files = [f for _, c in self.components for f in c.all_files]
    files += [f for _, folder in self.tokenizers for f in tokenizer_files(folder)]
    return (*files, *(() if self.scheduler_config is None else (self.scheduler_config,)))


def find_source(src: str | Path, variant: str | None = None) -> SourceFiles:
  """Finds the config and weights of every model component under `src` (a model folder: its one model),
  the tokenizer folders and the scheduler config.

  Args:
    src: a diffusers pipeline folder (with `model_index.json`) or a model folder (`config.json`).
    variant: the weights variant to read (`"fp16"`…); None prefers full precision, falling back
      to the one variant present.
  Raises:
    ValueError: the folder is not a diffusers pipeline or model folder, a pipeline lacks a component
      folder its model_index.json names (naming it), or there are no usable safetensors weights.
  """
  src = Path(src)
  if not src.is_dir():
    raise ValueError(f"{src}: not a folder; expected a diffusers pipeline or model folder")
  if (src / MODEL_INDEX).is_file():
    return _pipeline_source(src, variant)
  if not (src / "config.json").is_file():
    raise ValueError(
        f"{src}: no `config.json` or `{MODEL_INDEX}`; expected a diffusers pipeline folder ({MODEL_INDEX} + "
        f"unet/ or transformer/) or a model folder (config.json + {WEIGHTS_STEM}.safetensors)")
  in_pipeline = (src.parent / MODEL_INDEX).is_file()  # a pipeline's unet/ or transformer/, named directly
  return SourceFiles(src, ((None, find_weights(src, variant)),),
                     _scheduler_config(src.parent) if in_pipeline else None)


def _pipeline_source(pipeline: Path, variant: str | None) -> SourceFiles:
  """The denoiser, VAE and text encoders, tokenizers and scheduler a pipeline folder holds."""
  listed = read_json(pipeline / MODEL_INDEX)
  denoiser = _denoiser_of_pipeline(pipeline)
  present = [name for name, kind in listed.items() if not name.startswith("_") and _is_set(kind)]
  for name in (*MODELS, *TOKENIZERS):
    if name in present and not (pipeline / name).is_dir():
      raise ValueError(f"{pipeline} is a diffusers pipeline whose {MODEL_INDEX} names a {name} "
                       f"({_kind_name(listed[name])}), but {pipeline / name} is missing: copy the pipeline's "
                       f"whole {name}/ folder into it (or convert the {denoiser}/ folder alone)")
  models = [denoiser, *(n for n in MODELS if n in present)]
  components = tuple((name, find_weights(pipeline / name, variant)) for name in models)
  tokenizers = tuple((name, pipeline / name) for name in TOKENIZERS if name in present)
  skipped = tuple(n for n in present if n not in (*DENOISERS, *MODELS, *_NOT_MODELS))
  return SourceFiles(pipeline, components, _scheduler_config(pipeline), tokenizers, listed, skipped)


def _is_set(kind) -> bool:
  """Whether a model_index.json entry names a component (diffusers writes [null, null] for one left out)."""
  return isinstance(kind, list) and any(k is not None for k in kind)


def _kind_name(kind) -> str:
  return kind[-1] if isinstance(kind, list) and kind and kind[-1] else "a diffusers component"


def tokenizer_files(folder: Path) -> list[Path]:
  """The files of a tokenizer folder, in name order (copied whole into the checkpoint)."""
  return sorted(f for f in folder.iterdir() if f.is_file())


def _denoiser_of_pipeline(pipeline: Path) -> str:
  """The denoiser component ("unet" or "transformer") of the pipeline folder, which must hold it."""
  listed = read_json(pipeline / MODEL_INDEX)
  named = [c for c in DENOISERS if c in listed] or [c for c in DENOISERS if (pipeline / c).is_dir()]
  if not named:
    components = sorted(k for k in listed if not k.startswith("_")) or ["nothing"]
    raise ValueError(f"{pipeline / MODEL_INDEX} names no denoiser ({' or '.join(DENOISERS)}; it lists "
                     f"{', '.join(components)}): dfjax converts a pipeline's unet/ or transformer/; pass that "
                     "folder, or a pipeline that has one")
  if len(named) > 1:
    raise ValueError(f"{pipeline} has both {' and '.join(named)}; pass the one to convert "
                     f"(e.g. `dfjax convert {pipeline / named[0]} DST`)")
  (name,) = named
  if not (pipeline / name / "config.json").is_file():
    kind = _kind_name(listed.get(name))
    raise ValueError(f"{pipeline} is a diffusers pipeline whose {MODEL_INDEX} names a {name} ({kind}), but "
                     f"{pipeline / name / 'config.json'} is missing: copy the pipeline's whole {name}/ folder "
                     f"(config.json + {WEIGHTS_STEM}*.safetensors) into it, or convert the {name} folder itself")
  return name


def _scheduler_config(pipeline: Path) -> Path | None:
  file = pipeline / SCHEDULER_CONFIG_PATH
  return file if file.is_file() else None
