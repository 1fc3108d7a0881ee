"""diffusers DiT / PixArt state dict → dfjax params: the UNet's strict keymap plus DiT's one quirk.

The NNX modules mirror diffusers' names (`pos_embed.proj`, `transformer_blocks.i.attn1`, `adaln_single`,
`caption_projection`, `scale_shift_table`, …), so `convert.keymap.convert_state_dict` maps them with
its usual renames and layout fixes, strictly (every tensor used once, every param filled). The quirk:
diffusers' DiT builds the timestep and class embedder in every block (`transformer_blocks.i.norm1.emb`)
and every block computes the same embedding from them; real checkpoints hold identical copies. dfjax
keeps one (`emb`), after checking that the copies are equal.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from convert import keymap
from models.build import ParamPath, Shape

_BLOCK_EMBEDDER = re.compile(r"transformer_blocks\.(\d+)\.norm1\.emb\.(.+)")


def merge_block_embedders(source: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
  """`source` with DiT's per-block `transformer_blocks.i.norm1.emb.*` replaced by one `emb.*`, and notes
  saying what was merged (empty when the checkpoint has no per-block embedders).

  Raises:
    ValueError: the copies differ (naming the tensors and blocks), or some block lacks one.
  """
  copies: dict[str, dict[int, np.ndarray]] = {}
  kept = {}
  for key, array in source.items():
    match = _BLOCK_EMBEDDER.fullmatch(key)
    if match is None:
      kept[key] = array
    else:
      copies.setdefault(match[2], {})[int(match[1])] = np.asarray(array)
  if not copies:
    return kept, []
  blocks = sorted({i for per_block in copies.values() for i in per_block})
  problems = []
  for name, per_block in sorted(copies.items()):
    missing = sorted(set(blocks) - set(per_block))
    if missing:
      problems.append(f"norm1.emb.{name}: blocks {missing} lack it")
      continue
    first = per_block[blocks[0]]
    differ = [i for i in blocks if per_block[i].shape != first.shape or not np.array_equal(per_block[i], first)]
    if differ:
      problems.append(f"norm1.emb.{name}: blocks {differ} differ from block {blocks[0]}")
    kept[f"emb.{name}"] = first
  if problems:
    raise ValueError("this DiT checkpoint's per-block timestep/class embedders (transformer_blocks.i.norm1.emb) "
                     "are not identical copies, so one embedding cannot stand for all of them (dfjax keeps one):\n"
                     + "\n".join(f"  {p}" for p in problems))
  note = (f"transformer_blocks.*.norm1.emb: {len(copies)} tensors repeated in {len(blocks)} blocks, checked "
          "identical, kept once as emb.*")
  return kept, [note]


def convert_transformer_state_dict(source: Mapping[str, np.ndarray], target_shapes: Mapping[ParamPath, Shape]
                                   ) -> tuple[dict[ParamPath, np.ndarray], list[str]]:
  """A DiT or PixArt diffusers state dict → (target path → array in dfjax layout, notes for the manifest).

  Raises:
    ValueError: per-block embedders that differ, or anything `keymap.convert_state_dict` refuses
      (unknown and missing keys, shape mismatches, all listed at once).
  """
  merged, notes = merge_block_embedders(source)
  return keymap.convert_state_dict(merged, target_shapes), notes
