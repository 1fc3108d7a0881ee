"""dfjax/tokenizers.py on tokenizer folders written here: a hand-made CLIP BPE vocabulary, a T5 Unigram
`tokenizer.json`, and a T5 `spiece.model` trained by sentencepiece (PixArt's folders hold only that).
Expected ids are counted by hand from the vocabularies (or come from sentencepiece itself)."""

import json
import logging

import numpy as np
import pytest
import sentencepiece
import transformers

from dfjax.tokenizers import load_tokenizer

LETTERS = "abcdefghijklmnopqrstuvwxyz"
MERGES = ["l o", "lo w</w>", "c a", "ca t</w>"]
CLIP_VOCAB = {**{c: i for i, c in enumerate(LETTERS)}, **{f"{c}</w>": 26 + i for i, c in enumerate(LETTERS)},
              "lo": 52, "low</w>": 53, "ca": 54, "cat</w>": 55, "<|startoftext|>": 56, "<|endoftext|>": 57, "!": 58}
BOS, EOS, BANG = 56, 57, 58
A, LOW, CAT = 26, 53, 55  # "a</w>", "low</w>", "cat</w>"


def write_clip_folder(folder, *, max_length: int | None = 8, pad: str = "<|endoftext|>"):
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "vocab.json").write_text(json.dumps(CLIP_VOCAB))
  (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
  if max_length is not None:
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "pad_token": pad,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))
  return folder


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
  return write_clip_folder(tmp_path_factory.mktemp("tok") / "clip")


def test_clip_pads_to_model_max_length(clip_folder):
  tokenizer = load_tokenizer(clip_folder)
  assert (tokenizer.kind, tokenizer.model_max_length) == ("clip", 8)
  out = tokenizer(["a low cat", "cat"])
  np.testing.assert_array_equal(out.input_ids, [[BOS, A, LOW, CAT, EOS, EOS, EOS, EOS],
                                                [BOS, CAT, EOS, EOS, EOS, EOS, EOS, EOS]])
  np.testing.assert_array_equal(out.attention_mask, [[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]])
  assert out.input_ids.dtype == np.int32
  np.testing.assert_array_equal(tokenizer("cat", max_length=4).input_ids, [[BOS, CAT, EOS, EOS]])


def test_sdxl_second_tokenizer_pads_with_its_own_token(tmp_path):
  """SDXL's tokenizer_2 pads with "!": the folder's pad token, not end-of-text."""
  tokenizer = load_tokenizer(write_clip_folder(tmp_path / "clip2", pad="!"))
  np.testing.assert_array_equal(tokenizer("cat", max_length=5).input_ids, [[BOS, CAT, EOS, BANG, BANG]])


def test_long_prompt_truncated_with_a_warning(clip_folder, caplog):
  with caplog.at_level(logging.WARNING, logger="dfjax.tokenizers"):
    out = load_tokenizer(clip_folder)(["cat low a cat low a cat low", "a cat"])
  np.testing.assert_array_equal(out.input_ids[0], [BOS, CAT, LOW, A, CAT, LOW, A, EOS])  # end-of-text kept
  np.testing.assert_array_equal(out.attention_mask[0], np.ones(8))
  truncated = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
  assert len(truncated) == 1, truncated
  assert "prompt 0" in truncated[0] and "up to 8 tokens: cat low" in truncated[0]


def test_kind_from_files_and_max_length_needed(tmp_path):
  """No tokenizer_config.json: the vocabulary files say CLIP, and the length must be given."""
  tokenizer = load_tokenizer(write_clip_folder(tmp_path / "bare", max_length=None))
  assert tokenizer.kind == "clip" and tokenizer.model_max_length is None
  with pytest.raises(ValueError, match="sets no model_max_length: pass max_length"):
    tokenizer("a cat")
  np.testing.assert_array_equal(tokenizer("a cat", max_length=5).input_ids, [[BOS, A, CAT, EOS, EOS]])


T5_PIECES = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0), ("▁a", -3.0), ("▁lighthouse", -4.0),
             ("▁at", -4.0), ("▁dusk", -5.0), ("▁light", -5.0), ("house", -5.0)]


def test_t5_from_tokenizer_json(tmp_path):
  transformers.T5Tokenizer(vocab=T5_PIECES, extra_ids=0, model_max_length=6).save_pretrained(tmp_path)
  assert not (tmp_path / "spiece.model").exists()
  tokenizer = load_tokenizer(tmp_path)
  assert (tokenizer.kind, tokenizer.model_max_length) == ("t5", 6)
  out = tokenizer(["a lighthouse at dusk", "a"])
  np.testing.assert_array_equal(out.input_ids, [[4, 5, 6, 7, 1, 0], [4, 1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(out.attention_mask, [[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]])


def test_t5_from_spiece_model_only(tmp_path):
  """As PixArt's tokenizer folder: spiece.model and a config, no tokenizer.json."""
  text = ["a lighthouse at dusk", "a red cat on a mat", "the sea at night under stars"] * 20
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(text), model_prefix=str(tmp_path / "spiece"), vocab_size=40, model_type="unigram",
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
  (tmp_path / "spiece.vocab").unlink()
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 0,
                                                              "model_max_length": 512}))
  tokenizer = load_tokenizer(tmp_path)
  expected = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "spiece.model")).encode("a red cat")
  out = tokenizer("a red cat", max_length=len(expected) + 3)
  np.testing.assert_array_equal(out.input_ids, [[*expected, 1, 0, 0]])  # then </s>, then <pad>
  assert out.input_ids.shape == (1, len(expected) + 3)


def test_bad_folders_are_named(tmp_path, clip_folder):
  with pytest.raises(ValueError, match="not a folder"):
    load_tokenizer(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="cannot tell the tokenizer.*pass kind="):
    load_tokenizer(tmp_path / "empty")
  no_merges = write_clip_folder(tmp_path / "no_merges")
  (no_merges / "merges.txt").unlink()
  with pytest.raises(ValueError, match=r"holds no vocabulary of a CLIPTokenizer: it needs vocab.json and "
                                       r"merges.txt \(or tokenizer.json\), found \['tokenizer_config.json', "
                                       r"'vocab.json'\]"):
    load_tokenizer(no_merges)
  with pytest.raises(ValueError, match="holds no vocabulary of a T5Tokenizer: it needs spiece.model"):
    load_tokenizer(clip_folder, kind="t5")
  with pytest.raises(ValueError, match="kind 'bert' is not supported"):
    load_tokenizer(clip_folder, kind="bert")
  other = write_clip_folder(tmp_path / "other")
  (other / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer"}))
  with pytest.raises(ValueError, match="names tokenizer_class 'BertTokenizer'; dfjax reads CLIPTokenizer"):
    load_tokenizer(other)
  with pytest.raises(ValueError, match="non-empty list of strings"):
    load_tokenizer(clip_folder)([])
  with pytest.raises(ValueError, match="non-empty list of strings"):
    load_tokenizer(clip_folder)(["a", 3])
