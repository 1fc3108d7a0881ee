"""Tiny random diffusers pipelines, shaped like SD1.5, SD2.1, SDXL and PixArt, for tests and the notebook.

`tiny_pipeline(kind)` builds the diffusers pipeline object (torch, fp32, every weight perturbed so no
zero-initialised layer hides a mistake), with hand-written tokenizer vocabularies; `save_pretrained`
gives the folder `dfjax convert` reads, as a real pipeline's. Needs torch, diffusers and transformers
(the test extras), imported when called: dfjax itself does not depend on them.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

WORDS = ("a", "lighthouse", "at", "dusk", "red", "cat", "on", "mat", "the", "sea", "night", "under", "stars")
CLIP_TOKENS = 16  # tokenizer model_max_length = text encoder positions
KINDS = ("sd15", "sd21", "sdxl", "pixart", "pixart-alpha")


def _clip_tokenizer(folder: Path, pad: str):
  """A CLIP BPE tokenizer over single letters and WORDS; end-of-text is the largest id (argmax pooling)."""
  import transformers
  letters = "abcdefghijklmnopqrstuvwxyz"
  vocab = [*letters, *(f"{c}</w>" for c in letters), *(f"{w}</w>" for w in WORDS if len(w) > 1), "!",
           "<|startoftext|>", "<|endoftext|>"]
  merges = []
  for word in (w for w in WORDS if len(w) > 1):  # merge left to right: "l i" → "li", "li g" → "lig"…
    for i in range(1, len(word)):
      left, right = word[:i], word[i] + ("</w>" if i == len(word) - 1 else "")
      merges.append(f"{left} {right}")
      merged = left + right
      if merged not in vocab:
        vocab.insert(len(vocab) - 3, merged)
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
  (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
  (folder / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "CLIPTokenizer", "model_max_length": CLIP_TOKENS, "pad_token": pad,
      "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))
  return transformers.CLIPTokenizer.from_pretrained(folder, local_files_only=True), len(vocab)


def _t5_tokenizer():
  import transformers
  pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0),
            *((f"▁{w}", -3.0 - 0.1 * i) for i, w in enumerate(WORDS))]
  return transformers.T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512), len(pieces)


def _perturbed(module, seed: int):
  import torch
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return module.eval()


def _clip_encoder(vocab_size: int, width: int, *, projection: bool, hidden_act: str, seed: int):
  import transformers
  eos = vocab_size - 1
  config = transformers.CLIPTextConfig(
      vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, projection_dim=width,
      num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=CLIP_TOKENS, hidden_act=hidden_act,
      bos_token_id=vocab_size - 2, eos_token_id=2 if projection else eos, pad_token_id=eos)
  model_class = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
  return _perturbed(model_class(config), seed)


def _vae(seed: int, scaling_factor: float):
  import diffusers
  return _perturbed(diffusers.AutoencoderKL(
      block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4, latent_channels=4,
      sample_size=16, scaling_factor=scaling_factor), seed)


_SD_UNET = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=8,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def tiny_pipeline(kind: str, *, seed: int = 0):
  """The diffusers pipeline object of `kind` ("sd15", "sd21", "sdxl", "pixart", "pixart-alpha"), tiny and random.

  Latents are 8×8 (sample_size), the VAE ×2, so images are 16×16; CLIP takes 16 tokens. "pixart" is
  Σ-shaped (no size conditions); "pixart-alpha" has PixArt-α's resolution and aspect-ratio conditions,
  which diffusers' pipeline computes only for sample_size 128 (the 1024² models): its default image is
  256×256, so pass the size.
  """
  import diffusers
  import transformers
  if kind not in KINDS:
    raise ValueError(f"unknown tiny pipeline {kind!r}; kinds: {', '.join(KINDS)}")
  scratch = Path(tempfile.mkdtemp(prefix="dfjax-tiny-tokenizer-"))
  scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                      clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                      prediction_type="v_prediction" if kind == "sd21" else "epsilon")
  if kind in ("sd15", "sd21"):
    tokenizer, vocab = _clip_tokenizer(scratch / "tokenizer", pad="<|endoftext|>")
    sd21 = kind == "sd21"
    unet = diffusers.UNet2DConditionModel(**_SD_UNET, cross_attention_dim=24,
                                          attention_head_dim=(1, 2) if sd21 else 2, use_linear_projection=sd21,
                                          upcast_attention=sd21)
    return diffusers.StableDiffusionPipeline(
        vae=_vae(seed + 1, 0.18215), text_encoder=_clip_encoder(vocab, 24, projection=False,
                                                                 hidden_act="gelu" if sd21 else "quick_gelu",
                                                                 seed=seed + 2),
        tokenizer=tokenizer, unet=_perturbed(unet, seed), scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
  if kind == "sdxl":
    tokenizer, vocab = _clip_tokenizer(scratch / "tokenizer", pad="<|endoftext|>")
    tokenizer_2, _ = _clip_tokenizer(scratch / "tokenizer_2", pad="!")
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
        cross_attention_dim=32, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8)
    return diffusers.StableDiffusionXLPipeline(
        vae=_vae(seed + 1, 0.13025), text_encoder=_clip_encoder(vocab, 16, projection=False, hidden_act="quick_gelu",
                                                                 seed=seed + 2),
        text_encoder_2=_clip_encoder(vocab, 16, projection=True, hidden_act="gelu", seed=seed + 3),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=_perturbed(unet, seed), scheduler=scheduler,
        force_zeros_for_empty_prompt=True)
  tokenizer, vocab = _t5_tokenizer()
  text_encoder = _perturbed(transformers.T5EncoderModel(transformers.T5Config(
      vocab_size=vocab, d_model=20, d_kv=8, d_ff=24, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
      relative_attention_max_distance=12, feed_forward_proj="gated-gelu")), seed + 2)
  alpha = kind == "pixart-alpha"
  transformer = diffusers.PixArtTransformer2DModel(
      num_attention_heads=2, attention_head_dim=12 if alpha else 8, in_channels=4, out_channels=8, num_layers=2,
      sample_size=128 if alpha else 8, patch_size=2, cross_attention_dim=24 if alpha else 16, caption_channels=20,
      use_additional_conditions=alpha, norm_elementwise_affine=True)
  return diffusers.PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=_vae(seed + 1, 0.18215),
                                       transformer=_perturbed(transformer, seed), scheduler=scheduler)


def save_tiny_pipeline(kind: str, folder: str | Path, *, seed: int = 0):
  """`tiny_pipeline(kind)` saved with `save_pretrained` into `folder` (safetensors); returns the pipeline."""
  pipe = tiny_pipeline(kind, seed=seed)
  pipe.save_pretrained(folder, safe_serialization=True)
  return pipe
