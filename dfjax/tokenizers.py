"""Prompt → token ids, read from a pipeline's tokenizer folder with transformers' own tokenizer classes.

A tokenizer folder is what diffusers saves as `tokenizer/` (and `tokenizer_2/`): for CLIP `vocab.json` +
`merges.txt` (or `tokenizer.json`), for T5 `spiece.model` (or `tokenizer.json`), beside a
`tokenizer_config.json` naming the class and `model_max_length`. Files are read locally only, nothing is
downloaded. Prompts are handled as diffusers' pipelines handle them: padded to the maximum length and
truncated to it, with a warning naming what was cut.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import transformers

log = logging.getLogger(__name__)

CONFIG = "tokenizer_config.json"
TOKENIZER_JSON = "tokenizer.json"
# kind → (the transformers class, the files that hold its vocabulary besides tokenizer.json)
KINDS = {"clip": ("CLIPTokenizer", ("vocab.json", "merges.txt")), "t5": ("T5Tokenizer", ("spiece.model",))}
_UNSET_MAX_LENGTH = 10 ** 20  # transformers writes ~1e30 when a tokenizer has no model_max_length


@dataclasses.dataclass(frozen=True)
class TokenizedPrompts:
  """Token ids and their keep-mask, (B, L) int32 each: 1 for the prompt's tokens, 0 for padding."""

  input_ids: np.ndarray
  attention_mask: np.ndarray


class PromptTokenizer:
  """A transformers tokenizer read from `folder`, called as `tokenizer(prompts, max_length=None)`.

  Attributes:
    kind: "clip" or "t5".
    folder: where it was read from.
    model_max_length: the folder's `model_max_length` (CLIP: 77), or None when it sets none.
    hf: the transformers tokenizer itself (its pad, eos and vocabulary).
  """

  def __init__(self, hf_tokenizer, kind: str, folder: Path):
    self.hf = hf_tokenizer
    self.kind = kind
    self.folder = folder
    length = hf_tokenizer.model_max_length
    self.model_max_length = int(length) if length and length < _UNSET_MAX_LENGTH else None

  def __call__(self, prompts: str | Sequence[str], *, max_length: int | None = None) -> TokenizedPrompts:
    """Token ids of `prompts`, each padded (or truncated) to `max_length` tokens.

    Args:
      prompts: one prompt or a list of them.
      max_length: tokens per prompt, end-of-text included; None: `model_max_length` (PixArt's pipeline
        gives 120 for T5, SD3's 256).
    Returns:
      (B, max_length) ids and keep-mask. A prompt longer than `max_length` is cut, with a warning
      naming the cut text, as diffusers does.
    Raises:
      ValueError: no prompt, a prompt that is not a string, or no `max_length` where the folder has none.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
      raise ValueError(f"prompts must be a string or a non-empty list of strings, got {prompts!r}")
    length = max_length or self.model_max_length
    if length is None:
      raise ValueError(f"{self.folder}/{CONFIG} sets no model_max_length: pass max_length (tokens per prompt; "
                       "PixArt-α's pipeline uses 120, PixArt-Σ's 300)")
    if length < 2:
      raise ValueError(f"max_length={length}: a prompt needs at least 2 tokens (text and end-of-text)")
    ids = self.hf(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="np")
    self._warn_if_truncated(prompts, length)
    return TokenizedPrompts(ids["input_ids"].astype(np.int32), ids["attention_mask"].astype(np.int32))

  def _warn_if_truncated(self, prompts: list[str], length: int) -> None:
    for i, full in enumerate(self.hf(prompts)["input_ids"]):
      if len(full) > length:  # the kept part ends in end-of-text, as diffusers' removed_text shows
        cut = self.hf.decode(full[length - 1:-1], skip_special_tokens=True)
        log.warning("The following part of prompt %d was truncated because %s can only handle sequences up to %d "
                    "tokens: %s", i, self.kind.upper(), length, cut)


def load_tokenizer(folder: str | os.PathLike, *, kind: str | None = None) -> PromptTokenizer:
  """The CLIP or T5 tokenizer saved in `folder`, from local files only.

  Args:
    folder: a tokenizer folder (a diffusers pipeline's `tokenizer/`, `tokenizer_2/`).
    kind: "clip" or "t5"; None: the class its tokenizer_config.json names, else the vocabulary files present.
  Raises:
    ValueError: the folder is missing, its kind cannot be told or is not supported, its vocabulary files
      are missing, or transformers cannot read them.
  """
  folder = Path(folder)
  if not folder.is_dir():
    raise ValueError(f"{folder}: not a folder; expected a tokenizer folder (a diffusers pipeline's tokenizer/)")
  kind = kind or _kind_of(folder)
  if kind not in KINDS:
    raise ValueError(f"tokenizer kind {kind!r} is not supported; supported: {', '.join(map(repr, KINDS))}")
  class_name, vocabulary = KINDS[kind]
  has = {f: (folder / f).is_file() for f in (TOKENIZER_JSON, *vocabulary)}
  if not has[TOKENIZER_JSON] and not all(has[f] for f in vocabulary):
    present = sorted(p.name for p in folder.iterdir())
    raise ValueError(f"{folder} holds no vocabulary of a {class_name}: it needs {' and '.join(vocabulary)} "
                     f"(or {TOKENIZER_JSON}), found {present or 'nothing'}. Copy the tokenizer folder of the "
                     "diffusers pipeline whole.")
  if kind == "t5" and not has[TOKENIZER_JSON] and importlib.util.find_spec("sentencepiece") is None:
    raise ValueError(f"{folder} has spiece.model but no {TOKENIZER_JSON}: reading it needs the sentencepiece "
                     "package (pip install 'sentencepiece>=0.2,<0.3')")
  try:
    hf_tokenizer = getattr(transformers, class_name).from_pretrained(folder, local_files_only=True)
  except (OSError, ValueError, TypeError, KeyError, json.JSONDecodeError) as e:
    raise ValueError(f"{folder}: transformers' {class_name} cannot read it ({type(e).__name__}: {e})") from e
  return PromptTokenizer(hf_tokenizer, kind, folder)


def _kind_of(folder: Path) -> str:
  """"clip" or "t5" from tokenizer_config.json's tokenizer_class, else from the vocabulary files."""
  config_file = folder / CONFIG
  if config_file.is_file():
    try:
      name = json.loads(config_file.read_text()).get("tokenizer_class")
    except json.JSONDecodeError as e:
      raise ValueError(f"{config_file}: not valid JSON ({e})") from e
    if name:
      for kind, (class_name, _) in KINDS.items():
        if name.removesuffix("Fast") == class_name:
          return kind
      raise ValueError(f"{config_file} names tokenizer_class {name!r}; dfjax reads "
                       f"{', '.join(c for c, _ in KINDS.values())} (and their Fast variants)")
  for kind, (_, vocabulary) in KINDS.items():
    if all((folder / f).is_file() for f in vocabulary):
      return kind
  raise ValueError(f"{folder}: cannot tell the tokenizer: no {CONFIG} naming its class and no vocabulary files "
                   f"({'; '.join(' + '.join(v) + ' for ' + c for c, v in KINDS.values())}). Copy the tokenizer "
                   "folder of the diffusers pipeline whole, or pass kind=\"clip\" or \"t5\".")
