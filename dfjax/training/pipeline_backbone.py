"""What pipelined training needs to know of a model family: the UNet's or the DiT's.

Both `dfjax train` families (dfjax/training/model.py) are a trainable denoiser with named
segments ("embed", the blocks, "out") folded over an explicit carry, so the pipeline cuts either
at its segments. They differ in what conditions the denoiser and what is frozen:

  UNet  the class-token table turns the (dropped) labels into the cross-attention context; it is
        the frozen part, whose forward DiffusionPipe places in the bubbles;
  DiT   embeds the labels itself, inside its trainable "embed" segment: the condition is the labels
        and the model has no frozen part.

`Backbone.of(model)` gives the one object the planner, the calibration and the executor ask.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dfjax.training.model import VARIANTS, DiTSpec, ModelSpec, UNetSpec
from models.config import UNetConfig
from models.dit_config import DiTConfig
from models.layers import Workload


@dataclasses.dataclass(frozen=True)
class Backbone:
  """A `dfjax train` variant seen by the pipeline.

  Attributes:
    model: the variant's name in `VARIANTS`.
  """

  model: str

  @classmethod
  def of(cls, model: str) -> Backbone:
    spec = VARIANTS.get(model)
    if not isinstance(spec, (UNetSpec, DiTSpec)):
      raise ValueError(f"the pipelined step cuts a UNet or a DiT at its segments; --model {model} is neither: "
                       f"pick one of {', '.join(VARIANTS)}")
    return cls(model)

  @property
  def spec(self) -> ModelSpec:
    return VARIANTS[self.model]

  @property
  def kind(self) -> str:
    return "UNet" if isinstance(self.spec, UNetSpec) else "DiT"

  @property
  def config(self) -> UNetConfig | DiTConfig:
    if isinstance(self.spec, UNetSpec):
      return UNetConfig.from_diffusers_config(self.spec.unet_config)
    return DiTConfig.from_diffusers_config(self.spec.dit_config)

  @property
  def has_frozen(self) -> bool:
    """Whether the model has a frozen part (the UNet's class tokens) for the bubbles."""
    return isinstance(self.spec, UNetSpec)

  def workload(self, image_shape) -> Workload:
    """The analytic cost model's input: the image and the context tokens (none for the DiT)."""
    tokens = self.spec.num_tokens if isinstance(self.spec, UNetSpec) else 1
    return Workload(rows=image_shape[0], cols=image_shape[1], text_tokens=tokens)

  def build(self, *, rngs: nnx.Rngs) -> nnx.Module:
    """The joint model `dfjax train` trains (its `denoiser`, and `class_tokens` or None)."""
    return self.spec.build(rngs=rngs)

  def abstract(self) -> nnx.Module:
    return nnx.eval_shape(lambda: self.build(rngs=nnx.Rngs(0)))

  def condition_shape(self, batch: int) -> jax.ShapeDtypeStruct:
    """What conditions `batch` samples: class tokens (b, T, D) or labels (b,)."""
    if isinstance(self.spec, UNetSpec):
      return jax.ShapeDtypeStruct((batch, self.spec.num_tokens, self.spec.token_dim), jnp.float32)
    return jax.ShapeDtypeStruct((batch,), jnp.int32)

  def condition(self, frozen_graphdef, frozen_state, dropped_b: jax.Array) -> jax.Array:
    """The condition of labels `dropped_b` (already dropped to the null class): the frozen part's
    forward, the class tokens (b, T, D), for the UNet; the labels themselves for the DiT."""
    if not self.has_frozen:
      return dropped_b
    return nnx.merge(frozen_graphdef, frozen_state)(dropped_b)

  def condition_inputs(self, condition) -> dict[str, Any]:
    """The denoiser's keyword arguments carrying the condition (to `first_carry`)."""
    if isinstance(self.spec, UNetSpec):
      return {"encoder_hidden_states": condition}
    return {"class_labels": condition}

  def first_carry(self, denoiser: nnx.Module, x_bhwc, t_b, condition):
    return denoiser.first_carry(x_bhwc, t_b, **self.condition_inputs(condition))
