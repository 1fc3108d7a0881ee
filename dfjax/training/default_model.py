"""The models dfjax ships: a small class-conditional UNet and DiT trained on `dfjax.data`, in the package,
and the DiT grown to 8 blocks (so that PipeFusion and AsyncDiff cut it into 8 stages).

Their folders, `dfjax/assets/default_model/` (the UNet), `dfjax/assets/default_dit/` and
`dfjax/assets/default_dit8/`, are `dfjax train` exports (see MODEL_CARD.md there for the command that
produced each, the data, the loss curve, the machine and the measured sample quality).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import jax

from dfjax.training.export import TrainedModel, load_trained

# Embedded model name (`dfjax generate --model`) → its folder under dfjax/assets; the first is the default.
EMBEDDED_MODELS = {"unet": "default_model", "dit": "default_dit", "dit8": "default_dit8"}
DEFAULT_EMBEDDED = next(iter(EMBEDDED_MODELS))


def default_model_dir(name: str = DEFAULT_EMBEDDED) -> Path:
  """The folder of the shipped weights of embedded model `name` inside the installed package."""
  if name not in EMBEDDED_MODELS:
    raise ValueError(f"unknown embedded model {name!r}; embedded models: {', '.join(EMBEDDED_MODELS)}")
  return Path(str(resources.files("dfjax") / "assets" / EMBEDDED_MODELS[name]))


def load_default_model(name: str = DEFAULT_EMBEDDED, *, dtype: Any = None, param_dtype: Any = None,
                       sharding: jax.sharding.Sharding | None = None) -> TrainedModel:
  """Loads a shipped model: `denoiser, class_tokens, scheduler_config = load_default_model()`.

  Args:
    name: "unet" (the default), "dit" or "dit8" (`EMBEDDED_MODELS`).
    dtype: computation dtype (None: float32); param_dtype: dtype the params are restored in.
    sharding: placed on every param (e.g. replicated over a mesh); None: the default device.
  Raises:
    ValueError: an unknown name.
    FileNotFoundError: the package was installed without its assets.
  """
  folder = default_model_dir(name)
  if not (folder / "manifest.json").is_file():
    raise FileNotFoundError(f"the embedded {name} model's weights are missing from {folder}; reinstall "
                            "dfjax (the wheel ships them as package data)")
  return load_trained(folder, dtype=dtype, param_dtype=param_dtype, sharding=sharding)
