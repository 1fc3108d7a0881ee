"""`VAEConfig`: diffusers' `AutoencoderKL` hyper-parameters, from its config.json, and VAE presets.

A frozen dataclass, strict as `UNetConfig`: unknown keys and unsupported values raise a ValueError
naming them, `__post_init__` checks the invariants with the values shown. Besides the architecture
it holds how a pipeline maps between the VAE's latents and the diffusion model's: `scaling_factor`
always, and either `shift_factor` (SD3, Flux) or per-channel `latents_mean`/`latents_std`
(Playground-style SDXL VAEs), never both: no diffusers pipeline reads both.

`VAE_PRESETS` are published configs (SD1.x/2.x, SDXL, SD3) and tiny ones of the same structure.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from models.config import check_config_keys, row_split_problems, valid_row_splits

_ONLY_SUPPORTED: Mapping[str, tuple[Any, ...]] = {"act_fn": ("silu", "swish")}
_INERT = frozenset({"force_upcast"})  # a dtype policy for fp16 pipelines: no effect on the maths


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Hyper-parameters of a diffusers `AutoencoderKL`; field names are diffusers' config keys.

  The encoder has one `DownEncoderBlock2D` per entry of `block_out_channels` (`layers_per_block`
  resnets each, a stride-2 downsample after all but the last), the decoder one `UpDecoderBlock2D`
  per entry in reverse (`layers_per_block + 1` resnets, a ×2 upsample after all but the last).
  """

  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
  up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int | tuple[int, int] = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  latents_mean: tuple[float, ...] | None = None
  latents_std: tuple[float, ...] | None = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  @classmethod
  def from_diffusers_config(cls, d: Mapping[str, Any]) -> VAEConfig:
    """The config of an `AutoencoderKL` config.json dict; keys starting with `_` are ignored.

    Raises:
      ValueError: a key dfjax does not know, or a value of a feature it does not implement.
    """
    name = d.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
      raise ValueError(f"this config describes a {name}, not an AutoencoderKL: dfjax builds AutoencoderKL VAEs only")
    fields = {f.name for f in dataclasses.fields(cls)}
    check_config_keys(d, "AutoencoderKL", fields | _INERT, _ONLY_SUPPORTED)
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in fields})

  def __post_init__(self):
    levels = len(self.block_out_channels)
    for name, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
      types = tuple(getattr(self, name))
      object.__setattr__(self, name, types)
      if len(types) != levels or any(t != kind for t in types):
        raise ValueError(f"{name}={types}: dfjax's AutoencoderKL takes one {kind!r} per entry of "
                         f"block_out_channels={tuple(self.block_out_channels)} ({levels})")
    groups = self.norm_num_groups
    bad = [c for c in self.block_out_channels if c % groups]
    if bad:
      raise ValueError(f"block_out_channels {tuple(self.block_out_channels)}: {bad} not divisible by "
                       f"norm_num_groups={groups}")
    if not isinstance(self.layers_per_block, int) or self.layers_per_block < 1:
      raise ValueError(f"layers_per_block={self.layers_per_block!r} must be a positive int")
    if not (math.isfinite(self.scaling_factor) and self.scaling_factor > 0):
      raise ValueError(f"scaling_factor={self.scaling_factor!r} must be a positive finite number")
    self._check_latent_statistics()

  def _check_latent_statistics(self):
    given = {name: getattr(self, name) for name in ("latents_mean", "latents_std") if getattr(self, name) is not None}
    if len(given) == 1:
      raise ValueError(f"AutoencoderKL config sets {next(iter(given))} without its partner: give both "
                       "latents_mean and latents_std, or neither")
    for name, values in given.items():
      object.__setattr__(self, name, tuple(float(v) for v in values))
      if len(values) != self.latent_channels:
        raise ValueError(f"{name} has {len(values)} entries but latent_channels={self.latent_channels}: "
                         "give one per latent channel")
    if given and self.shift_factor is not None:
      raise ValueError(f"AutoencoderKL config sets both shift_factor={self.shift_factor} and "
                       "latents_mean/latents_std: no diffusers pipeline uses both, so which applies is "
                       "ambiguous; keep one")
    if "latents_std" in given and min(self.latents_std) <= 0:
      raise ValueError(f"latents_std={self.latents_std} must be positive")

  # ------------------------------------------------------------------------------ derived values

  @property
  def num_levels(self) -> int:
    return len(self.block_out_channels)

  @property
  def downsample_factor(self) -> int:
    """Image pixels per latent pixel along each side: 2^(levels−1) (8 for the SD VAEs)."""
    return 2 ** (self.num_levels - 1)

  def valid_row_splits(self, latent_height: int) -> list[int]:
    """Patch counts that split `latent_height` latent rows into equal patches for the decoder."""
    return valid_row_splits(latent_height, 1)

  def check_latent_size(self, height: int, width: int, row_splits: int = 1) -> None:
    """Checks that the decoder takes a latent of `height` × `width`, split into `row_splits` row patches.

    The decoder only upsamples, so any equal split of the latent rows works (every layer's patch
    keeps whole rows); each patch keeps at least one row, which is all a 3×3 conv's halo takes.

    Raises:
      ValueError: naming the sizes and the valid patch counts.
    """
    if min(height, width) < 1:
      raise ValueError(f"latent size {height}×{width}: the VAE decoder needs at least one row and column")
    problems = row_split_problems(height, width, row_splits, 1)
    if problems:
      raise ValueError(f"latent size {height}×{width} does not split into {row_splits} row patches for "
                       "the VAE decoder (every device decodes an equal number of latent rows): "
                       + "; ".join(problems))


# ---------------------------------------------------------------------------------- presets

_SD = {
    "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 2, "norm_num_groups": 32,
    "act_fn": "silu", "sample_size": 512, "scaling_factor": 0.18215,
}
_TINY = {"block_out_channels": [16, 16, 32, 32], "layers_per_block": 1, "norm_num_groups": 8}

VAE_PRESETS: Mapping[str, Mapping[str, Any]] = {
    "sd": _SD,  # SD1.x / SD2.x (stabilityai/sd-vae-ft-mse)
    "sdxl": {**_SD, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
    "sd3": {**_SD, "latent_channels": 16, "sample_size": 1024, "scaling_factor": 1.5305, "shift_factor": 0.0609,
            "use_quant_conv": False, "use_post_quant_conv": False},
    "tiny-sd": {**_SD, **_TINY},
    "tiny-sdxl": {**_SD, **_TINY, "scaling_factor": 0.13025},
}
"""diffusers AutoencoderKL config.json contents; `tiny-*` keep the 4 levels (×8) at 1/8 of the width."""


def vae_preset(name: str) -> dict:
  """A copy of the named preset's diffusers config dict."""
  if name not in VAE_PRESETS:
    raise ValueError(f"unknown VAE preset {name!r}; valid presets: {', '.join(VAE_PRESETS)}, "
                     "or a path to a diffusers AutoencoderKL config.json.")
  return copy.deepcopy(dict(VAE_PRESETS[name]))
