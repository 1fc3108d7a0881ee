"""diffusers AutoencoderKL state dict → dfjax params: the UNet's strict keymap after two VAE renames.

The NNX modules mirror diffusers' names (`encoder.down_blocks.i.resnets.j.conv1`,
`decoder.mid_block.attentions.0.group_norm`, `quant_conv`, …), so `convert.keymap.convert_state_dict`
maps them with its usual layout fixes, strictly (every tensor used once, every param filled, shapes
checked). Before it, the mid-block attentions' keys are renamed:
  * VAEs saved before diffusers 0.14 name the attention `query`, `key`, `value`, `proj_attn`;
    diffusers renames them on load to `to_q`, `to_k`, `to_v`, `to_out.0` (its
    `_fix_state_dict_keys_on_load`), and so does this map, saying what it renamed;
  * `to_out.0` (a one-entry ModuleList in diffusers) is dfjax's `to_out`, as in the UNet's attention.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from convert import keymap
from models.build import ParamPath, Shape

# The two mid-block attentions diffusers marks `_from_deprecated_attn_block`.
_ATTENTION = re.compile(r"((?:encoder|decoder)\.mid_block\.attentions\.\d+)\.(\w+(?:\.0)?)\.(weight|bias)")
_OLD_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def rename_attention_keys(source: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
  """`source` with the mid-block attentions' old names renamed as diffusers does and `to_out.0` as dfjax's
  `to_out`, and notes saying what was renamed from the old names (empty for a current checkpoint).

  Raises:
    ValueError: a checkpoint holding one tensor under both its old and its new name.
  """
  renamed: dict[str, np.ndarray] = {}
  old_found: list[str] = []
  for key, array in source.items():
    match = _ATTENTION.fullmatch(key)
    new_key = key
    if match is not None:
      block, name, leaf = match.groups()
      if name in _OLD_NAMES:
        old_found.append(key)
        name = _OLD_NAMES[name]
      new_key = f"{block}.{'to_out' if name == 'to_out.0' else name}.{leaf}"
    if new_key in renamed:
      raise ValueError(f"the VAE checkpoint holds {new_key!r} twice, under its old and its current name "
                       f"(one is {key!r}): keep one of them")
    renamed[new_key] = array
  notes = ([f"{len(old_found)} mid-block attention tensors renamed from the pre-0.14 names query/key/value/"
            "proj_attn to to_q/to_k/to_v/to_out.0, as diffusers does"] if old_found else [])
  return renamed, notes


def convert_vae_state_dict(source: Mapping[str, np.ndarray], target_shapes: Mapping[ParamPath, Shape]
                           ) -> tuple[dict[ParamPath, np.ndarray], list[str]]:
  """An AutoencoderKL diffusers state dict → (target path → array in dfjax layout, notes for the manifest).

  Raises:
    ValueError: a tensor under both names, or anything `keymap.convert_state_dict` refuses (unknown
      and missing keys, shape mismatches, all listed at once).
  """
  renamed, notes = rename_attention_keys(source)
  return keymap.convert_state_dict(renamed, target_shapes, what="diffusers AutoencoderKL checkpoint"), notes
