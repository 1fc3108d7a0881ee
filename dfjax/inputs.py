"""Inputs a run needs when the user brings none: seeded noise and stand-in conditioning.

Benchmarks and text-free sampling of a converted text-to-image UNet need conditioning of the
right shapes for every field the model takes (`config.conditioning_fields`); this is its one
source. Values are seeded Gaussians (`zeros=True`: the unconditional half), SDXL's time ids and
PixArt's resolution / aspect ratio describe the image size, class labels are class 0 (DiT's
unconditional half: its null class).

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
  """Conditioning of every field `config` needs, for `batch` images of `image_size` = (rows, cols) pixels.

  Seeded Gaussian text states and pooled embedding (zeros with `zeros`), float32 numpy.
  """
  rng = np.random.default_rng(seed)
  draw = (lambda *shape: np.zeros(shape, np.float32)) if zeros else (lambda *shape: rng.standard_normal(shape, np.float32))
  needed = config.conditioning_fields
  rows, cols = image_size
  fields = {}
  if "encoder_hidden_states" in needed:
    fields["encoder_hidden_states"] = draw(batch, tokens, config.encoder_dim)  # B, T, D
  if "time_ids" in needed:  # SDXL micro-conditioning: the pooled text embedding and size/crop ids
    fields["text_embeds"] = draw(batch, config.projection_class_embeddings_input_dim
                                 - _TIME_IDS * config.addition_time_embed_dim)
    fields["time_ids"] = np.tile(np.array([[rows, cols, 0, 0, rows, cols]], np.float32), (batch, 1))
  if "class_labels" in needed and hasattr(config, "null_class"):  # DiT: a class id, or the null class
    fields["class_labels"] = np.full((batch,), config.null_class if zeros else 0, np.int32)
  elif "class_labels" in needed:
    fields["class_labels"] = (np.zeros((batch, config.projection_class_embeddings_input_dim), np.float32)
                              if config.class_embedding_kind == "projection" else np.zeros((batch,), np.int32))
  if "resolution" in needed:  # PixArt-α's additional conditions
    fields["resolution"] = np.tile(np.array([[rows, cols]], np.float32), (batch, 1))  # B, 2
    fields["aspect_ratio"] = np.full((batch, 1), rows / cols, np.float32)  # B, 1
  return Conditioning(**fields)
