"""What pipelined training needs to know of a model family: the UNet's or the DiT's.

Both `dfjax train` families (dfjax/training/model.py) are a trainable denoiser with named
segments ("embed", the blocks, "out") folded over an explicit carry, so the pipeline cuts either
at its segments. They differ in what conditions the denoiser, which their specs answer
(`ModelSpec.condition_shape`, `condition_inputs`, `class_token_shape`):

  UNet  the class-token table (or, with `--frozen-text`, the class captions' frozen text encoder)
        turns the (dropped) labels into the cross-attention context; it is a frozen part, whose
        forward DiffusionPipe places in the bubbles (dfjax/training/pipeline_frozen.py);
  DiT   embeds the labels itself, inside its trainable "embed" segment: the condition is the labels.

`Backbone.of(model, frozen_text)` gives the one object the planner, the calibration and the executor ask.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from dfjax.training.model import VARIANTS, ModelSpec, run_spec
from models.config import UNetConfig
from models.dit_config import DiTConfig
from models.layers import Workload


@dataclasses.dataclass(frozen=True)
class Backbone:
  """A `dfjax train` variant seen by the pipeline.

  Attributes:
    model: the variant's name in `VARIANTS`.
    frozen_text: the UNet's frozen text encoder of the class captions ("none": its class tokens).
  """

  model: str
  frozen_text: str = "none"

  @classmethod
  def of(cls, model: str, frozen_text: str = "none") -> Backbone:
    if model not in VARIANTS:
      raise ValueError(f"the pipelined step trains a `dfjax train` variant; --model {model} is none: "
                       f"pick one of {', '.join(VARIANTS)}")
    run_spec(model, frozen_text)  # raises on frozen text for a DiT
    return cls(model, frozen_text)

  @property
  def spec(self) -> ModelSpec:
    return run_spec(self.model, self.frozen_text)

  @property
  def kind(self) -> str:
    return self.spec.family

  @property
  def config(self) -> UNetConfig | DiTConfig:
    return self.spec.model_config

  def workload(self, image_shape) -> Workload:
    """The analytic cost model's input: the image and the context tokens."""
    return Workload(rows=image_shape[0], cols=image_shape[1], text_tokens=self.spec.context_tokens)

  def build(self, *, rngs: nnx.Rngs) -> nnx.Module:
    """The joint model `dfjax train` trains (its `denoiser`, and `class_tokens` or None)."""
    return self.spec.build(rngs=rngs)

  def abstract(self) -> nnx.Module:
    return nnx.eval_shape(lambda: self.build(rngs=nnx.Rngs(0)))

  def condition_shape(self, batch: int) -> jax.ShapeDtypeStruct:
    """What conditions `batch` samples: class tokens (b, T, D) or labels (b,)."""
    return self.spec.condition_shape(batch)

  def condition_inputs(self, condition) -> dict[str, Any]:
    """The denoiser's keyword arguments carrying the condition (to `first_carry`)."""
    return self.spec.condition_inputs(condition)

  def first_carry(self, denoiser: nnx.Module, x_bhwc, t_b, condition):
    return denoiser.first_carry(x_bhwc, t_b, **self.condition_inputs(condition))
