"""diffusers `config.json` contents of well-known UNets, for benchmarks and tests without a hub.

Full-size presets are the published configs of SD1.5, SD2.1 and SDXL base; `tiny-*` presets
keep each family's structure (block types, projections, micro-conditioning) at a size a CPU
runs in milliseconds.
"""

import copy

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


def unet_preset(name: str) -> dict:
  """A copy of the named preset's diffusers config dict."""
  if name not in PRESETS:
    raise ValueError(f"unknown UNet preset {name!r}; valid presets: {', '.join(PRESETS)}, "
                     "or a path to a diffusers config.json.")
  return copy.deepcopy(PRESETS[name])
