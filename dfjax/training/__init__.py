"""Training the class-conditional models dfjax ships (a UNet and a DiT): `dfjax train`.

  train(TrainConfig(out=..., model="default" | "dit"), resume=False) -> Path   the exported model folder
  load_trained(folder) -> TrainedModel(denoiser, class_tokens, scheduler_config)
  load_default_model("unet" | "dit") -> the same, from the weights inside the package
"""

from dfjax.training.default_model import EMBEDDED_MODELS, load_default_model
from dfjax.training.export import TrainedModel, load_trained
from dfjax.training.loop import TrainConfig, train

__all__ = ["EMBEDDED_MODELS", "TrainConfig", "TrainedModel", "load_default_model", "load_trained", "train"]
