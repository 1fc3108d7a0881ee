"""transformers CLIP text encoder state dict → dfjax params: the strict keymap plus two layouts' quirks.

The NNX modules mirror transformers' names (models/clip.py), so `convert.keymap.convert_state_dict` maps
the keys with its usual layout fixes, strictly (every tensor used once, every param filled, shapes
checked). Before that, two differences between checkpoints that hold the same model are evened out:

- transformers 5 saves a `CLIPTextModel` without its `text_model.` prefix (`embeddings.…`,
  `encoder.layers.i.…`), while checkpoints written before it, SD's and SDXL's `text_encoder` among them,
  and every `CLIPTextModelWithProjection` have it: keys without it get it.
- older checkpoints also hold the `text_model.embeddings.position_ids` buffer (0, 1, …, positions − 1):
  dfjax computes the positions, so the buffer is dropped after checking that it holds just those.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from convert import keymap
from models.build import ParamPath, Shape

PREFIX = "text_model."
PROJECTION = "text_projection."
POSITION_IDS = "text_model.embeddings.position_ids"


def normalize_clip_keys(source: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
  """`source` with every key under `text_model.` (but `text_projection`) and no `position_ids` buffer,
  and notes saying what changed (empty when nothing did).

  Raises:
    ValueError: one tensor both with and without the prefix, or a `position_ids` buffer that is not
      0, 1, …, positions − 1.
  """
  out: dict[str, np.ndarray] = {}
  prefixed, twice = [], []
  for key, array in source.items():
    full = key if key.startswith((PREFIX, PROJECTION)) else PREFIX + key
    if full != key:
      prefixed.append(key)
    if full in out:
      twice.append(full)
    out[full] = array
  if twice:
    raise ValueError(f"CLIP text encoder checkpoint holds {len(twice)} tensors both with and without the "
                     f"{PREFIX!r} prefix: {', '.join(sorted(twice))}; keep one copy of each")
  notes = [f"{len(prefixed)} keys without the {PREFIX!r} prefix (transformers 5's CLIPTextModel) given it"
           ] if prefixed else []
  if POSITION_IDS in out:
    ids = np.asarray(out.pop(POSITION_IDS))
    if ids.reshape(-1).tolist() != list(range(ids.size)):
      raise ValueError(f"CLIP text encoder checkpoint's {POSITION_IDS} {tuple(ids.shape)} is not 0, 1, …, "
                       f"{ids.size - 1}: dfjax numbers the positions itself and cannot follow other ids")
    notes.append(f"{POSITION_IDS} (0…{ids.size - 1}, a buffer transformers no longer saves) dropped")
  return out, notes


def convert_clip_state_dict(source: Mapping[str, np.ndarray], target_shapes: Mapping[ParamPath, Shape]
                            ) -> tuple[dict[ParamPath, np.ndarray], list[str]]:
  """A transformers `CLIPTextModel` / `CLIPTextModelWithProjection` state dict → (target path → array in
  dfjax layout, notes for the manifest).

  Raises:
    ValueError: what `normalize_clip_keys` refuses, or anything `keymap.convert_state_dict` does
      (unknown and missing keys, shape mismatches, all listed at once).
  """
  normalized, notes = normalize_clip_keys(source)
  params = keymap.convert_state_dict(normalized, target_shapes, what="transformers CLIP text encoder checkpoint")
  return params, notes
