"""A trained class-conditional model as a dfjax checkpoint folder, and back.

The folder is an ordinary dfjax checkpoint (the layout of `convert/format.py`, so
`dfjax.load_model` loads its denoiser) with what turns class ids into conditioning beside it:

  params/                 the denoiser's NNX params (orbax): a UNet or a DiT
  config.json             the denoiser's diffusers config
  scheduler_config.json   the training noise schedule (diffusers DDIMScheduler config)
  manifest.json           format marker; "source" describes the training run; "files" the sha256
                          of params/, config.json, scheduler_config.json, the class files and the
                          latent encoder's files
  class_tokens/           UNet: the ClassTokens params (orbax); a `--frozen-text` run's are its frozen text
                          encoder's outputs of the class captions (its conditioning: one caption per class)
  class_tokens.json       UNet: num_classes, null_id, num_tokens, dim and the class names
  classes.json            DiT (its class embedding is in params/): num_classes, null_id, class names
  latent_encoder/         `--frozen-encoder` runs: the frozen VAE encoder's params (orbax); the denoiser
                          was trained on its latents, so it draws latents (config.json's sample_size and
                          channels are the latents'), and no decoder exists to turn them into images
  latent_encoder.json     `--frozen-encoder` runs: its name, seed, the image size it encodes, the latent
                          shape, how the latents are made, and its VAE config (diffusers AutoencoderKL)
  training.json           the run: command, config, wall time, machine, the loss curve
  loss.csv                step, loss (mean over each logging interval), learning rate
  MODEL_CARD.md           data, model, run, loss curve and machine, written from the above

It is written into a temporary sibling and renamed into place, as conversion does
(`convert.atomic`: interrupted or failed writes leave nothing behind).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert.atomic import prepare_destination, write_atomically
from convert.format import (CONFIG, MANIFEST, PARAMS_DIR, SCHEDULER_CONFIG, as_float_dtype, check_weights,
                            manifest_header, read_json, write_manifest)
from convert.keymap import path_str
from dfjax.loading import load_model, load_scheduler_config, restore_params, verify_files
from dfjax.sampling import Conditioning
from dfjax.training.captions import CaptionEncoder
from dfjax.training.card import LATENTS_NOTE, write_model_card
from models.class_tokens import ClassTokens
from models.dit_config import DiTConfig
from models.vae import Encoder, posterior_mean_latents
from models.vae_config import VAEConfig

TOKENS_DIR = "class_tokens"
TOKENS_CONFIG = "class_tokens.json"
CLASSES_CONFIG = "classes.json"
ENCODER_DIR = "latent_encoder"
ENCODER_CONFIG = "latent_encoder.json"
TRAINING = "training.json"
LOSS_CSV = "loss.csv"


class TrainedModel(NamedTuple):
  """A loaded class-conditional model: `denoiser, class_tokens, scheduler_config = model`.

  Attributes:
    denoiser: the UNet2DConditionModel or DiTTransformer2DModel (`denoiser.config` is its config).
    class_tokens: the UNet's class → `encoder_hidden_states` table; None for a DiT, which embeds
      class ids itself (`class_labels`).
    scheduler_config: the diffusers scheduler config it was trained with.
  """

  denoiser: nnx.Module
  class_tokens: ClassTokens | None
  scheduler_config: dict

  @property
  def num_classes(self) -> int:
    """Real classes; the null (unconditional) class is the id after the last."""
    return self.class_tokens.num_classes if self.class_tokens is not None else self.denoiser.config.null_class

  def conditioning(self, labels_b) -> tuple[Conditioning, Conditioning]:
    """`cond, uncond` of `dfjax.sample` for the (B,) class ids `labels_b`: those classes and the null class."""
    labels_b = jnp.asarray(labels_b, jnp.int32)  # B
    if self.class_tokens is not None:
      return (Conditioning(self.class_tokens(labels_b)),  # B, T, D
              Conditioning(self.class_tokens.null(labels_b.size)))
    null_b = jnp.full_like(labels_b, self.num_classes)  # B
    return Conditioning(class_labels=labels_b), Conditioning(class_labels=null_b)


class LatentEncoder(NamedTuple):
  """The frozen VAE encoder a model was trained behind (`dfjax train --frozen-encoder`): the model
  draws its latents, and no decoder exists to turn them back into images.

  Attributes:
    encoder: the `models.vae.Encoder`, with its weights.
    config: its VAEConfig (`scaling_factor` scales the latents).
    name: its `FROZEN_ENCODERS` name (dfjax/training/pipeline_frozen.py).
    seed: the seed its weights were drawn from, whatever the run's seed.
    image_size: the side of the square RGB images it encodes.
  """

  encoder: Encoder
  config: VAEConfig
  name: str
  seed: int
  image_size: int

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    """(h, w, L) of one image's latents: what the trained model draws."""
    side = self.image_size // self.config.downsample_factor
    return side, side, self.config.latent_channels

  def encode(self, images_bhwc: jax.Array) -> jax.Array:
    """The latents the model was trained on, of (B, H, W, 3) images in [-1, 1]: the posterior mean,
    times `scaling_factor` (B, h, w, L)."""
    graphdef, params = nnx.split(self.encoder)
    return _encode(graphdef, params, jnp.asarray(images_bhwc, jnp.float32), self.config)

  def record(self) -> dict[str, Any]:
    """latent_encoder.json: what the encoder is and makes, and its diffusers AutoencoderKL config."""
    # diffusers' AutoencoderKL sample_size is the image side it is meant for
    vae_config = dataclasses.asdict(dataclasses.replace(self.config, sample_size=self.image_size))
    return {"name": self.name, "note": LATENTS_NOTE, "seed": self.seed, "image_size": self.image_size,
            "latent_shape": list(self.latent_shape), "module": "models.vae.Encoder (no quant_conv)",
            "latents": "posterior mean × scaling_factor", "decoder": None, "vae_config": {"_class_name": "AutoencoderKL", **vae_config}}


@functools.partial(jax.jit, static_argnums=(0, 3))
def _encode(graphdef, params, images_bhwc, config: VAEConfig) -> jax.Array:
  return posterior_mean_latents(nnx.merge(graphdef, params)(images_bhwc), config)  # B, h, w, L


def write_model(folder: str | os.PathLike, denoiser: nnx.Module, class_tokens: ClassTokens | CaptionEncoder | None, *,
                denoiser_config: Mapping, scheduler_config: Mapping, class_names: Sequence[str],
                training: Mapping[str, Any], loss_rows: Sequence[tuple[int, float, float]],
                latent_encoder: LatentEncoder | None = None, overwrite: bool = True) -> Path:
  """Writes the trained model as a dfjax checkpoint folder (atomically).

  Args:
    folder: destination; an existing dfjax checkpoint there is replaced when `overwrite` (a
      symlink's target).
    denoiser, class_tokens: the modules whose `nnx.Param`s are stored (as they are: float32);
      class_tokens None for a DiT (its class embedding is one of its params); a CaptionEncoder (a
      `--frozen-text` run) is stored as its table of the class captions' contexts, and training.json
      records the encoder and the captions ("frozen_text").
    denoiser_config: the denoiser's diffusers config dict (config.json).
    scheduler_config: the diffusers scheduler config the model was trained with.
    class_names: name of each class id.
    training: what training.json records (command, hyper-parameters, wall time, machine…).
    loss_rows: (step, loss, learning rate) rows of loss.csv.
    latent_encoder: the frozen encoder whose latents the denoiser was trained on (stored beside it,
      and named in training.json); None for a model trained on the images.
  Returns:
    `folder` as a Path.
  Raises:
    FileExistsError: `folder` exists and is not a dfjax checkpoint, or `overwrite` is False.
    ValueError: a param holds NaN or inf, or `denoiser_config` does not describe the encoder's latents.
    OSError: the operating system refused a write (disk full…), in one line; nothing is written.
  """
  folder = Path(folder)
  target = prepare_destination(folder, overwrite)
  trees = {PARAMS_DIR: _pure(denoiser)}
  flat = _flat(denoiser)
  check_weights(flat, "trained denoiser params")
  model_name = denoiser_config.get("_class_name", "UNet2DConditionModel")
  if isinstance(class_tokens, CaptionEncoder):  # fixed captions: the conditioning is a table of their contexts
    training = {**training, "frozen_text": class_tokens.record()}
    class_tokens = class_tokens.class_tokens()
  if class_tokens is None:
    json_files = {CLASSES_CONFIG: {"num_classes": denoiser.config.null_class, "null_id": denoiser.config.null_class,
                                   "class_names": list(class_names)}}
  else:
    check_weights({"class_tokens.embedding": np.asarray(class_tokens.embedding[...])}, "trained class tokens")
    trees[TOKENS_DIR] = _pure(class_tokens)
    json_files = {TOKENS_CONFIG: {"num_classes": class_tokens.num_classes, "null_id": class_tokens.null_id,
                                  "num_tokens": int(class_tokens.embedding.shape[1]),
                                  "dim": int(class_tokens.embedding.shape[2]), "class_names": list(class_names)}}
  source = {"kind": "dfjax train", **({"class_tokens": TOKENS_DIR} if class_tokens is not None else {})}
  if latent_encoder is not None:
    _check_draws_latents(denoiser_config, latent_encoder)
    check_weights(_flat(latent_encoder.encoder), "frozen latent encoder params")
    trees[ENCODER_DIR] = _pure(latent_encoder.encoder)
    json_files[ENCODER_CONFIG] = record = latent_encoder.record()
    source["latent_encoder"] = ENCODER_DIR
    training = {**training, "latent_encoder": {k: v for k, v in record.items() if k != "vae_config"}}
  manifest = {**manifest_header(flat, model_name), "source": source}

  def write(tmp: Path) -> None:
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as checkpointer:
      for name, tree in trees.items():
        checkpointer.save(tmp / name, tree)
    _write_json(tmp / CONFIG, dict(denoiser_config))
    _write_json(tmp / SCHEDULER_CONFIG, dict(scheduler_config))
    for name, value in json_files.items():
      _write_json(tmp / name, value)
    _write_json(tmp / TRAINING, dict(training))
    with open(tmp / LOSS_CSV, "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(["step", "loss", "learning_rate"])
      writer.writerows([int(s), f"{l:.6f}", f"{r:.3e}"] for s, l, r in loss_rows)
    write_manifest(tmp, manifest, hashed=(PARAMS_DIR, CONFIG, SCHEDULER_CONFIG, *trees.keys() - {PARAMS_DIR},
                                          *json_files))
    write_model_card(tmp)

  write_atomically(target, write, size_bytes=sum(a.nbytes for a in jax.tree.leaves(trees)))
  return folder


def _check_draws_latents(denoiser_config: Mapping, latent_encoder: LatentEncoder) -> None:
  h, w, channels = latent_encoder.latent_shape
  got = (denoiser_config.get("sample_size"), denoiser_config.get("in_channels"), denoiser_config.get("out_channels"))
  if h != w or got != (h, channels, channels):
    raise ValueError(f"a denoiser config of sample_size, in_channels, out_channels = {got} cannot draw the "
                     f"{h}×{w}×{channels} latents its frozen encoder makes: the encoder must make square latents "
                     f"of the channels the model variant takes, and the config must say sample_size {h} "
                     "(`dfjax.training.loop.latent_config`)")


def is_trained_model(folder: str | os.PathLike) -> bool:
  """Whether `folder` looks like a `write_model` export (it has its class files)."""
  return any((Path(folder) / name).is_file() for name in (TOKENS_CONFIG, CLASSES_CONFIG))


def load_trained(folder: str | os.PathLike, *, dtype: Any = None, param_dtype: Any = None,
                 sharding: jax.sharding.Sharding | None = None, verify: bool = True) -> TrainedModel:
  """Loads a folder written by `write_model` (e.g. `dfjax train`'s model/).

  Args:
    folder: the model folder.
    dtype, param_dtype, sharding, verify: as in `dfjax.load_model`, for every module (verify also
      checks the class files and the noise schedule against the manifest).
  Returns:
    TrainedModel(denoiser, class_tokens, scheduler_config).
  Raises:
    ValueError: not a trained dfjax model (e.g. a converted text-to-image UNet: no class tokens),
      class tokens that do not fit the UNet, or damaged files (as in `dfjax.load_model`).
  """
  folder = Path(folder)
  kw = {k: as_float_dtype(v, k) for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v is not None}
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
  denoiser = load_model(folder, dtype=dtype, param_dtype=param_dtype, sharding=sharding, verify=verify)
  if isinstance(denoiser.config, DiTConfig):  # its class embedding is one of its params
    if not (folder / CLASSES_CONFIG).is_file():
      raise ValueError(f"{folder} is a DiT checkpoint without {CLASSES_CONFIG}: not a class-conditional model "
                       "written by `dfjax train`")
    tokens, class_files = None, (CLASSES_CONFIG,)
  else:
    tokens, class_files = _load_class_tokens(folder, denoiser, kw, sharding, verify), (TOKENS_DIR, TOKENS_CONFIG)
  manifest = read_json(folder / MANIFEST)
  if verify and "files" in manifest:  # (load_model warned already when it records no hashes)
    verify_files(folder, manifest, (*class_files, SCHEDULER_CONFIG, ENCODER_DIR, ENCODER_CONFIG))
  scheduler_config = load_scheduler_config(folder)
  if scheduler_config is None:
    raise ValueError(f"{folder} has no {SCHEDULER_CONFIG}: a trained model needs its noise schedule")
  return TrainedModel(denoiser, tokens, scheduler_config)


def _load_class_tokens(folder: Path, unet: nnx.Module, kw: Mapping, sharding, verify: bool) -> ClassTokens:
  if not (folder / TOKENS_CONFIG).is_file() or not (folder / TOKENS_DIR).is_dir():
    raise ValueError(f"{folder} is a dfjax checkpoint without class tokens ({TOKENS_CONFIG}, "
                     f"{TOKENS_DIR}/): not a class-conditional model written by `dfjax train`")
  meta = read_json(folder / TOKENS_CONFIG)
  if meta["dim"] != unet.config.encoder_dim:
    raise ValueError(f"{folder / TOKENS_CONFIG}: tokens of width {meta['dim']} do not fit the UNet's "
                     f"cross_attention_dim {unet.config.encoder_dim}")
  tokens = nnx.eval_shape(lambda: ClassTokens(meta["num_classes"], meta["num_tokens"], meta["dim"],
                                              rngs=nnx.Rngs(0), **kw))
  return _restored(tokens, folder / TOKENS_DIR, sharding, verify)


def latent_encoder_record(folder: str | os.PathLike) -> dict | None:
  """latent_encoder.json of a `--frozen-encoder` run's export (its model draws latents), else None."""
  file = Path(folder) / ENCODER_CONFIG
  return read_json(file) if file.is_file() else None


def load_latent_encoder(folder: str | os.PathLike, *, sharding: jax.sharding.Sharding | None = None,
                        verify: bool = True) -> LatentEncoder | None:
  """The frozen encoder a `write_model` export was trained behind; None for a model of images.

  `model.denoiser` of `load_trained(folder)` draws `encode`'s latents (`latent_shape`), which no decoder
  turns back into images.

  Raises:
    ValueError: the encoder's files are incomplete, or (with `verify`) differ from what was written.
  """
  folder = Path(folder)
  manifest = read_json(folder / MANIFEST)
  if verify and "files" in manifest:
    verify_files(folder, manifest, (ENCODER_DIR, ENCODER_CONFIG))
  record = latent_encoder_record(folder)
  if record is None:
    return None
  if not (folder / ENCODER_DIR).is_dir():
    raise ValueError(f"{folder} has {ENCODER_CONFIG} but no {ENCODER_DIR}/: the latent encoder's params are "
                     "missing; export the run again")
  config = VAEConfig.from_diffusers_config(record["vae_config"])
  abstract = nnx.eval_shape(lambda: Encoder(config, rngs=nnx.Rngs(0)))
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
  encoder = _restored(abstract, folder / ENCODER_DIR, sharding, verify)
  return LatentEncoder(encoder, config, record["name"], record["seed"], record["image_size"])


def _restored(abstract: nnx.Module, directory: Path, sharding, verify: bool) -> nnx.Module:
  """The abstract module with its params restored from the orbax tree in `directory`."""
  graphdef, state = nnx.split(abstract)
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                        nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, restore_params(directory, target, check_finite=verify))
  return nnx.merge(graphdef, state)


def _flat(module: nnx.Module) -> dict[str, np.ndarray]:
  """The module's params by their dotted path, as host arrays."""
  return {path_str(p): np.asarray(v) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def _pure(module: nnx.Module) -> dict:
  """The module's params as a nested dict of host arrays, as `nnx.state(m, nnx.Param)` nests."""
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(module, nnx.Param)))


def _write_json(path: Path, value: Any) -> None:
  path.write_text(json.dumps(value, indent=2) + "\n")
