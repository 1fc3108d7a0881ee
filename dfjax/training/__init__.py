"""Training the class-conditional model dfjax ships: `dfjax train`.

  train(TrainConfig(out=...), resume=False) -> Path          the exported model folder
  load_trained(folder) -> TrainedModel(unet, class_tokens, scheduler_config)
  load_default_model() -> the same, from the weights inside the package
"""

from dfjax.training.default_model import load_default_model
from dfjax.training.export import TrainedModel, load_trained
from dfjax.training.loop import TrainConfig, train

__all__ = ["TrainConfig", "TrainedModel", "load_default_model", "load_trained", "train"]
