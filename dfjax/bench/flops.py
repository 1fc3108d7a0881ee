"""Analytic FLOPs of one UNet forward, from the config alone.

Counts the matrix work, 2 FLOPs per multiply-add: every convolution, every linear layer
(projections, feed-forwards, time and SDXL embeddings) and the two attention matmuls (Q·Kᵀ and
P·V) of self- and cross-attention. Elementwise work (GroupNorm, SiLU, GELU, softmax, residual
adds) is left out: it is a few per cent of XLA's count on narrow test UNets and about 1 % on
Stable Diffusion's. Sizes are latent sizes: a 1024² SDXL image is a 128 × 128 latent.

Convolutions count every kernel tap, zero padding included, as the published figures do
(`padded=True`); XLA's cost analysis counts only the taps inside the image (`padded=False`),
3–4 % fewer at SDXL's lowest resolution.

Shape letters: H, W latent rows and columns at a level, C channels, T image tokens, S text tokens.
"""

from collections import Counter

from models.config import UNetConfig

TEXT_TOKENS = 77  # CLIP's context length: what the Stable Diffusion pipelines pass


def _taps(size: int, kernel: int, stride: int, padded: bool) -> int:
  """Kernel taps along one axis summed over the outputs of a conv with `kernel // 2` padding."""
  outputs, pad = size // stride, kernel // 2
  if padded:
    return outputs * kernel
  return sum(min(i * stride - pad + kernel, size) - max(i * stride - pad, 0) for i in range(outputs))


def flops_by_kind(config: UNetConfig, height: int, width: int, batch: int = 1,
                  text_tokens: int = TEXT_TOKENS, padded: bool = True) -> dict[str, int]:
  """FLOPs of one forward of `batch` latents of height × width, by kind: conv, linear, attention."""
  config.check_latent_size(height, width)
  flops: Counter[str] = Counter()

  def conv(level: int, c_in: int, c_out: int, kernel: int = 3, stride: int = 1):
    """A conv whose input is at `level`."""
    rows, cols = height >> level, width >> level
    taps = _taps(rows, kernel, stride, padded) * _taps(cols, kernel, stride, padded)
    flops["conv"] += 2 * taps * c_in * c_out

  def linear(rows: int, c_in: int, c_out: int):
    flops["linear"] += 2 * rows * c_in * c_out

  def resnet(level: int, c_in: int, c_out: int):
    conv(level, c_in, c_out)
    conv(level, c_out, c_out)
    if c_in != c_out:
      conv(level, c_in, c_out, kernel=1)  # conv_shortcut
    linear(1, config.blocks_time_embed_dim, c_out)  # time_emb_proj

  def transformer(level: int, c: int, depth: int):
    tokens = (height >> level) * (width >> level)
    context = config.cross_attention_dim[level]
    linear(tokens, c, c)  # proj_in (a 1×1 conv in SD1.x: the same count)
    linear(tokens, c, c)  # proj_out
    for _ in range(depth):
      linear(tokens, c, 4 * c)  # attn1 to_q, to_k, to_v, to_out
      linear(tokens, c, 2 * c)  # attn2 to_q, to_out
      linear(text_tokens, context, 2 * c)  # attn2 to_k, to_v on the text
      linear(tokens, c, 8 * c)  # GEGLU proj_in (value and gate)
      linear(tokens, 4 * c, c)  # GEGLU proj_out
      flops["attention"] += 2 * 2 * tokens * (tokens + text_tokens) * c  # Q·Kᵀ and P·V, both attentions

  channels = config.block_out_channels
  c0, temb = channels[0], config.time_embed_dim
  conv(0, config.in_channels, c0, config.conv_in_kernel)
  linear(1, c0, temb), linear(1, temb, temb)  # time_embedding
  if config.class_embedding_kind in ("timestep", "projection"):
    linear(1, c0 if config.class_embedding_kind == "timestep" else config.projection_class_embeddings_input_dim, temb)
    linear(1, temb, temb)
  if config.addition_embed_type == "text_time":
    linear(1, config.projection_class_embeddings_input_dim, temb), linear(1, temb, temb)

  for level, block in enumerate(config.down_block_types):
    c_in = channels[max(level - 1, 0)]
    for j, depth in enumerate(config.down_transformer_layers(level)):
      resnet(level, c_in if j == 0 else channels[level], channels[level])
      if block == "CrossAttnDownBlock2D":
        transformer(level, channels[level], depth)
    if level < config.num_levels - 1:
      conv(level, channels[level], channels[level], stride=2)  # downsample

  last = config.num_levels - 1
  resnet(last, channels[-1], channels[-1])
  transformer(last, channels[-1], config.mid_transformer_layers)
  resnet(last, channels[-1], channels[-1])

  reversed_channels, prev = channels[::-1], channels[-1]
  for index, block in enumerate(config.up_block_types):
    level, out = last - index, reversed_channels[index]
    skip_in = reversed_channels[min(index + 1, last)]
    depths = config.up_transformer_layers(index)
    for j, depth in enumerate(depths):
      skip = skip_in if j == len(depths) - 1 else out
      resnet(level, (prev if j == 0 else out) + skip, out)
      if block == "CrossAttnUpBlock2D":
        transformer(level, out, depth)
    if index < last:
      conv(level - 1, out, out)  # the conv after nearest ×2 upsampling
    prev = out

  conv(0, c0, config.out_channels, config.conv_out_kernel)
  return {kind: batch * count for kind, count in flops.items()}


def analytic_unet_flops(config: UNetConfig, height: int, width: int, batch: int = 1,
                        text_tokens: int = TEXT_TOKENS, padded: bool = True) -> int:
  """FLOPs of one UNet forward on `batch` latents of `height` × `width` (latent pixels).

  For SDXL at 1024² (a 128² latent) this is 6.76 TFLOPs per image, the figure DistriFusion and
  DiffusionPipe quote. `padded=False` counts only the conv taps inside the image, as XLA does.
  """
  return sum(flops_by_kind(config, height, width, batch, text_tokens, padded).values())
