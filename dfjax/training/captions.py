"""The classes' captions through a frozen text encoder: the UNet's context with `dfjax train --frozen-text clip`.

Stable Diffusion's UNet attends to a frozen CLIP text encoder's last hidden state of the prompt. Here
every class id has one fixed caption over a small word vocabulary ("a picture of horizontal bands",
from `dfjax.data.class_names`; the null class the empty caption: start and end tokens only),
tokenised once on the host into a (K+1, T) table of ids, and a `models.clip.CLIPTextModel` sized for
the UNet (hidden size its cross_attention_dim D, T positions, 2 layers), with weights from a fixed seed
(a stand-in for a pretrained CLIP, as ENCODER_SEED is for the frozen VAE encoder: the same in every
run, never trained), turns them into the (B, T, D) context.

`CaptionEncoder` has the interface of `models.class_tokens.ClassTokens` (labels, the null class id K
included, → context) and no params of its own: the encoder's weights are constants of the program, so
a model holding it in place of the class tokens trains the denoiser alone. Since a caption is fixed
per class, the trained model's conditioning is a (K+1, T, D) table: `class_tokens()` is it, as the
export stores it.

Shape letters: B batch, T tokens (the longest caption's words + 2), D token width, K+1 classes and
the null class.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dfjax.training.fixed_weights import fixed_seed_params
from models.class_tokens import ClassTokens
from models.clip import CLIPTextConfig, CLIPTextModel

CAPTION = "a picture of {}"  # a class name's caption, its underscores spaces
START, END = "<|startoftext|>", "<|endoftext|>"  # CLIP's; END also pads, as SD1.x's tokenizer does
TEXT_SEED = 20240518  # the frozen text encoder's weights: fixed, whatever the run's seed


@dataclasses.dataclass(frozen=True)
class FrozenText:
  """A frozen text encoder `--frozen-text` offers: the CLIP text model's size beside its width D.

  Attributes:
    layers: CLIPEncoderLayers; heads: attention heads (D must divide by them); mlp_ratio: F / D.
  """

  layers: int = 2
  heads: int = 2
  mlp_ratio: int = 4


FROZEN_TEXT: dict[str, FrozenText] = {"clip": FrozenText()}


@dataclasses.dataclass(frozen=True)
class Captions:
  """The classes' captions, their word vocabulary and their token ids (all fixed by the names).

  Attributes:
    class_names: the name of each class id; the null class (id K) has the empty caption.
  """

  class_names: tuple[str, ...]

  @property
  def texts(self) -> tuple[str, ...]:
    """(K+1) captions: each class's, then the null class's ""."""
    return (*(CAPTION.format(name.replace("_", " ")) for name in self.class_names), "")

  @property
  def vocab(self) -> tuple[str, ...]:
    """The caption words, sorted, then START and END (the largest id: CLIP pools at the end token)."""
    return (*sorted({word for text in self.texts for word in text.split()}), START, END)

  @property
  def tokens(self) -> int:
    """T: the longest caption's words, its start and its end."""
    return 2 + max(len(text.split()) for text in self.texts)

  @property
  def ids(self) -> np.ndarray:
    """(K+1, T) int32: START, the words, END, padded with END."""
    index = {word: i for i, word in enumerate(self.vocab)}
    rows = [[index[START], *(index[w] for w in text.split()), index[END]] for text in self.texts]
    return np.asarray([row + [index[END]] * (self.tokens - len(row)) for row in rows], np.int32)

  def token_ids(self, labels_b: jax.Array) -> jax.Array:
    """(B,) class ids → (B, T) their captions' token ids (out-of-range ids clipped, as ClassTokens does)."""
    return jnp.take(jnp.asarray(self.ids), labels_b, axis=0, mode="clip")  # B, T

  def text_config(self, text: str, dim: int) -> CLIPTextConfig:
    """The CLIP text config of frozen text encoder `text` for a UNet whose cross_attention_dim is `dim`."""
    size = FROZEN_TEXT[text]
    if dim % size.heads:
      raise ValueError(f"the {text!r} frozen text encoder has {size.heads} heads; the UNet's cross_attention_dim "
                       f"{dim} must divide by them")
    return CLIPTextConfig(vocab_size=len(self.vocab), hidden_size=dim, intermediate_size=size.mlp_ratio * dim,
                          projection_dim=dim, num_hidden_layers=size.layers, num_attention_heads=size.heads,
                          max_position_embeddings=self.tokens, eos_token_id=len(self.vocab) - 1)


def text_model(config: CLIPTextConfig, params: nnx.State | None = None) -> CLIPTextModel:
  """The CLIP text model of `config` with `params` (default: its fixed weights from TEXT_SEED)."""
  graphdef = nnx.split(nnx.eval_shape(lambda: CLIPTextModel(config, rngs=nnx.Rngs(0))), nnx.Param)[0]
  return nnx.merge(graphdef, fixed_seed_params(CLIPTextModel, config, TEXT_SEED) if params is None
                         else params)


class CaptionEncoder(nnx.Module):
  """Class ids → the frozen text encoder's last hidden state of their captions (ClassTokens' interface).

  Args:
    class_names: the classes (id K, one past the last, is the null class: the empty caption).
    dim: the context width D (the UNet's cross_attention_dim).
    text: the `FROZEN_TEXT` encoder.
  """

  def __init__(self, class_names, dim: int, text: str = "clip"):
    if text not in FROZEN_TEXT:
      raise ValueError(f"unknown frozen text encoder {text!r}; valid: {', '.join(FROZEN_TEXT)}")
    self.captions = Captions(tuple(class_names))
    self.config = self.captions.text_config(text, dim)
    self.text = text
    self.num_classes = len(class_names)

  @property
  def null_id(self) -> int:
    """The id of the null (unconditional) class: the empty caption."""
    return self.num_classes

  def __call__(self, labels_b: jax.Array) -> jax.Array:
    """(B,) int ids in [0, num_classes] (num_classes = null) → (B, T, D) context tokens."""
    labels_b = jnp.asarray(labels_b)
    if labels_b.ndim != 1 or not jnp.issubdtype(labels_b.dtype, jnp.integer):
      raise ValueError(f"class labels must be a (B,) int array, got shape {labels_b.shape} and "
                       f"dtype {labels_b.dtype}")
    return text_model(self.config)(self.captions.token_ids(labels_b)).last_hidden_state  # B, T, D

  def null(self, batch: int) -> jax.Array:
    """(batch, T, D) context of the null class: the unconditional half of guidance."""
    return self(jnp.full((batch,), self.null_id, jnp.int32))  # B, T, D

  def class_tokens(self) -> ClassTokens:
    """The conditioning as a class-token table: row k the context of class k's caption (K+1, T, D)."""
    table = jax.jit(lambda: self(jnp.arange(self.num_classes + 1)))()  # K+1, T, D
    tokens = nnx.eval_shape(lambda: ClassTokens(self.num_classes, self.captions.tokens, self.config.hidden_size,
                                                rngs=nnx.Rngs(0)))
    tokens.embedding.set_value(jnp.asarray(table))
    return tokens

  def record(self) -> dict:
    """What training.json and the model card say the context is."""
    return {"name": self.text, "seed": TEXT_SEED, "captions": list(self.captions.texts),
            "vocab": list(self.captions.vocab), "tokens": self.captions.tokens,
            "config": dataclasses.asdict(self.config),
            "note": "a frozen CLIP text encoder's last hidden state of each class's caption (weights from a fixed "
                    "seed, never trained: a stand-in for a pretrained CLIP), stored as the class-token table"}
