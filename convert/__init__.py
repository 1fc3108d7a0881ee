"""Checkpoint conversion: diffusers UNet (safetensors) → dfjax checkpoint (orbax + config).

  format.py: the checkpoint layout (CONFIG, MANIFEST, PARAMS_DIR…), manifest and file hashes
  atomic.py: complete-or-absent writes (signals held, disk errors in one line, leftovers removed)

  convert_checkpoint(src, dst, *, variant=None, dtype=None, overwrite=False) -> Path
  convert_state_dict(source, target_shapes) -> {param path: array}   (the pure key map)
  find_source(src, variant=None) -> SourceFiles; read_tensors(source) -> {key: array}
"""

from convert.convert import convert_checkpoint
from convert.format import is_checkpoint
from convert.keymap import convert_state_dict
from convert.safetensors_io import SourceFiles, find_source, read_tensors

__all__ = ["SourceFiles", "convert_checkpoint", "convert_state_dict", "find_source",
           "is_checkpoint", "read_tensors"]
