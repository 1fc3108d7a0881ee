"""diffusers model or pipeline folder → dfjax checkpoint folder (the layout of `convert/format.py`).

Each model component the source holds (its denoiser, a UNet, DiT or PixArt; of a whole pipeline
also the VAE and the CLIP / T5 text encoders) is converted by its family's table entry
(`convert.families`): its config is read and completed from the weights, its tensors are mapped onto
the param tree of the model that config describes, checked, optionally cast. The denoiser goes at the
checkpoint's root, every other component in a subfolder of its name; tokenizer folders are copied
whole, the scheduler config as it is. Everything is written atomically (`convert.atomic`) with one
manifest recording the sha256 and size of every source file and of every file written, what
conversion decided per component, and the pipeline's class and options (`model_index.json`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from convert import keymap
from convert.atomic import prepare_destination, write_atomically
from convert.families import Family, family_of
from convert.format import (CONFIG, PARAMS_DIR, SCHEDULER_CONFIG, as_float_dtype, check_weights,
                            manifest_header, read_json, sha256_file, write_manifest)
from convert.safetensors_io import ModelFiles, read_tensors
from convert.source import SourceFiles, find_source, tokenizer_files

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Component:
  """One converted model of the checkpoint.

  Attributes:
    name: its pipeline component name ("unet", "transformer").
    folder: where it is written, relative to the checkpoint ("" for the denoiser: the root).
    family: the family that converted it.
    config: its diffusers config as written (the source's, plus what the weights decided).
    params: param path → array in dfjax layout.
    notes: what conversion decided or merged, for the manifest.
  """

  name: str
  folder: str
  family: Family
  config: dict
  params: dict[keymap.Path, np.ndarray]
  notes: list[str]


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *,
                       variant: str | None = None, dtype: str | np.dtype | None = None,
                       overwrite: bool = False) -> Path:
  """Converts a diffusers pipeline (every component dfjax builds) or one UNet, DiT or PixArt model folder
  (safetensors) into a dfjax checkpoint.

  Args:
    src: diffusers pipeline folder (`model_index.json` + `unet/` or `transformer/`, and `vae/`,
      `text_encoder/`, `tokenizer/`… when it has them) or model folder.
    dst: the checkpoint folder to create.
    variant: weights variant to read (`"fp16"`…); None prefers full precision.
    dtype: float dtype to store the params in (`"float32"`, `"bf16"`…); None keeps the source's.
    overwrite: replace an existing dfjax checkpoint at `dst` (atomically; a symlink's target).
  Returns:
    `dst` as a Path.
  Raises:
    FileExistsError: `dst` exists and `overwrite` is False, or it is not a dfjax checkpoint.
    FileNotFoundError: `dst` is a symlink to nothing.
    ValueError: `dst` is or holds `src`; unreadable source, a component folder the pipeline's
      model_index.json names missing, a model class dfjax does not build,
      weights that do not fit the config (all unknown, missing and mis-shaped tensors listed),
      DiT per-block embedders that differ, non-float or non-finite weights.
    OSError: the operating system refused a write (disk full…), in one line.
    Nothing is written in any of these cases, nor when SIGINT/SIGTERM stop the write.
  """
  src, dst = Path(src), Path(dst)
  src_abs, dst_abs = src.resolve(), dst.resolve()
  if dst_abs == src_abs or dst_abs in src_abs.parents:
    raise ValueError(f"destination {dst} is (or holds) the source {src}; choose another folder")
  target = prepare_destination(dst, overwrite)
  store_dtype = None if dtype is None else as_float_dtype(dtype)
  source = find_source(src, variant)
  components = [convert_component(files, store_dtype, name=name, folder="" if i == 0 else name)
                for i, (name, files) in enumerate(source.components)]
  manifest = _manifest(source, components)
  write_atomically(target, lambda tmp: _write_checkpoint(tmp, source, components, manifest),
                   size_bytes=sum(a.nbytes for c in components for a in c.params.values()))
  log.info("converted %s (%s, %d params, %s) into %s", src, manifest["model"], manifest["num_params"],
           manifest["dtype"], dst)
  return dst


def convert_component(files: ModelFiles, store_dtype: np.dtype | None, *, folder: str,
                      name: str | None = None) -> Component:
  """One diffusers model folder → its converted Component `name` (None: its family's component name),
  to be written under `folder`.

  Raises:
    ValueError: as `convert_checkpoint`, naming the model's files.
  """
  config = read_json(files.config)
  family, notes = family_of(config, str(files.config))
  tensors = read_tensors(files)
  check_weights(tensors, f"source weights in {files.folder}")
  config, decided = family.resolve_config(config, tensors.keys())
  model_config = family.model_config(config, str(files.config))
  params, merged = family.convert_state_dict(tensors, family.param_shapes(model_config))
  if store_dtype is not None:
    params = {path: array.astype(store_dtype) for path, array in params.items()}
    check_weights({keymap.path_str(p): a for p, a in params.items()}, f"weights cast to {store_dtype}")
  for note in (*notes, *decided, *merged):
    log.info("%s: %s", files.folder, note)
  return Component(name or family.component, folder, family, config, params, [*notes, *decided, *merged])


# ---------------------------------------------------------------------------------- writing

def _manifest(source: SourceFiles, components: list[Component]) -> dict:
  """The denoiser's header fields (what `load_model` builds), every component's record, the pipeline's
  class and options, the source."""
  denoiser = components[0]
  pipeline = {}
  if source.pipeline is not None:
    options = {k: v for k, v in source.pipeline.items() if not k.startswith("_") and not isinstance(v, list)}
    pipeline = {"pipeline": {"class": source.pipeline.get("_class_name"), "options": options,
                             "tokenizers": [name for name, _ in source.tokenizers],
                             "not_converted": list(source.skipped)}}
  return {
      **manifest_header(denoiser.params, model=denoiser.family.model_class),
      "components": {c.name: {"model": c.family.model_class, "folder": c.folder or ".",
                              "num_params": int(sum(a.size for a in c.params.values())), "notes": c.notes}
                     for c in components},
      **pipeline,
      "source": {
          "path": str(source.root.resolve()),
          "variant": source.variant,
          "files": [_file_record(p, source.root) for p in source.all_files],
      },
  }


def _file_record(path: Path, root: Path) -> dict:
  return {"path": os.path.relpath(path, root), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _write_checkpoint(folder: Path, source: SourceFiles, components: list[Component], manifest: dict) -> None:
  """Writes every file of the checkpoint into `folder` (which exists and is empty): each component's
  params/ and config.json in its folder, the tokenizer folders, the scheduler config, the manifest
  hashing all of them."""
  import orbax.checkpoint as ocp
  from flax.traverse_util import unflatten_dict

  hashed = [SCHEDULER_CONFIG]
  for component in components:
    home = folder / component.folder
    home.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(home / PARAMS_DIR, unflatten_dict(dict(component.params)))
      checkpointer.wait_until_finished()
    (home / CONFIG).write_text(json.dumps(component.config, indent=2) + "\n")
    hashed += [os.path.join(component.folder, PARAMS_DIR), os.path.join(component.folder, CONFIG)]
  for name, tokenizer in source.tokenizers:
    (folder / name).mkdir()
    for file in tokenizer_files(tokenizer):
      shutil.copyfile(file, folder / name / file.name)
    hashed.append(name)
  if source.scheduler_config is not None:
    shutil.copyfile(source.scheduler_config, folder / SCHEDULER_CONFIG)
  write_manifest(folder, manifest, hashed=hashed)
