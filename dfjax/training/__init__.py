"""Training the class-conditional models dfjax ships (a UNet and a DiT): `dfjax train`.

  train(TrainConfig(out=..., model="default" | "dit"), resume=False) -> Path   the exported model folder
  load_trained(folder) -> TrainedModel(denoiser, class_tokens, scheduler_config)
  load_default_model("unet" | "dit") -> the same, from the weights inside the package
  load_latent_encoder(folder) -> LatentEncoder | None   the frozen encoder a `--frozen-encoder` run trained behind
"""

from dfjax.training.default_model import EMBEDDED_MODELS, load_default_model
from dfjax.training.export import LatentEncoder, TrainedModel, load_latent_encoder, load_trained
from dfjax.training.loop import TrainConfig, train

__all__ = ["EMBEDDED_MODELS", "LatentEncoder", "TrainConfig", "TrainedModel", "load_default_model", "load_latent_encoder",
           "load_trained", "train"]
