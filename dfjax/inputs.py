"""Inputs a run needs when the user brings none: seeded noise and stand-in conditioning.

Benchmarks and text-free sampling of a converted text-to-image UNet need conditioning of the
right shapes for every field the model takes (`config.conditioning_fields`); this is its one
source. Values are seeded Gaussians (`zeros=True`: the unconditional half), SDXL's time ids and
PixArt's resolution describe the image size, class labels are class 0 (a DiT's null class for the
unconditional half).

Shape letters: B batch, H rows, W columns, C channels, T text tokens, D text width.
"""

import jax
import jax.numpy as jnp
import numpy as np

from dfjax.sampling import Conditioning

TEXT_TOKENS = 77  # CLIP's context length: what the Stable Diffusion pipelines pass
_TIME_IDS = 6     # SDXL: original size, crop corner, target size


def initial_noise(seed: int, batch: int, height: int, width: int, channels: int) -> jax.Array:
  """(B, H, W, C) unit Gaussian noise; image i depends only on (seed, i), not on the batch size."""
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(batch))
  return jax.vmap(lambda k: jax.random.normal(k, (height, width, channels)))(keys)  # B, H, W, C


def standin_conditioning(config, batch: int, image_size: tuple[int, int], *, seed: int = 0,
                         zeros: bool = False, tokens: int = TEXT_TOKENS) -> Conditioning:
  """Conditioning of every field `config` needs (UNet, DiT or PixArt), for `batch` images of
  `image_size` = (rows, cols) pixels.

  Seeded Gaussian text states and pooled embedding (zeros with `zeros`), float32 numpy; class
  labels are class 0 (`zeros`: a DiT's null class, the unconditional half of its guidance).
  """
  rng = np.random.default_rng(seed)
  draw = (lambda *shape: np.zeros(shape, np.float32)) if zeros else (lambda *shape: rng.standard_normal(shape, np.float32))
  needed, fields = config.conditioning_fields, {}
  rows, cols = image_size
  if "encoder_hidden_states" in needed:
    fields["encoder_hidden_states"] = draw(batch, tokens, config.encoder_dim)  # B, T, D
  if "time_ids" in needed:  # SDXL micro-conditioning: the pooled text embedding and size/crop ids
    fields["text_embeds"] = draw(batch, config.projection_class_embeddings_input_dim
                                 - _TIME_IDS * config.addition_time_embed_dim)
    fields["time_ids"] = np.tile(np.array([[rows, cols, 0, 0, rows, cols]], np.float32), (batch, 1))
  if "resolution" in needed:  # PixArt-α's additional conditions: the image's size and shape
    fields["resolution"] = np.tile(np.array([[rows, cols]], np.float32), (batch, 1))  # B, 2
    fields["aspect_ratio"] = np.full((batch, 1), rows / cols, np.float32)  # B, 1
  if "class_labels" in needed:
    fields["class_labels"] = _class_labels(config, batch, zeros)
  return Conditioning(**fields)


def _class_labels(config, batch: int, unconditional: bool) -> np.ndarray:
  """Class 0 for every image; a DiT's null class (it has one) for the unconditional half."""
  if getattr(config, "class_embedding_kind", None) == "projection":  # a UNet's projected class input
    return np.zeros((batch, config.projection_class_embeddings_input_dim), np.float32)
  null = getattr(config, "null_class", None)
  return np.full((batch,), null if unconditional and null is not None else 0, np.int32)
