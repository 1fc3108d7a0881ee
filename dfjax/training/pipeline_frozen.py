"""The frozen models whose forward DiffusionPipe runs in the pipeline's bubbles, layer by layer.

A `FrozenPart` is a non-trainable model in front of the backbone, seen as a chain of layers: the
planner (dfjax/training/pipeline_plan.py) gives the greedy filler each layer's cost, and the
executor (dfjax/training/pipeline_step.py) runs each (layer, sample range) piece where the filler
put it, for the next step's batch. Three parts exist:

  class_tokens  the UNet's class-token table (one layer: labels → the cross-attention context), built
                with the UNet from the run's seed and never trained in pipeline mode;
  text_encoder  `--frozen-text clip`, in the class tokens' place: the class captions' frozen CLIP text
                encoder (dfjax/training/captions.py; weights from a fixed seed), layer by layer: the
                embeddings (labels → their captions' token ids → token and position embeddings), each
                CLIPEncoderLayer, the final layer norm, whose output is the UNet's context;
  vae_encoder   `--frozen-encoder vae`: a small `models.vae.Encoder` (FROZEN_ENCODERS), weights from
                a fixed seed (a stand-in for a pretrained VAE, the same in every run), that turns the
                images into the latents the backbone then trains on: the posterior mean, scaled.

What a part reads is the step's dropped labels or its images; what its last layer makes is the
backbone's condition or its training input x0. Where no part makes one, it passes straight through
(the DiT's condition is the labels; without an encoder x0 is the images).

Each of the encoders' layers runs one sample at a time (`lax.map`): XLA's CPU convolutions (and
matrix products) choose their blocking by batch size, so a batched layer's result for a sample would
depend, in the last bits, on which piece of the batch it ran in; one at a time, a sample's latents (or
context) are the same in any piece, in any bubble, and up front.

Shape letters: b samples (a piece or a batch), H, W image, h, w latent, L latent channels, T class
tokens, D token width.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from dfjax import data
from dfjax.training.captions import TEXT_SEED, CaptionEncoder, Captions
from dfjax.training.fixed_weights import fixed_seed_params
from dfjax.training.model import ModelSpec
from models.clip import CLIPTextConfig, CLIPTextModel
from models.layers import Workload
from models.vae import Encoder, VAEConfig, posterior_mean_latents

LABELS, IMAGES = "labels", "images"  # what a part's first layer reads
CONDITION, X0 = "condition", "x0"  # what its last layer makes

# The VAE encoders `--frozen-encoder` offers: 2 levels (latents at half the image size) and 3 latent
# channels, so the backbones built for RGB images (dfjax/training/model.py) train on the latents as
# they are; their rows still split as the backbone needs (a 64² image: 32² latents).
FROZEN_ENCODERS: dict[str, VAEConfig] = {
    "vae": VAEConfig(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                     up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=3,
                     norm_num_groups=4, scaling_factor=1.0),
}
ENCODER_SEED = 20240517  # the frozen encoder's weights: fixed, whatever the run's seed


@dataclasses.dataclass(frozen=True)
class FrozenLayer:
  """One layer of a frozen part: its output per sample and its cost per sample (FLOPs)."""

  name: str
  sample_shape: tuple[int, ...]
  dtype: str
  flops: float

  @property
  def sample_size(self) -> int:
    return math.prod(self.sample_shape)


@dataclasses.dataclass(frozen=True)
class FrozenPart:
  """A frozen model in front of the backbone (hashable: part of the plan).

  Attributes:
    name: "class_tokens", "text_encoder" or "vae_encoder"; also its params' key in the training state's "frozen".
    reads: LABELS or IMAGES; makes: CONDITION or X0.
    layers: its layers in order.
  """

  name: str
  reads: str
  makes: str
  layers: tuple[FrozenLayer, ...]

  def params(self, model: nnx.Module) -> nnx.State:
    """The part's params (a fixed encoder's made on the first call, which must not be inside a trace:
    `PipelineExecutor` makes them when it is built)."""
    raise NotImplementedError

  def abstract(self, model: nnx.Module) -> nnx.Module:
    """The part's module, abstract (`model`: the abstract joint model)."""
    raise NotImplementedError

  def run_layer(self, module: nnx.Module, index: int, x: jax.Array) -> jax.Array:
    """Layer `index` on b samples of its input (the labels or images for layer 0) → (b, *sample_shape)."""
    raise NotImplementedError

  def run(self, module: nnx.Module, x: jax.Array) -> jax.Array:
    """All layers on b samples: the part's output computed up front."""
    for index in range(len(self.layers)):
      x = self.run_layer(module, index, x)
    return x


@dataclasses.dataclass(frozen=True)
class ClassTokensPart(FrozenPart):
  """The joint model's class-token table, built with the UNet from the run's seed, never trained here."""

  def params(self, model: nnx.Module) -> nnx.State:
    return nnx.state(model.class_tokens, nnx.Param)

  def abstract(self, model: nnx.Module) -> nnx.Module:
    return model.class_tokens

  def run_layer(self, module: nnx.Module, index: int, x: jax.Array) -> jax.Array:
    return module(x)  # b, T, D


@dataclasses.dataclass(frozen=True)
class TextPart(FrozenPart):
  """`--frozen-text`: the class captions' fixed-seed CLIP text encoder (dfjax/training/captions.py), layer
  by layer (`models.clip.CLIPTextTransformer.layer_names`).

  Attributes:
    captions: the class captions; config: the CLIP text model's.
  """

  captions: Captions
  config: CLIPTextConfig

  def params(self, model: nnx.Module) -> nnx.State:
    return fixed_seed_params(CLIPTextModel, self.config, TEXT_SEED)

  def abstract(self, model: nnx.Module) -> nnx.Module:
    return nnx.eval_shape(lambda: CLIPTextModel(self.config, rngs=nnx.Rngs(0)))

  def run_layer(self, module: nnx.Module, index: int, x: jax.Array) -> jax.Array:
    if index == 0:  # labels → their captions' token ids (a lookup: the same in any piece)
      x = self.captions.token_ids(x)  # b, T
    # one sample at a time, as the VAE encoder's layers (a matrix product's blocking may follow the batch)
    return jax.lax.map(lambda one: module.text_model.run_layer(index, one[None])[0], x)  # b, T, D


@dataclasses.dataclass(frozen=True)
class EncoderPart(FrozenPart):
  """`--frozen-encoder`: a VAE encoder from `FROZEN_ENCODERS`, its fixed weights from ENCODER_SEED.

  Attributes:
    encoder: its `FROZEN_ENCODERS` name.
  """

  encoder: str

  def params(self, model: nnx.Module) -> nnx.State:
    return fixed_seed_params(Encoder, self.encoder_config, self.encoder_seed)

  def abstract(self, model: nnx.Module) -> nnx.Module:
    return nnx.eval_shape(lambda: Encoder(self.encoder_config, rngs=nnx.Rngs(self.encoder_seed)))

  @property
  def encoder_config(self) -> VAEConfig:
    """The VAE encoder's config."""
    return FROZEN_ENCODERS[self.encoder]

  @property
  def encoder_seed(self) -> int:
    """The seed the VAE encoder's weights are drawn from, whatever the run's."""
    return ENCODER_SEED

  def encoder_module(self, params: nnx.State) -> Encoder:
    """The VAE encoder with `params` (e.g. the training state's, for the export)."""
    encoder = self.abstract(None)  # built from its config alone: no model needed
    nnx.update(encoder, params)
    return encoder

  def run_layer(self, module: nnx.Module, index: int, x: jax.Array) -> jax.Array:
    last = index == len(self.layers) - 1
    config = self.encoder_config

    def one(x_hwc):
      y = module.run_layer(index, x_hwc[None])[0]
      return posterior_mean_latents(y, config) if last else y  # the last: h, w, L

    return jax.lax.map(one, x)  # b, *sample_shape


def condition_part(spec: ModelSpec) -> FrozenPart | None:
  """What turns the labels into the UNet's context: its class-token table as a one-layer part, or with
  `spec.frozen_text` the captions' text encoder (None for a family that embeds its labels itself)."""
  shape = spec.class_token_shape
  if shape is None:
    return None
  if spec.frozen_text != "none":
    return text_part(spec)
  # a lookup: no FLOPs, a copy of T × D values per sample, the cost the filler places
  return ClassTokensPart("class_tokens", LABELS, CONDITION,
                         (FrozenLayer("lookup", shape, "float32", float(math.prod(shape))),))


def text_part(spec: ModelSpec) -> TextPart:
  """The UNet's frozen text encoder of the class captions, one layer per CLIP layer, each costed per sample
  by the models' cost model (matrix work); the embeddings and the final layer norm, which have none,
  by their T × D elementwise values (the filler still gives them their place)."""
  encoder = CaptionEncoder(data.class_names, spec.token_dim, spec.frozen_text)
  tokens = encoder.captions.tokens
  module = nnx.eval_shape(lambda: CLIPTextModel(encoder.config, rngs=nnx.Rngs(0))).text_model
  costs = module.layer_costs(tokens)
  shape = (tokens, encoder.config.hidden_size)
  layers = tuple(FrozenLayer(name, shape, "float32", float(sum(costs[name].flops.values()) or math.prod(shape)))
                 for name in module.layer_names)
  return TextPart("text_encoder", LABELS, CONDITION, layers, encoder.captions, encoder.config)


def encoder_part(encoder: str, image_shape) -> FrozenPart:
  """The `FROZEN_ENCODERS[encoder]` VAE encoder on images of `image_shape` (H, W, 3)."""
  config = FROZEN_ENCODERS[encoder]
  h, w, c = image_shape
  f = config.downsample_factor
  if c != config.in_channels or h % f or w % f:
    raise ValueError(f"the {encoder!r} frozen encoder takes {config.in_channels}-channel images whose sides divide by "
                     f"{f}; got {h}×{w}×{c}")
  module = nnx.eval_shape(lambda: Encoder(config, rngs=nnx.Rngs(0)))
  costs = module.layer_costs(Workload(h, w, 0))
  graphdef, abstract = nnx.split(module)
  shapes = jax.eval_shape(lambda state, x: _layer_outputs(nnx.merge(graphdef, state), x), abstract,
                          jax.ShapeDtypeStruct((1, h, w, c), jnp.float32))
  layers = []
  for index, (name, shape) in enumerate(zip(module.layer_names, shapes)):
    sample_shape = tuple(shape.shape[1:])
    if index == len(shapes) - 1:
      sample_shape = (*sample_shape[:-1], config.latent_channels)  # the mean of (mean, log-variance)
    layers.append(FrozenLayer(name, sample_shape, "float32", float(sum(costs[name].flops.values()))))
  return EncoderPart("vae_encoder", IMAGES, X0, tuple(layers), encoder)


def _layer_outputs(module: Encoder, x_bhwc):
  outputs = []
  for index in range(len(module.layer_names)):
    x_bhwc = module.run_layer(index, x_bhwc)
    outputs.append(x_bhwc)
  return outputs


def frozen_parts(spec: ModelSpec, encoder: str, image_shape) -> tuple[FrozenPart, ...]:
  """The frozen parts in front of `spec`'s backbone: the class tokens or the frozen text encoder (a UNet),
  and `encoder`'s VAE encoder ("none": the backbone trains on the images)."""
  parts = [part for part in (condition_part(spec),) if part is not None]
  if encoder != "none":
    parts.append(encoder_part(encoder, image_shape))
  return tuple(parts)


def backbone_shape(parts: tuple[FrozenPart, ...], image_shape) -> tuple[int, int, int]:
  """What the backbone trains on: the latents (h, w, L) of the part that makes x0, or the images."""
  return next((part.layers[-1].sample_shape for part in parts if part.makes == X0), tuple(image_shape))
