"""Which model a benchmark runs: `--model` (a family) and `--config` (a preset, or a UNet config.json)."""

from dfjax.bench.unet import load_config
from models.config import UNetConfig
from models.presets import FAMILIES, transformer_config


def model_config(model: str, config: str | None):
  """The config of `--model` (unet, dit, pixart) named by `--config` (default: the family's tiny preset)."""
  if model not in FAMILIES:
    raise ValueError(f"unknown model family {model!r}; valid: {', '.join(FAMILIES)}.")
  presets, default = FAMILIES[model]
  name = config or default
  if model == "unet":  # a UNet preset or a diffusers config.json
    return UNetConfig.from_diffusers_config(load_config(name))
  if name not in presets:
    raise ValueError(f"--config {name!r} is not a {model} preset; valid: {', '.join(presets)}.")
  return transformer_config(name)


def config_name(model: str, config: str | None) -> str:
  """What the run's header calls the model: its family and preset (or config file)."""
  return f"{model} {config or FAMILIES[model][1]}"
