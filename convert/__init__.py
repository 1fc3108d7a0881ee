"""Checkpoint conversion: diffusers UNet, DiT, PixArt (safetensors) → dfjax checkpoint (orbax + config).

  format.py: the checkpoint layout (CONFIG, MANIFEST, PARAMS_DIR…), manifest and file hashes
  atomic.py: complete-or-absent writes (signals held, disk errors in one line, leftovers removed)
  source.py: which folders of a diffusers pipeline or model folder hold what is converted
  safetensors_io.py: one model folder's weight files and tensors
  families.py: the model families, one table entry each (config reader, keymap, abstract builder)
  keymap.py, dit_keymap.py: the pure key maps

  convert_checkpoint(src, dst, *, variant=None, dtype=None, overwrite=False) -> Path
  convert_state_dict(source, target_shapes) -> {param path: array}   (the pure key map)
  find_source(src, variant=None) -> SourceFiles; read_tensors(source.denoiser) -> {key: array}
  family_of(config, origin) -> (Family, notes)
"""

from convert.convert import convert_checkpoint
from convert.families import FAMILIES, Family, family_of
from convert.format import is_checkpoint
from convert.keymap import convert_state_dict
from convert.safetensors_io import ModelFiles, read_tensors
from convert.source import SourceFiles, find_source

__all__ = ["FAMILIES", "Family", "ModelFiles", "SourceFiles", "convert_checkpoint", "convert_state_dict", "family_of",
           "find_source", "is_checkpoint", "read_tensors"]
