"""transformers T5 encoder state dict → dfjax params: the strict keymap plus the tied embedding.

The NNX modules mirror transformers' names (models/t5.py), so `convert.keymap.convert_state_dict` maps
the keys with its usual layout fixes, strictly (every tensor used once, every param filled, shapes
checked). The quirk: `T5EncoderModel` ties `encoder.embed_tokens` to `shared`, and checkpoints hold the
table under either name or both (transformers 5 saves `shared.weight` only; PixArt's T5-XXL, written
before, has both). dfjax keeps one, `shared`, after checking that two copies are equal.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from convert import keymap
from models.build import ParamPath, Shape

SHARED = "shared.weight"
TIED = "encoder.embed_tokens.weight"


def untie_embeddings(source: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
  """`source` with the token table under `shared.weight` only, and a note saying what was merged (none
  when it already was).

  Raises:
    ValueError: both copies are there and differ.
  """
  out = dict(source)
  if TIED not in out:
    return out, []
  tied = np.asarray(out.pop(TIED))
  if SHARED not in out:
    out[SHARED] = tied
    return out, [f"{TIED} (tied to {SHARED}) read as {SHARED}"]
  shared = np.asarray(out[SHARED])
  if shared.shape != tied.shape or not np.array_equal(shared, tied):
    raise ValueError(f"T5 checkpoint's {TIED} {tuple(tied.shape)} differs from {SHARED} {tuple(shared.shape)}: "
                     "T5EncoderModel ties them, so dfjax keeps one table; this checkpoint is not a tied T5 encoder")
  return out, [f"{TIED}: a copy of {SHARED}, checked equal, kept once"]


def convert_t5_state_dict(source: Mapping[str, np.ndarray], target_shapes: Mapping[ParamPath, Shape]
                          ) -> tuple[dict[ParamPath, np.ndarray], list[str]]:
  """A transformers `T5EncoderModel` state dict → (target path → array in dfjax layout, notes for the manifest).

  Raises:
    ValueError: untied embedding copies that differ, or anything `keymap.convert_state_dict` refuses
      (unknown keys such as a decoder's, missing keys, shape mismatches, all listed at once).
  """
  untied, notes = untie_embeddings(source)
  return keymap.convert_state_dict(untied, target_shapes, what="transformers T5 encoder checkpoint"), notes
