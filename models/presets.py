"""diffusers `config.json` contents of well-known models, for benchmarks and tests without a hub.

Full-size presets are the published configs of SD1.5, SD2.1 and SDXL base (UNets), DiT-XL/2 at
256² and 512² and PixArt-α at 512² and 1024² (transformers); `tiny-*` presets keep each family's
structure (block types, projections, micro-conditioning, additional conditions) at a size a CPU
runs in milliseconds. `FAMILIES` groups them by model family, each with its default preset.
"""

import copy

from models.dit_config import DiTConfig, PixArtConfig

_SD15 = {
    "in_channels": 4, "out_channels": 4, "sample_size": 64, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "attention_head_dim": 8, "cross_attention_dim": 768, "norm_num_groups": 32, "norm_eps": 1e-5,
    "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu", "use_linear_projection": False,
}
_SD21 = {
    **_SD15, "sample_size": 96, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
    "use_linear_projection": True, "upcast_attention": True,
}
_SDXL = {
    **_SD15, "sample_size": 128, "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": [5, 10, 20], "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
_TINY = {"block_out_channels": [32, 64], "norm_num_groups": 8, "cross_attention_dim": 32, "layers_per_block": 1}

PRESETS = {
    "sd15": _SD15,
    "sd21": _SD21,
    "sdxl": _SDXL,
    "tiny-sd15": {**_SD15, **_TINY, "attention_head_dim": 4,
                  "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]},
    "tiny-sdxl": {**_SDXL, **_TINY, "block_out_channels": [32, 64, 64], "attention_head_dim": [2, 4, 4],
                  "transformer_layers_per_block": [1, 1, 2], "addition_time_embed_dim": 8,
                  "projection_class_embeddings_input_dim": 32 + 6 * 8},
}


# The transformer configs of facebook/DiT-XL-2-256 / -512 and PixArt-alpha/PixArt-XL-2-512x512 /
# -1024-MS (their transformer/config.json, inert keys left out).
_DIT_XL_2 = {
    "_class_name": "DiTTransformer2DModel", "num_attention_heads": 16, "attention_head_dim": 72,
    "in_channels": 4, "out_channels": 8, "num_layers": 28, "sample_size": 32, "patch_size": 2,
    "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000, "norm_type": "ada_norm_zero",
    "norm_elementwise_affine": False, "norm_eps": 1e-5,
}
_PIXART_ALPHA = {
    "_class_name": "PixArtTransformer2DModel", "num_attention_heads": 16, "attention_head_dim": 72,
    "in_channels": 4, "out_channels": 8, "num_layers": 28, "sample_size": 128, "patch_size": 2,
    "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000, "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False, "norm_eps": 1e-6, "caption_channels": 4096, "cross_attention_dim": 1152,
}
_TINY_TRANSFORMER = {"num_attention_heads": 8, "attention_head_dim": 6, "num_layers": 2}  # 8 heads: Ulysses over 8

TRANSFORMER_PRESETS = {
    "dit-xl-2-256": _DIT_XL_2,
    "dit-xl-2-512": {**_DIT_XL_2, "sample_size": 64},
    "pixart-alpha-512": {**_PIXART_ALPHA, "sample_size": 64},
    "pixart-alpha-1024": _PIXART_ALPHA,
    "tiny-dit": {**_DIT_XL_2, **_TINY_TRANSFORMER, "sample_size": 8},
    "tiny-pixart": {**_PIXART_ALPHA, **_TINY_TRANSFORMER, "sample_size": 16, "caption_channels": 32,
                    "cross_attention_dim": 48, "use_additional_conditions": True},
}
_TRANSFORMER_CONFIGS = {"DiTTransformer2DModel": DiTConfig, "PixArtTransformer2DModel": PixArtConfig}

FAMILIES = {  # model family: (its presets, the default preset)
    "unet": (PRESETS, "tiny-sdxl"),
    "dit": ({k: v for k, v in TRANSFORMER_PRESETS.items() if "dit" in k}, "tiny-dit"),
    "pixart": ({k: v for k, v in TRANSFORMER_PRESETS.items() if "pixart" in k}, "tiny-pixart"),
}


def transformer_config(name: str) -> DiTConfig | PixArtConfig:
  """The DiTConfig or PixArtConfig of a transformer preset."""
  if name not in TRANSFORMER_PRESETS:
    raise ValueError(f"unknown transformer preset {name!r}; valid presets: {', '.join(TRANSFORMER_PRESETS)}.")
  preset = TRANSFORMER_PRESETS[name]
  return _TRANSFORMER_CONFIGS[preset["_class_name"]].from_diffusers_config(preset)


def unet_preset(name: str) -> dict:
  """A copy of the named preset's diffusers config dict."""
  if name not in PRESETS:
    raise ValueError(f"unknown UNet preset {name!r}; valid presets: {', '.join(PRESETS)}, "
                     "or a path to a diffusers config.json.")
  return copy.deepcopy(PRESETS[name])
