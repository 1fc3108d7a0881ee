"""What the text encoders (models/clip.py, models/t5.py) share: their output, the activations that
transformers names in its configs, strict configs from a transformers `config.json`, and the jitted call.

Text encoders run replicated (whole prompts on every device): they never ask a parallel context.

Shape letters: B batch (prompts), T tokens, D width, P projection width.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TextEncoderOutput:
  """A text encoder's result, named as transformers names it.

  Attributes:
    last_hidden_state: (B, T, D) the last layer's states after the final layer norm.
    hidden_states: the (B, T, D) states after the embeddings and after every layer, layers + 1 of
      them, as transformers' `output_hidden_states=True` gives them (CLIP: all before the final layer
      norm, so `hidden_states[-2]` is SDXL's penultimate layer; T5: the last one after it).
    pooler_output: CLIP: (B, D) the final states at each prompt's end-of-text token; None for T5.
    text_embeds: CLIPTextModelWithProjection: (B, P) `pooler_output` projected; None otherwise.
  """

  last_hidden_state: jax.Array
  hidden_states: tuple[jax.Array, ...]
  pooler_output: jax.Array | None = None
  text_embeds: jax.Array | None = None


def quick_gelu(x: jax.Array) -> jax.Array:
  """x·σ(1.702x): OpenAI CLIP's approximation of GELU."""
  return x * jax.nn.sigmoid(1.702 * x)


def gelu_tanh(x: jax.Array) -> jax.Array:
  """GELU with the tanh approximation (transformers' "gelu_new" and "gelu_pytorch_tanh")."""
  return jax.nn.gelu(x, approximate=True)


def gelu_exact(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=False)


ACTIVATIONS: Mapping[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": quick_gelu, "gelu": gelu_exact, "gelu_new": gelu_tanh, "gelu_pytorch_tanh": gelu_tanh,
    "relu": jax.nn.relu, "silu": jax.nn.silu, "swish": jax.nn.silu,
}
"""transformers' activation names (`hidden_act`, T5's `dense_act_fn`) → the function."""


def activation(name: str, what: str) -> Callable[[jax.Array], jax.Array]:
  """The activation transformers calls `name`; a ValueError naming `what` and the choices otherwise."""
  if name not in ACTIVATIONS:
    raise ValueError(f"{what}={name!r} is not an activation dfjax implements; supported: "
                     f"{', '.join(map(repr, ACTIVATIONS))}")
  return ACTIVATIONS[name]


# Keys every transformers `PretrainedConfig` may write (v4 wrote its generation defaults too): they
# describe saving, generation or fine-tuning heads, never the encoder's forward.
GENERIC_CONFIG_KEYS = frozenset({
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "return_dict",
    "output_attentions", "output_hidden_states", "use_return_dict", "torchscript", "use_bfloat16",
    "tf_legacy_loss", "pruned_heads", "tie_word_embeddings", "chunk_size_feed_forward", "is_encoder_decoder",
    "is_decoder", "add_cross_attention", "cross_attention_hidden_size", "tie_encoder_decoder", "finetuning_task",
    "id2label", "label2id", "num_labels", "problem_type", "tokenizer_class", "prefix", "task_specific_params",
    "bos_token_id", "pad_token_id", "eos_token_id", "sep_token_id", "decoder_start_token_id", "max_length",
    "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
    "output_scores", "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    "use_cache", "gradient_checkpointing", "initializer_range", "initializer_factor",
})


def fields_from_config(cls: type, config: Mapping[str, Any], *, kind: str, model_types: tuple[str, ...],
                       inert: frozenset[str]) -> dict[str, Any]:
  """The dataclass `cls`'s fields from a transformers config dict (keys starting with `_` ignored).

  Args:
    kind: the model's name for messages ("CLIP text", "T5").
    model_types: the `model_type` values a config of this model may carry.
    inert: this model's keys without effect on the inference forward (dropout rates…), besides
      `GENERIC_CONFIG_KEYS`.
  Raises:
    ValueError: a key dfjax does not know (it will not guess what it changes), or another model_type.
  """
  model_type = config.get("model_type")
  if model_type is not None and model_type not in model_types:
    raise ValueError(f"{kind} config has model_type={model_type!r}; a {kind} encoder's is "
                     f"{' or '.join(map(repr, model_types))}")
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(k for k in config if not k.startswith("_") and k not in names | inert | GENERIC_CONFIG_KEYS)
  if unknown:
    raise ValueError(f"unknown {kind} config keys {unknown}: dfjax does not know what they change, so it will "
                     "not guess. Remove them if they are inert.")
  return {k: v for k, v in config.items() if k in names}


def check_positive(kind: str, **values: Any) -> None:
  """A ValueError naming every value that is not a positive int."""
  bad = [f"{k}={v!r}" for k, v in values.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1]
  if bad:
    raise ValueError(f"{kind} config: {', '.join(bad)} must be positive ints")


def check_token_batch(input_ids_bt: jax.Array, attention_mask_bt: jax.Array | None, kind: str,
                      max_tokens: float = math.inf) -> None:
  """Checks the shapes of token ids (B, T) and their optional keep-mask (1: token, 0: padding)."""
  if input_ids_bt.ndim != 2 or not jnp.issubdtype(input_ids_bt.dtype, jnp.integer):
    raise ValueError(f"{kind}: input_ids must be integer token ids of shape (batch, tokens), got "
                     f"{input_ids_bt.dtype} {tuple(input_ids_bt.shape)}")
  if input_ids_bt.shape[1] > max_tokens:
    raise ValueError(f"{kind}: {input_ids_bt.shape[1]} tokens, but the model has {max_tokens} positions; "
                     f"truncate the prompt to {max_tokens} tokens (the tokenizer's max_length)")
  if attention_mask_bt is not None and tuple(attention_mask_bt.shape) != tuple(input_ids_bt.shape):
    raise ValueError(f"{kind}: attention_mask of shape {tuple(attention_mask_bt.shape)} must match input_ids' "
                     f"{tuple(input_ids_bt.shape)}")


class JittedEncoder:
  """A text encoder as one jitted function: `encoder(input_ids, attention_mask=None)`.

  The params are split off once and passed as arguments (not baked into the program as constants), so
  it compiles once per (batch, length) and mask or no mask, and every later call reuses that program.
  """

  def __init__(self, model: nnx.Module):
    graphdef, self._state = nnx.split(model)
    self._run = jax.jit(lambda state, ids_bt, mask_bt: nnx.merge(graphdef, state)(ids_bt, mask_bt))

  def __call__(self, input_ids_bt: jax.Array, attention_mask_bt: jax.Array | None = None) -> TextEncoderOutput:
    mask_bt = None if attention_mask_bt is None else jnp.asarray(attention_mask_bt)
    return self._run(self._state, jnp.asarray(input_ids_bt), mask_bt)

  @property
  def compiled_programs(self) -> int:
    """How many programs it has compiled so far: one per input shape (and mask or none) seen."""
    return self._run._cache_size()
