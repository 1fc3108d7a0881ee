"""diffusers state dict → dfjax NNX params: pure functions over flat `{key: array}` dicts.

The NNX model's attribute names mirror diffusers' module names one-for-one, and every diffusers
`ModuleList` is an `nnx.List` with the same indices, so a diffusers key such as
`down_blocks.0.resnets.1.conv1.weight` becomes the param path
`('down_blocks', 0, 'resnets', 1, 'conv1', 'kernel')`. On top of that:

- module renames (`MODULE_RENAMES`): `attnN.to_out.0` → `attnN.to_out`, `ff.net.0.proj` →
  `ff.proj_in`, `ff.net.2` → `ff.proj_out`;
- leaf renames with a layout fix, resolved against the target model's param shapes (`LEAF_RULES`):
  `weight` → `kernel` (Linear (O, I) → (I, O); Conv OIHW → HWIO; a 1×1 conv and a Linear are
  interchangeable, so SD checkpoints with either `use_linear_projection` fit either model),
  `weight` → `embedding` (nn.Embedding, no transpose), `weight` → `scale` (norms), `bias` → `bias`.

`convert_state_dict` is strict: every source tensor used once, every target param filled, shapes
checked after the layout fix. Any problem raises one ValueError listing all of them.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping

import numpy as np

from models.build import ParamPath as Path
from models.build import Shape

log = logging.getLogger(__name__)

LayoutFix = Callable[[np.ndarray, Shape], np.ndarray]

MODULE_RENAMES: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("attn1", "to_out", "0"), ("attn1", "to_out")),
    (("attn2", "to_out", "0"), ("attn2", "to_out")),
    (("ff", "net", "0", "proj"), ("ff", "proj_in")),
    (("ff", "net", "2"), ("ff", "proj_out")),
)
"""(diffusers module path parts, dfjax module path parts), matched anywhere in a key."""


# ---------------------------------------------------------------------------------- layout fixes

def keep(w: np.ndarray, target: Shape) -> np.ndarray:
  """Norm scales, biases, embeddings: same layout."""
  del target
  return w


def linear_to_kernel(w_oi: np.ndarray, target: Shape) -> np.ndarray:
  """Linear (O, I) → (I, O); into a 1×1 conv kernel (1, 1, I, O) when the target is one."""
  w_io = w_oi.T
  return w_io.reshape(1, 1, *w_io.shape) if len(target) == 4 else w_io


def conv_to_kernel(w_oihw: np.ndarray, target: Shape) -> np.ndarray:
  """Conv OIHW → HWIO; a 1×1 conv into a Linear kernel (I, O) when the target is one."""
  w_hwio = w_oihw.transpose(2, 3, 1, 0)
  if len(target) == 2 and w_hwio.shape[:2] == (1, 1):
    return w_hwio[0, 0]
  return w_hwio


LEAF_RULES: Mapping[tuple[str, int], tuple[tuple[str, LayoutFix], ...]] = {
    ("bias", 1): (("bias", keep),),
    ("weight", 1): (("scale", keep),),
    ("weight", 2): (("kernel", linear_to_kernel), ("embedding", keep)),
    ("weight", 4): (("kernel", conv_to_kernel),),
    ("scale_shift_table", 2): (("scale_shift_table", keep),),  # PixArt's bare modulation tables
}
"""(diffusers leaf name, ndim) → candidate (dfjax leaf name, layout fix), first existing wins."""


# ---------------------------------------------------------------------------------- paths

def _replace_run(parts: tuple[str, ...], old: tuple[str, ...], new: tuple[str, ...]
                 ) -> tuple[str, ...]:
  """Replaces each occurrence of the run `old` in `parts` by `new`."""
  out: list[str] = []
  i = 0
  while i < len(parts):
    if parts[i:i + len(old)] == old:
      out += new
      i += len(old)
    else:
      out.append(parts[i])
      i += 1
  return tuple(out)


def rename_modules(module_parts: tuple[str, ...]) -> tuple[str, ...]:
  """diffusers module path parts → dfjax module path parts (`MODULE_RENAMES`)."""
  for old, new in MODULE_RENAMES:
    module_parts = _replace_run(module_parts, old, new)
  return module_parts


def to_path(parts: tuple[str, ...]) -> Path:
  """Dotted-key parts → an nnx path: list indices become ints."""
  return tuple(int(p) if p.isdigit() else p for p in parts)


def path_str(path: Path) -> str:
  """('down_blocks', 0, 'conv1', 'kernel') → 'down_blocks.0.conv1.kernel'."""
  return ".".join(str(p) for p in path)


def source_key_for(path: Path) -> str:
  """The diffusers key a dfjax param path comes from (for messages about missing params)."""
  *module, leaf = (str(p) for p in path)
  module_parts = tuple(module)
  for old, new in MODULE_RENAMES:
    module_parts = _replace_run(module_parts, new, old)
  source_leaf = leaf if leaf in ("bias", "scale_shift_table") else "weight"
  return ".".join((*module_parts, source_leaf))


# ---------------------------------------------------------------------------------- the map

def convert_state_dict(source: Mapping[str, np.ndarray], target_shapes: Mapping[Path, Shape], *,
                       what: str = "diffusers checkpoint") -> dict[Path, np.ndarray]:
  """Maps a diffusers (or transformers) state dict onto the target model's param paths, with layout fixes.

  Args:
    source: diffusers key → array (PyTorch layouts).
    target_shapes: the target model's param path → shape (from `nnx.eval_shape`).
    what: names the source in the error message.
  Returns:
    target path → array in dfjax layout, one entry per target param.
  Raises:
    ValueError: listing every unknown source key, missing target param, duplicate and shape
      mismatch at once.
  """
  out: dict[Path, np.ndarray] = {}
  used_by: dict[Path, str] = {}
  unknown: list[str] = []
  mismatched: list[str] = []
  duplicates: list[str] = []
  fixes: Counter[str] = Counter()
  for key in sorted(source):
    array = np.asarray(source[key])
    candidates = _candidates(key, array.ndim)
    found = [(path, fix) for path, fix in candidates if path in target_shapes]
    if not found:
      why = (f"model has no {' or '.join(path_str(p) for p, _ in candidates)}" if candidates
             else f"no rule for a {array.ndim}-D {key.rsplit('.', 1)[-1]!r}")
      unknown.append(f"{key} {tuple(array.shape)} ({why})")
      continue
    path, fix = found[0]
    if path in used_by:
      duplicates.append(f"{used_by[path]} and {key} both map to {path_str(path)}")
      continue
    used_by[path] = key
    converted = fix(array, target_shapes[path])
    if converted.shape != tuple(target_shapes[path]):
      mismatched.append(f"{key} {tuple(array.shape)} → {path_str(path)}: got "
                        f"{tuple(converted.shape)} after {fix.__name__}, model expects "
                        f"{tuple(target_shapes[path])}")
      continue
    out[path] = converted
    fixes[fix.__name__] += 1
  missing = [f"{path_str(p)} {tuple(s)} (from checkpoint key {source_key_for(p)})"
             for p, s in sorted(target_shapes.items(), key=lambda kv: path_str(kv[0]))
             if p not in used_by]
  _raise_if_problems(what, unknown_source_keys=unknown, missing_params=missing,
                     shape_mismatches=mismatched, duplicates=duplicates)
  for name, count in sorted(fixes.items()):
    log.info("keymap: %s on %d tensors", name, count)
  return out


def _candidates(key: str, ndim: int) -> list[tuple[Path, LayoutFix]]:
  """The target paths (with their layout fix) one source key may fill, in preference order."""
  *module, leaf = key.split(".")
  module_path = to_path(rename_modules(tuple(module)))
  return [((*module_path, target_leaf), fix)
          for target_leaf, fix in LEAF_RULES.get((leaf, ndim), ())]


def _raise_if_problems(what: str, **problems: list[str]) -> None:
  """One ValueError listing every problem of every kind, or nothing."""
  if not any(problems.values()):
    return
  lines = []
  for kind, items in problems.items():
    if items:
      lines.append(f"{len(items)} {kind.replace('_', ' ')}:")
      lines += [f"  {item}" for item in items]
  raise ValueError(f"{what} does not fit the dfjax model:\n" + "\n".join(lines))
