"""Analytic FLOPs of one UNet forward, read off the model's own layout (models/build.segment_costs).

Counts the matrix work, 2 FLOPs per multiply-add: every convolution (1×1 ones included, e.g.
SD1.x's transformer projections), every linear layer (projections, feed-forwards, time and SDXL
embeddings) and the two attention matmuls (Q·Kᵀ and P·V) of self- and cross-attention.
Elementwise work (GroupNorm, SiLU, GELU, softmax, residual adds) is left out: it is a few per cent
of XLA's count on narrow test UNets and about 1 % on Stable Diffusion's. Sizes are latent sizes: a
1024² SDXL image is a 128 × 128 latent.

Convolutions count every kernel tap, zero padding included, as the published figures do
(`padded=True`); XLA's cost analysis counts only the taps inside the image (`padded=False`),
3–4 % fewer at SDXL's lowest resolution.
"""

from models.config import UNetConfig
from models.layers import Cost, Workload, total
from models.build import segment_costs

TEXT_TOKENS = 77  # CLIP's context length: what the Stable Diffusion pipelines pass


def _costs(config: UNetConfig, height: int, width: int, text_tokens: int, padded: bool) -> dict[str, Cost]:
  config.check_latent_size(height, width)
  return segment_costs(config, Workload(height, width, text_tokens, padded))


def segment_flops(config: UNetConfig, height: int, width: int, batch: int = 1,
                  text_tokens: int = TEXT_TOKENS, padded: bool = True) -> dict[str, int]:
  """{segment name: FLOPs} of one forward of `batch` latents of height × width, in call order."""
  costs = _costs(config, height, width, text_tokens, padded)
  return {name: batch * sum(cost.flops.values()) for name, cost in costs.items()}


def flops_by_kind(config: UNetConfig, height: int, width: int, batch: int = 1,
                  text_tokens: int = TEXT_TOKENS, padded: bool = True) -> dict[str, int]:
  """FLOPs of one forward of `batch` latents of height × width, by kind: conv, linear, attention."""
  costs = _costs(config, height, width, text_tokens, padded)
  return {kind: batch * count for kind, count in total(costs.values()).flops.items()}


def analytic_unet_flops(config: UNetConfig, height: int, width: int, batch: int = 1,
                        text_tokens: int = TEXT_TOKENS, padded: bool = True) -> int:
  """FLOPs of one UNet forward on `batch` latents of `height` × `width` (latent pixels).

  For SDXL at 1024² (a 128² latent) this is 6.76 TFLOPs per image, the figure DistriFusion and
  DiffusionPipe quote. `padded=False` counts only the conv taps inside the image, as XLA does.
  """
  return sum(flops_by_kind(config, height, width, batch, text_tokens, padded).values())
