"""Analytic volume of what crosses the cuts of a model split into pipeline stages.

Derived from the architecture alone (the config), so that the transfers traced from the model
(sharding/stage_carry.py) and read from the compiled program (sharding/accounting/comm.py) can be
checked against it. Each segment makes activations and reads earlier ones:
  UNet  "embed" makes conv_in's output (the first hidden state, also the first skip); down block l
        one output per resnet at level l (each a skip, the last also the hidden state) and, but for
        the last level, the downsampler's (a skip and the hidden state); the mid block and each up
        block read the hidden state and make the next, an up block also reads its resnets' skips
        (newest first); "out" makes the prediction;
  DiT   "embed" makes the token grid, each block reads and makes it, "out" makes the prediction.
A stage receives each activation it reads that an earlier stage made, once, from the stage that
made it; the conditioning (time embedding, text) is made on every stage and never crosses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from models.config import UNetConfig
from models.dit_config import TransformerConfig


@dataclasses.dataclass(frozen=True)
class SegmentFlow:
  """One segment's activations: those it reads and those it makes, each (name, per-sample shape)."""

  reads: tuple[str, ...]
  makes: tuple[tuple[str, tuple[int, ...]], ...]


def segment_flows(config, height: int, width: int) -> list[SegmentFlow]:
  """Each segment's reads and makes for a `height` × `width` latent, in call order."""
  match config:
    case UNetConfig():
      return _unet_flows(config, height, width)
    case TransformerConfig():
      p, layers = config.patch_size, config.num_layers
      tokens = ("tokens", (height // p, width // p, config.inner_dim))
      return ([SegmentFlow((), (tokens,))] + [SegmentFlow(("tokens",), (tokens,))] * layers
              + [SegmentFlow(("tokens",), (("prediction", (height, width, config.out_channels)),))])
    case _:
      raise ValueError(f"no activation flow for a {type(config).__name__}; valid: UNetConfig, DiTConfig, PixArtConfig")


def _unet_flows(config: UNetConfig, height: int, width: int) -> list[SegmentFlow]:
  size = lambda level: (height // 2**level, width // 2**level)
  levels, channels = config.num_levels, config.block_out_channels
  flows, skips = [SegmentFlow((), (("conv_in", (*size(0), channels[0])),))], ["conv_in"]
  hidden = "conv_in"
  for level in range(levels):
    made = [(f"down{level}.{j}", (*size(level), channels[level])) for j in range(config.layers_per_block[level])]
    if level < levels - 1:
      made.append((f"down{level}.downsample", (*size(level + 1), channels[level])))
    flows.append(SegmentFlow((hidden,), tuple(made)))
    skips += [name for name, _ in made]
    hidden = made[-1][0]
  flows.append(SegmentFlow((hidden,), (("mid", (*size(levels - 1), channels[-1])),)))
  hidden = "mid"
  for index in range(levels):
    n = config.layers_per_block[::-1][index] + 1
    popped, skips = skips[-n:], skips[:-n]
    level = max(levels - 2 - index, 0)  # after its upsampler (the last up block has none)
    made = (f"up{index}", (*size(level), channels[::-1][index]))
    flows.append(SegmentFlow((hidden, *reversed(popped)), (made,)))
    hidden = made[0]
  flows.append(SegmentFlow((hidden,), (("prediction", (height, width, config.out_channels)),)))
  return flows


def transfers(config, height: int, width: int, stage_of_segment: Sequence[int]) -> list[tuple[str, int, int, int]]:
  """(activation, making stage, reading stage, values per sample) of every transfer between stages."""
  made_by, shapes, result = {}, {}, []
  for flow, stage in zip(segment_flows(config, height, width), stage_of_segment):
    for name in flow.reads:
      if made_by[name] != stage and (name, made_by[name], stage) not in {r[:3] for r in result}:
        result.append((name, made_by[name], stage, int(np.prod(shapes[name]))))
    for name, shape in flow.makes:
      made_by[name], shapes[name] = stage, shape
  return result


def prediction_values(config, height: int, width: int) -> int:
  """Values per sample of the model output (the noise prediction, learned variance included)."""
  return height * width * config.out_channels
