"""The model dfjax ships: a small class-conditional UNet trained on `dfjax.data`, in the package.

Its folder, `dfjax/assets/default_model/`, is a `dfjax train` export (see MODEL_CARD.md there for
the command that produced it, the data, the loss curve and the machine).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import jax

from dfjax.training.export import TrainedModel, load_trained


def default_model_dir() -> Path:
  """The folder of the shipped weights inside the installed package."""
  return Path(str(resources.files("dfjax") / "assets" / "default_model"))


def load_default_model(*, dtype: Any = None, param_dtype: Any = None,
                       sharding: jax.sharding.Sharding | None = None) -> TrainedModel:
  """Loads the shipped model: `unet, class_tokens, scheduler_config = load_default_model()`.

  Args:
    dtype: computation dtype (None: float32); param_dtype: dtype the params are restored in.
    sharding: placed on every param (e.g. replicated over a mesh); None: the default device.
  Raises:
    FileNotFoundError: the package was installed without its assets.
  """
  folder = default_model_dir()
  if not (folder / "manifest.json").is_file():
    raise FileNotFoundError(f"the default model's weights are missing from {folder}; reinstall "
                            "dfjax (the wheel ships them as package data)")
  return load_trained(folder, dtype=dtype, param_dtype=param_dtype, sharding=sharding)
