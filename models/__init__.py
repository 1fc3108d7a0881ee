"""Flax NNX model code, NHWC, with no mesh knowledge: layers ask a parallel context for other rows."""

from models.config import UNetConfig
from models.dit import DiTTransformer2DModel, PixArtTransformer2DModel
from models.dit_config import DiTConfig, PixArtConfig
from models.unet import UNet2DConditionModel

__all__ = ["UNetConfig", "UNet2DConditionModel", "DiTConfig", "PixArtConfig", "DiTTransformer2DModel",
           "PixArtTransformer2DModel"]
