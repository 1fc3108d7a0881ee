"""Prompts → the denoiser's conditioning, exactly as diffusers' pipelines compute it.

One class per prompt scheme, each tokenizing on the host (transformers' tokenizers read from the
checkpoint, `dfjax.tokenizers`) and encoding the prompts and their negatives in one jitted call:

  ClipPrompts   SD1.x / SD2.x: CLIP's last hidden state after the final layer norm (with `clip_skip`,
                the state that many layers earlier, through the final layer norm too).
  SDXLPrompts   both CLIP encoders' penultimate hidden states, without the final layer norm (`clip_skip`
                counts back from there), concatenated; the pooled embedding is the second encoder's
                projection; zeros for the negative when `force_zeros_for_empty_prompt` and no negative
                prompt is given; `time_ids` (original size, crop corner (0, 0), target size) from the size.
  T5Prompts     PixArt: T5's last hidden state and its attention mask (padding dropped by the denoiser's
                cross-attention); PixArt-α's resolution and aspect-ratio conditions from the size.

A negative prompt is tokenized to the positive's length, as diffusers does; an empty string when none
is given. Every `encode` returns (cond, uncond) `Conditioning`s, uncond None without guidance.

Shape letters: B prompts, T tokens, D text width, P pooled width.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dfjax.sampling import Conditioning
from dfjax.tokenizers import PromptTokenizer
from models.clip import CLIPTextModel, CLIPTextModelWithProjection
from models.t5 import T5EncoderModel


def _check_clip_skip(clip_skip: int | None, encoder, what: str, extra: int) -> None:
  """`clip_skip` counts back from the layer the pipeline reads; it must leave at least the embeddings."""
  if clip_skip is None:
    return
  layers = encoder.config.num_hidden_layers
  if not isinstance(clip_skip, int) or isinstance(clip_skip, bool) or not 0 <= clip_skip <= layers - extra:
    raise ValueError(f"clip_skip={clip_skip!r}: {what} has {layers} layers, so clip_skip must be an int in "
                     f"0…{layers - extra} (None reads the layer the pipeline reads by default)")


class _Encoder:
  """Text encoder modules split once into (graph, params); `run(fn, *arrays, **static)` calls the jitted
  `fn(modules, *arrays, **static)` with the modules merged back, so each shape compiles once."""

  def __init__(self, *modules: nnx.Module):
    self.modules = modules
    self._graphdefs, self._states = zip(*(nnx.split(m) for m in modules))

  def run(self, fn, *arrays, **static):
    return _run_merged(fn, self._graphdefs, self._states, *arrays, **static)


@functools.partial(jax.jit, static_argnums=(0, 1), static_argnames=("clip_skip", "negatives"))
def _run_merged(fn, graphdefs, states, *arrays, **static):
  modules = [nnx.merge(g, s) for g, s in zip(graphdefs, states)]
  return fn(modules, *arrays, **static)


def _negatives(negative_prompt: list[str] | None, count: int) -> list[str]:
  return [""] * count if negative_prompt is None else negative_prompt


def _with_negatives(ids: np.ndarray, negative_ids: np.ndarray | None) -> np.ndarray:
  """(negatives, prompts) stacked on the batch axis: one encoder pass for both."""
  return ids if negative_ids is None else np.concatenate([negative_ids, ids])


def _split(array: jax.Array, guided: bool, count: int) -> tuple[jax.Array, jax.Array | None]:
  """(the prompts' rows, the negatives' rows or None) of a (negatives, prompts) stacked batch."""
  return (array[-count:], array[:count]) if guided else (array, None)


class ClipPrompts:
  """SD1.x / SD2.x prompt encoding: one CLIP tokenizer and `CLIPTextModel`."""

  def __init__(self, tokenizer: PromptTokenizer, text_encoder: CLIPTextModel):
    self.tokenizer = tokenizer
    self.encoder = _Encoder(text_encoder)

  def encode(self, prompt: list[str], negative_prompt: list[str] | None, *, guided: bool, height: int,
             width: int, clip_skip: int | None = None) -> tuple[Conditioning, Conditioning | None]:
    del height, width  # SD's UNet takes no size conditioning
    _check_clip_skip(clip_skip, self.encoder.modules[0], "the text encoder", extra=1)
    ids = self.tokenizer(prompt).input_ids  # B, T
    negative_ids = self.tokenizer(_negatives(negative_prompt, len(prompt)), max_length=ids.shape[1]
                                  ).input_ids if guided else None
    states = self.encoder.run(_clip_states, _with_negatives(ids, negative_ids), clip_skip=clip_skip)
    cond, uncond = _split(states, guided, len(prompt))
    return Conditioning(encoder_hidden_states=cond), None if uncond is None else Conditioning(
        encoder_hidden_states=uncond)


def _clip_states(modules, ids_bt, *, clip_skip):
  (encoder,) = modules
  out = encoder(ids_bt)
  if clip_skip is None:
    return out.last_hidden_state  # B, T, D
  return encoder.text_model.final_layer_norm(out.hidden_states[-(clip_skip + 1)])  # B, T, D


class SDXLPrompts:
  """SDXL prompt encoding: two CLIP tokenizers, `CLIPTextModel` and `CLIPTextModelWithProjection`.

  Args:
    force_zeros_for_empty_prompt: the pipeline's option (model_index.json): the negative embeddings are
      zeros when no negative prompt is given.
  """

  def __init__(self, tokenizers: tuple[PromptTokenizer, PromptTokenizer],
               text_encoders: tuple[CLIPTextModel, CLIPTextModelWithProjection], *,
               force_zeros_for_empty_prompt: bool = True):
    if not isinstance(text_encoders[1], CLIPTextModelWithProjection):
      raise ValueError(f"SDXL's text_encoder_2 must be a CLIPTextModelWithProjection (its projection is the "
                       f"pooled embedding), got {type(text_encoders[1]).__name__}")
    self.tokenizers = tokenizers
    self.encoder = _Encoder(*text_encoders)
    self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt

  def encode(self, prompt: list[str], negative_prompt: list[str] | None, *, guided: bool, height: int,
             width: int, clip_skip: int | None = None) -> tuple[Conditioning, Conditioning | None]:
    for module, name in zip(self.encoder.modules, ("text_encoder", "text_encoder_2")):
      _check_clip_skip(clip_skip, module, name, extra=2)
    zeros = guided and negative_prompt is None and self.force_zeros_for_empty_prompt
    encode_negatives = guided and not zeros
    ids = []
    for tokenizer in self.tokenizers:
      prompt_ids = tokenizer(prompt).input_ids  # B, T
      negative_ids = tokenizer(_negatives(negative_prompt, len(prompt)), max_length=prompt_ids.shape[1]
                               ).input_ids if encode_negatives else None
      ids.append(_with_negatives(prompt_ids, negative_ids))
    states, pooled = self.encoder.run(_sdxl_states, *ids, clip_skip=clip_skip,
                                      negatives=len(prompt) if encode_negatives else 0)
    time_ids = jnp.tile(jnp.asarray([[height, width, 0, 0, height, width]], jnp.float32), (len(prompt), 1))
    cond_states, uncond_states = _split(states, encode_negatives, len(prompt))
    cond_pooled, uncond_pooled = _split(pooled, encode_negatives, len(prompt))
    cond = Conditioning(encoder_hidden_states=cond_states, text_embeds=cond_pooled, time_ids=time_ids)
    if not guided:
      return cond, None
    if zeros:
      return cond, Conditioning(encoder_hidden_states=jnp.zeros_like(cond_states),
                                text_embeds=jnp.zeros_like(cond_pooled), time_ids=time_ids)
    return cond, Conditioning(encoder_hidden_states=uncond_states, text_embeds=uncond_pooled, time_ids=time_ids)


def _sdxl_states(modules, ids_1_bt, ids_2_bt, *, clip_skip, negatives):
  """(B, T, D1 + D2) hidden states, (B, P) pooled; the first `negatives` rows (the negative prompts)
  always read the penultimate layer, as diffusers' SDXL does whatever clip_skip is."""
  layer = -(2 if clip_skip is None else clip_skip + 2)
  outs = [encoder(ids_bt) for encoder, ids_bt in zip(modules, (ids_1_bt, ids_2_bt))]
  picked = []
  for out in outs:
    rows_btd = out.hidden_states[layer]  # B, T, D_i
    if negatives:
      rows_btd = jnp.concatenate([out.hidden_states[-2][:negatives], rows_btd[negatives:]])
    picked.append(rows_btd)
  return jnp.concatenate(picked, axis=-1), outs[1].text_embeds  # B, T, D1 + D2; B, P


class T5Prompts:
  """PixArt prompt encoding: a T5 tokenizer and `T5EncoderModel`.

  Args:
    max_sequence_length: tokens per prompt by default (PixArt-α's pipeline: 120, PixArt-Σ's: 300).
    size_conditions: the denoiser takes PixArt-α's resolution and aspect-ratio conditions.
  """

  def __init__(self, tokenizer: PromptTokenizer, text_encoder: T5EncoderModel, *, max_sequence_length: int,
               size_conditions: bool):
    self.tokenizer = tokenizer
    self.encoder = _Encoder(text_encoder)
    self.max_sequence_length = max_sequence_length
    self.size_conditions = size_conditions

  def encode(self, prompt: list[str], negative_prompt: list[str] | None, *, guided: bool, height: int,
             width: int, clip_skip: int | None = None, max_sequence_length: int | None = None
             ) -> tuple[Conditioning, Conditioning | None]:
    if clip_skip is not None:
      raise ValueError("clip_skip applies to CLIP text encoders; PixArt's T5 encoder takes none (pass None)")
    tokens = self.tokenizer(prompt, max_length=max_sequence_length or self.max_sequence_length)
    ids, mask = tokens.input_ids, tokens.attention_mask  # B, T each
    if guided:
      negative = self.tokenizer(_negatives(negative_prompt, len(prompt)), max_length=ids.shape[1])
      ids, mask = _with_negatives(ids, negative.input_ids), _with_negatives(mask, negative.attention_mask)
    states = self.encoder.run(_t5_states, ids, mask)
    sizes = {}
    if self.size_conditions:
      count = len(prompt)
      sizes = dict(resolution=jnp.tile(jnp.asarray([[height, width]], jnp.float32), (count, 1)),
                   aspect_ratio=jnp.full((count, 1), height / width, jnp.float32))
    (cond_states, uncond_states), (cond_mask, uncond_mask) = (_split(a, guided, len(prompt))
                                                              for a in (states, jnp.asarray(mask)))
    cond = Conditioning(encoder_hidden_states=cond_states, encoder_attention_mask=cond_mask, **sizes)
    return cond, None if not guided else Conditioning(encoder_hidden_states=uncond_states,
                                                      encoder_attention_mask=uncond_mask, **sizes)


def _t5_states(modules, ids_bt, mask_bt):
  (encoder,) = modules
  return encoder(ids_bt, mask_bt).last_hidden_state  # B, T, D
