"""`dfjax train --model dit8 --grow-from FOLDER`: a deeper DiT that starts as the trained one in FOLDER.

FOLDER is a `write_model` export of a trained DiT (e.g. a `dfjax train --model dit` run's model/). The
run's variant has f times its blocks, all else equal. At step 0 the run's block f·k is FOLDER's block k,
blocks f·k+1 … f·k+f−1 are the fresh blocks of the run's own init (`--seed`), and the embeddings and
the final layer are FOLDER's. The fresh init is adaLN-Zero (model.ClassConditionalDiT): each new
block's whole modulation linear (`norm1.linear`, which makes shift, scale and gate of the attention
and of the MLP) is zero, so its gated attention and MLP add exactly 0 to the residual stream and the
grown DiT computes FOLDER's output. The whole linear, not only its two gates' rows: that is the DiT
paper's init of every block, the gates still get gradient at the first step (they multiply the
non-zero attention and MLP outputs), and the new blocks' shift and scale start at 0 instead of
random values that would disturb the trained blocks' activations once the gates open. Then every
param trains: the new blocks learn, the trained ones adapt to them.

Only step 0 reads FOLDER. It records what it grew from in OUT/grown_from.json (FOLDER's command,
settings, depth and manifest digest); the export's training.json carries it as "grown_from", so the
model card gives both commands, and a resumed run needs nothing from FOLDER.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from flax import nnx

from convert.format import CONFIG, MANIFEST, read_json, sha256_file
from dfjax.loading import load_scheduler_config
from dfjax.training.export import TRAINING, is_trained_model, load_trained
from dfjax.training.model import VARIANTS
from models.dit_config import DiTConfig

GROWN_FROM = "grown_from.json"  # in the run folder: the source's record, written at step 0
_DIT = "DiTTransformer2DModel"


def grown_start(model: nnx.Module, folder: str, variant: str, out: str | Path) -> nnx.Module:
  """Step 0 of a grown run: `model` (the fresh joint model of `variant`) with FOLDER's blocks,
  embeddings and final layer in its DiT (returned; changed in place), and OUT/grown_from.json written.

  Raises:
    ValueError: FOLDER is missing or no trained DiT, or `variant` is not FOLDER's DiT at a multiple of
      its depth (the variants that are are named).
  """
  source, factor = load_source(folder, variant)
  grow(model.denoiser, source, factor)
  record = source_record(Path(folder))
  Path(out, GROWN_FROM).write_text(json.dumps(record, indent=2) + "\n")
  return model


def grow(denoiser: nnx.Module, source: nnx.Module, factor: int) -> None:
  """Puts `source`'s params into the fresh DiT `denoiser` (`factor` times its blocks): block factor·k
  is source block k, the other blocks keep their fresh (adaLN-Zero: identity) params."""
  state = nnx.state(denoiser, nnx.Param)
  fresh, trained = nnx.to_pure_dict(state), nnx.to_pure_dict(nnx.state(source, nnx.Param))
  blocks = {i: trained["transformer_blocks"][i // factor] if i % factor == 0 else block
            for i, block in fresh["transformer_blocks"].items()}
  nnx.replace_by_pure_dict(state, {**trained, "transformer_blocks": blocks})
  nnx.update(denoiser, state)


def load_source(folder: str | Path, variant: str) -> tuple[nnx.Module, int]:
  """The trained DiT in `folder` and how many times its depth the DiT of `variant` has.

  Raises:
    ValueError: as `grown_start`.
  """
  folder = Path(folder)
  if not folder.is_dir():
    raise ValueError(f"--grow-from {folder}: no such folder; give the model folder of a trained DiT (a "
                     "`dfjax train --model dit` run's OUT/model, or its --export)")
  if not is_trained_model(folder) or not (folder / TRAINING).is_file():
    raise ValueError(f"--grow-from {folder} is not a `dfjax train` export (it needs config.json, classes.json "
                     f"and {TRAINING}): give the model folder of a trained DiT")
  name = read_json(folder / CONFIG).get("_class_name")
  if name != _DIT:
    raise ValueError(f"--grow-from {folder} holds a {name}, not a {_DIT}: growing inserts transformer blocks, "
                     "which only a DiT has; give a DiT's model folder")
  source = DiTConfig.from_diffusers_config(read_json(folder / CONFIG))
  valid = growable_variants(source)
  if variant not in valid:
    raise ValueError(f"--model {variant} cannot grow from {folder}: {_mismatch(source, variant)}. The variants "
                     f"that can: {', '.join(valid) or 'none'} (the source's DiT with a multiple of its "
                     f"{source.num_layers} blocks)")
  spec = VARIANTS[variant]
  if load_scheduler_config(folder) != spec.scheduler_config:
    raise ValueError(f"--grow-from {folder} was trained with another noise schedule or prediction target than "
                     f"--model {variant} trains with ({spec.prediction_type}): it would start from a model of "
                     "another task")
  return load_trained(folder).denoiser, spec.model_config.num_layers // source.num_layers


def growable_variants(source: DiTConfig) -> list[str]:
  """The `VARIANTS` that are `source`'s DiT with a multiple of its blocks."""
  return [name for name, spec in VARIANTS.items() if spec.family == "DiT" and not _mismatch(source, name)]


def _mismatch(source: DiTConfig, variant: str) -> str:
  """Why `variant` is not `source` at a multiple of its depth ("" when it is)."""
  spec = VARIANTS[variant]
  if spec.family != "DiT":
    return f"it is a {spec.family}"
  target = spec.model_config
  if target.num_layers % source.num_layers:
    return f"its {target.num_layers} blocks are not a multiple of the source's {source.num_layers}"
  same_depth = dataclasses.replace(source, num_layers=target.num_layers)
  differ = [f"{f.name} {getattr(source, f.name)} (source) vs {getattr(target, f.name)}"
            for f in dataclasses.fields(target) if getattr(same_depth, f.name) != getattr(target, f.name)]
  return f"its DiT differs in {', '.join(differ)}" if differ else ""


def source_record(folder: Path) -> dict[str, Any]:
  """What a grown run says of its source: where it was, its own command (and source, when it was grown
  itself), settings, depth, and the sha256 of its manifest (which holds every file's sha256)."""
  training = read_json(folder / TRAINING)
  record = {"folder": str(folder.absolute()), "command": training["command"], "config": training["config"],
            "num_layers": read_json(folder / CONFIG)["num_layers"], "steps": training["steps"],
            "final_loss": training["final_loss"], "wall_seconds": training["wall_seconds"],
            "manifest_sha256": sha256_file(folder / MANIFEST)}
  return record | ({"grown_from": training["grown_from"]} if "grown_from" in training else {})


def training_record(out: str | Path) -> dict[str, Any]:
  """training.json's "grown_from" entry of a grown run's export, from OUT/grown_from.json."""
  file = Path(out) / GROWN_FROM
  if not file.is_file():
    raise ValueError(f"{Path(out)} is a --grow-from run without its {GROWN_FROM} (step 0 writes it): the "
                     "export could not say what it grew from; start the run again in a new --out")
  return {"grown_from": read_json(file)}
