"""What a diffusers source folder holds: which of its model folders dfjax converts, and the scheduler.

A source is either a pipeline folder (`model_index.json` naming its components, one subfolder
each: `unet/` or `transformer/`, `vae/`, `text_encoder/`, `scheduler/`…) or one model folder saved
alone (`config.json` + weights, possibly a pipeline's `unet/` or `transformer/` named directly).
Only the denoiser (`unet` or `transformer`) is converted now; `SourceFiles.components` is the list
a whole-pipeline conversion extends with the other model components.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from convert.format import read_json
from convert.safetensors_io import WEIGHTS_STEM, ModelFiles, find_weights

DENOISERS = ("unet", "transformer")
"""The pipeline components that are the denoiser, by diffusers' component names."""
MODEL_INDEX = "model_index.json"
SCHEDULER_CONFIG_PATH = Path("scheduler") / "scheduler_config.json"


@dataclasses.dataclass(frozen=True)
class SourceFiles:
  """The files of one diffusers source.

  Attributes:
    root: the folder the user named (pipeline or model folder).
    components: the files of each model folder to convert, the denoiser first (only it, for now).
    scheduler_config: `scheduler/scheduler_config.json` of the pipeline, when present.
  """

  root: Path
  components: tuple[ModelFiles, ...]
  scheduler_config: Path | None = None

  @property
  def denoiser(self) -> ModelFiles:
    return self.components[0]

  @property
  def variant(self) -> str | None:
    """The denoiser's weights variant (None: full precision)."""
    return self.denoiser.variant

  @property
  def all_files(self) -> tuple[Path, ...]:
    """Every file the checkpoint is read from, for the manifest."""
    files = [f for c in self.components for f in c.all_files]
    return (*files, *(() if self.scheduler_config is None else (self.scheduler_config,)))


def find_source(src: str | Path, variant: str | None = None) -> SourceFiles:
  """Finds the denoiser's config and weights (and the scheduler config) under `src`.

  Args:
    src: a diffusers pipeline folder (with `model_index.json`) or a model folder (`config.json`).
    variant: the weights variant to read (`"fp16"`…); None prefers full precision, falling back
      to the one variant present.
  Raises:
    ValueError: the folder is not a diffusers pipeline or model folder, a pipeline lacks the
      denoiser folder its model_index.json names, or there are no usable safetensors weights.
  """
  src = Path(src)
  if not src.is_dir():
    raise ValueError(f"{src}: not a folder; expected a diffusers pipeline or model folder")
  if (src / MODEL_INDEX).is_file():
    return SourceFiles(src, (find_weights(src / _denoiser_of_pipeline(src), variant),), _scheduler_config(src))
  if not (src / "config.json").is_file():
    raise ValueError(
        f"{src}: no `config.json` or `{MODEL_INDEX}`; expected a diffusers pipeline folder ({MODEL_INDEX} + "
        f"unet/ or transformer/) or a model folder (config.json + {WEIGHTS_STEM}.safetensors)")
  in_pipeline = (src.parent / MODEL_INDEX).is_file()  # a pipeline's unet/ or transformer/, named directly
  return SourceFiles(src, (find_weights(src, variant),), _scheduler_config(src.parent) if in_pipeline else None)


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
    kind = listed.get(name, ["", "a diffusers model"])
    kind = kind[-1] if isinstance(kind, list) and kind else kind
    raise ValueError(f"{pipeline} is a diffusers pipeline whose {MODEL_INDEX} names a {name} ({kind}), but "
                     f"{pipeline / name / 'config.json'} is missing: copy the pipeline's whole {name}/ folder "
                     f"(config.json + {WEIGHTS_STEM}*.safetensors) into it, or convert the {name} folder itself")
  return name


def _scheduler_config(pipeline: Path) -> Path | None:
  file = pipeline / SCHEDULER_CONFIG_PATH
  return file if file.is_file() else None
