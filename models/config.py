"""`UNetConfig`: the UNet2DConditionModel hyper-parameters dfjax supports, from diffusers' config.json.

A frozen dataclass: per-block options are stored as per-block tuples (ints in a diffusers config are
broadcast), `__post_init__` checks the invariants with messages that show the values, and the few
derived numbers the model and the parallel strategies need (resolution levels, downsample factor,
per-layer transformer depths, time-embedding widths) are methods here rather than recomputed by
each caller.

diffusers quirk kept on purpose: in `UNet2DConditionModel` the config value named
`attention_head_dim` is really the number of heads whenever `num_attention_heads` is absent (the
head width is `block_out_channels[i] // heads`). `from_diffusers_config` resolves this once; the
dataclass only has `num_attention_heads`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

DOWN_BLOCK_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
CLASS_EMBED_TYPES = (None, "timestep", "projection")
ADDITION_EMBED_TYPES = (None, "text_time")

# diffusers keys whose value must be one of these: the features dfjax implements.
_ONLY_SUPPORTED: Mapping[str, tuple[Any, ...]] = {
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "act_fn": ("silu", "swish"),
    "resnet_time_scale_shift": ("default",),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "dual_cross_attention": (False,),
    "attention_type": ("default",),
    "downsample_padding": (1,),
}
# diffusers keys with no effect on the block types above (dropout: inference only; the others
# are read only by Simple*/ResnetDownsample*/"text" blocks and embeddings dfjax rejects).
_INERT = frozenset({
    "dropout", "resnet_skip_time_act", "resnet_out_scale_factor", "cross_attention_norm",
    "mid_block_only_cross_attention", "addition_embed_type_num_heads",
})
_HEAD_KEYS = frozenset({"attention_head_dim", "num_attention_heads", "only_cross_attention"})

PerLayer = int | tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Hyper-parameters of a diffusers `UNet2DConditionModel` (SD1.x, SD2.x, SDXL families).

  Field names are diffusers' config keys. Per-block fields accept an int (same for every block)
  and are stored as one entry per down block, in down order. `transformer_layers_per_block`
  entries may themselves be per-layer tuples (asymmetric UNets such as SSD-1B); those need
  `reverse_transformer_layers_per_block` for the up blocks, as in diffusers.
  """

  in_channels: int = 4
  out_channels: int = 4
  sample_size: int | tuple[int, int] | None = None
  down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: tuple[int, ...] = 2
  num_attention_heads: tuple[int, ...] = 8
  cross_attention_dim: tuple[int, ...] = 1280
  transformer_layers_per_block: tuple[PerLayer, ...] = 1
  reverse_transformer_layers_per_block: tuple[PerLayer, ...] | None = None
  use_linear_projection: bool = False
  upcast_attention: bool = False
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  mid_block_scale_factor: float = 1.0
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: float = 0
  time_embedding_dim: int | None = None
  class_embed_type: str | None = None
  num_class_embeds: int | None = None
  projection_class_embeddings_input_dim: int | None = None
  class_embeddings_concat: bool = False
  addition_embed_type: str | None = None
  addition_time_embed_dim: int | None = None
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3

  # ------------------------------------------------------------------------------ construction

  @classmethod
  def from_diffusers_config(cls, d: Mapping[str, Any]) -> UNetConfig:
    """Builds the config from the contents of a diffusers UNet `config.json`.

    Keys starting with `_` (`_class_name`, `_diffusers_version`, …) are ignored, and so are keys
    with no effect on the supported blocks (e.g. `dropout`).

    Raises:
      ValueError: a key dfjax does not know, or a value of a feature it does not implement
        (naming the key, the value and the supported values).
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    check_config_keys(d, "UNet", fields | _INERT | _HEAD_KEYS, _ONLY_SUPPORTED)
    only_cross = d.get("only_cross_attention", False)
    if only_cross is True or (isinstance(only_cross, Sequence) and any(only_cross)):
      raise ValueError(_unsupported("only_cross_attention", only_cross, (False,)))
    kwargs = {k: _tuples(v) for k, v in d.items() if k in fields}
    # The quirk: "attention_head_dim" is the head count when "num_attention_heads" is unset.
    heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
    kwargs["num_attention_heads"] = _tuples(heads)
    return cls(**kwargs)

  def __post_init__(self):
    n = len(self.down_block_types)
    per_block = ("layers_per_block", "num_attention_heads", "cross_attention_dim",
                 "transformer_layers_per_block")
    for name in ("down_block_types", "up_block_types", "block_out_channels", *per_block):
      value = getattr(self, name)
      if isinstance(value, int) and name in per_block:
        value = (value,) * n
      elif isinstance(value, (list, tuple)):
        value = _tuples(value)
      else:
        raise ValueError(f"{name} must be an int or a per-block sequence, got {value!r}")
      object.__setattr__(self, name, value)
      if len(value) != n:
        raise ValueError(f"{name} has {len(value)} entries but down_block_types has {n} blocks "
                         f"({self.down_block_types}): give one per block. {name}={value}")
    if self.reverse_transformer_layers_per_block is not None:
      object.__setattr__(self, "reverse_transformer_layers_per_block",
                         _tuples(self.reverse_transformer_layers_per_block))
    if isinstance(self.sample_size, list):
      object.__setattr__(self, "sample_size", tuple(self.sample_size))
    self._check_choices()
    self._check_sizes()
    self._check_transformer_layers()
    self._check_embeddings()

  def _check_choices(self):
    for name, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
      for i, kind in enumerate(getattr(self, name)):
        if kind not in allowed:
          raise ValueError(_unsupported(f"{name}[{i}]", kind, allowed))
    if self.class_embed_type not in CLASS_EMBED_TYPES:
      raise ValueError(_unsupported("class_embed_type", self.class_embed_type, CLASS_EMBED_TYPES))
    if self.addition_embed_type not in ADDITION_EMBED_TYPES:
      raise ValueError(_unsupported("addition_embed_type", self.addition_embed_type,
                                    ADDITION_EMBED_TYPES))

  def _check_sizes(self):
    for name in ("conv_in_kernel", "conv_out_kernel"):
      k = getattr(self, name)
      if k < 1 or k % 2 == 0:
        raise ValueError(f"{name}={k}: only odd kernel sizes keep the latent size (1, 3, 5, …)")
    groups = self.norm_num_groups
    if not isinstance(groups, int) or groups < 1:
      raise ValueError(f"norm_num_groups={groups!r}: dfjax needs GroupNorm (a positive int)")
    bad = [c for c in self.block_out_channels if c % groups]
    if bad:
      raise ValueError(f"block_out_channels {self.block_out_channels}: {bad} not divisible by "
                       f"norm_num_groups={groups}")
    for level in sorted({*self.attention_levels, self.num_levels - 1}):  # + the mid block
      heads, width = self.num_attention_heads[level], self.block_out_channels[level]
      if not 1 <= heads <= width:
        raise ValueError(f"num_attention_heads[{level}]={heads} (diffusers' attention_head_dim "
                         f"when num_attention_heads is unset) must be between 1 and "
                         f"block_out_channels[{level}]={width}")
    dims = {self.cross_attention_dim[level] for level in (*self.attention_levels, self.num_levels - 1)}
    if len(dims) > 1:
      raise ValueError(f"cross_attention_dim {self.cross_attention_dim}: the blocks with "
                       f"cross-attention disagree ({sorted(dims)}), but they all attend to the "
                       "same encoder_hidden_states")

  def _check_transformer_layers(self):
    nested = any(isinstance(t, tuple) for t in self.transformer_layers_per_block)
    if nested and self.reverse_transformer_layers_per_block is None:
      raise ValueError(f"transformer_layers_per_block {self.transformer_layers_per_block} gives "
                       "per-layer depths (an asymmetric UNet): set "
                       "reverse_transformer_layers_per_block for the up blocks too")
    for level in range(self.num_levels):
      self.down_transformer_layers(level)
      self.up_transformer_layers(level)
    if any(d < 1 for level in range(self.num_levels)
           for d in self.down_transformer_layers(level) + self.up_transformer_layers(level)):
      raise ValueError("transformer layer counts must be ≥ 1: transformer_layers_per_block="
                       f"{self.transformer_layers_per_block}, reverse_transformer_layers_per_block="
                       f"{self.reverse_transformer_layers_per_block}")

  def _check_embeddings(self):
    kind = self.class_embedding_kind
    if kind == "projection" and self.projection_class_embeddings_input_dim is None:
      raise ValueError("class_embed_type='projection' needs projection_class_embeddings_input_dim")
    if self.class_embeddings_concat and kind is None:
      raise ValueError("class_embeddings_concat=True needs a class embedding (class_embed_type "
                       "or num_class_embeds)")
    if self.addition_embed_type == "text_time":
      if self.addition_time_embed_dim is None or self.projection_class_embeddings_input_dim is None:
        raise ValueError(
            "addition_embed_type='text_time' needs addition_time_embed_dim and "
            f"projection_class_embeddings_input_dim; got {self.addition_time_embed_dim} and "
            f"{self.projection_class_embeddings_input_dim}")
      if self.class_embeddings_concat:
        raise ValueError("class_embeddings_concat=True with addition_embed_type='text_time' "
                         "adds embeddings of different widths; diffusers cannot run it either")

  # ------------------------------------------------------------------------------ derived values

  @property
  def num_levels(self) -> int:
    """Resolution levels: one per down block."""
    return len(self.block_out_channels)

  @property
  def downsample_factor(self) -> int:
    """Latent rows and columns per row/column of the lowest resolution: 2^(levels−1)."""
    return 2 ** (self.num_levels - 1)

  @property
  def attention_levels(self) -> tuple[int, ...]:
    """Down-block levels with cross-attention."""
    return tuple(i for i, t in enumerate(self.down_block_types) if t == "CrossAttnDownBlock2D")

  @property
  def time_embed_dim(self) -> int:
    """Width of the timestep embedding MLP (4 × block_out_channels[0] unless overridden)."""
    return self.time_embedding_dim or 4 * self.block_out_channels[0]

  @property
  def blocks_time_embed_dim(self) -> int:
    """Width of the embedding the resnets receive (doubled by class_embeddings_concat)."""
    return self.time_embed_dim * (2 if self.class_embeddings_concat else 1)

  @property
  def encoder_dim(self) -> int:
    """Last dim of encoder_hidden_states (cross_attention_dim of the attention blocks)."""
    return self.cross_attention_dim[-1]

  @property
  def class_embedding_kind(self) -> str | None:
    """None, "embedding" (num_class_embeds ids), "timestep" or "projection"."""
    if self.class_embed_type is None:
      return None if self.num_class_embeds is None else "embedding"
    return self.class_embed_type

  def down_transformer_layers(self, level: int) -> tuple[int, ...]:
    """Transformer depth of each attention of down block `level`."""
    return _per_layer(self.transformer_layers_per_block[level], self.layers_per_block[level],
                      f"transformer_layers_per_block[{level}]")

  def up_transformer_layers(self, index: int) -> tuple[int, ...]:
    """Transformer depth of each attention of up block `index` (up order, lowest level first)."""
    reverse = self.reverse_transformer_layers_per_block
    name = "reverse_transformer_layers_per_block"
    if reverse is None:
      reverse, name = self.transformer_layers_per_block[::-1], "reversed transformer_layers_per_block"
    elif len(reverse) != self.num_levels:
      raise ValueError(f"{name} has {len(reverse)} entries for {self.num_levels} up blocks: {reverse}")
    return _per_layer(reverse[index], self.layers_per_block[::-1][index] + 1, f"{name}[{index}]")

  @property
  def mid_transformer_layers(self) -> int:
    """Transformer depth of the mid block's attention."""
    return self.down_transformer_layers(self.num_levels - 1)[0]

  @property
  def conditioning_fields(self) -> tuple[str, ...]:
    """The keyword arguments of the forward this config needs (diffusers' names)."""
    fields = ["encoder_hidden_states"]
    if self.addition_embed_type == "text_time":
      fields += ["text_embeds", "time_ids"]
    if self.class_embedding_kind is not None:
      fields.append("class_labels")
    return tuple(fields)

  def noise_prediction(self, out_bhwc):
    """The channels of the model output a scheduler steps with: all of them (no learned variance)."""
    return out_bhwc

  @property
  def row_granularity(self) -> int:
    """Rows a row patch must be a multiple of: one row at the lowest resolution level."""
    return self.downsample_factor

  def valid_row_splits(self, height: int) -> list[int]:
    """Row-patch counts that split `height` latent rows into whole rows at every resolution level."""
    return valid_row_splits(height, self.row_granularity)

  def check_latent_size(self, height: int, width: int, row_splits: int = 1) -> None:
    """Checks that a latent of `height` × `width` fits the UNet, split into `row_splits` row patches.

    Every patch must keep whole rows at the lowest resolution: height / row_splits and width must
    be divisible by `downsample_factor`.

    Raises:
      ValueError: naming the sizes and the nearest valid choices.
    """
    f = self.downsample_factor
    problems = row_split_problems(height, width, row_splits, f)
    if problems:
      raise ValueError(
          f"latent size {height}×{width} does not fit this UNet ({self.num_levels} resolution "
          f"levels: every patch's rows and columns must divide by 2^{self.num_levels - 1} = {f}): "
          + "; ".join(problems))


def valid_row_splits(height: int, unit: int) -> list[int]:
  """Row-patch counts that split `height` latent rows into patches of whole multiples of `unit` rows."""
  return [n for n in range(1, height // unit + 1) if height % (n * unit) == 0]


def row_split_problems(height: int, width: int, row_splits: int, unit: int) -> list[str]:
  """What keeps a `height` × `width` latent from splitting into `row_splits` row patches whose rows and
  columns are multiples of `unit`, each with the nearest valid choices (empty when it fits).

  Raises:
    ValueError: `row_splits` is not a positive int.
  """
  if not isinstance(row_splits, int) or row_splits < 1:
    raise ValueError(f"row_splits must be a positive int, got {row_splits!r}")
  f, problems = unit, []
  if height % (f * row_splits):
    why = (f"height {height} is not divisible by {f}" if row_splits == 1 else
           f"height {height} over {row_splits} row patches is not divisible by "
           f"{row_splits} × {f} = {row_splits * f}")
    problems.append(f"{why}; nearest valid heights: {_nearest_multiples(height, f * row_splits)}")
    if row_splits > 1 and height % f == 0:
      problems.append(f"valid patch counts for height {height}: {valid_row_splits(height, f)}")
  if width % f:
    problems.append(f"width {width} is not divisible by {f}; nearest valid widths: "
                    f"{_nearest_multiples(width, f)}")
  return problems


def check_config_keys(d: Mapping[str, Any], kind: str, known: set[str],
                      only_supported: Mapping[str, tuple[Any, ...]]) -> None:
  """Refuses what a diffusers `config.json` dict `d` of a `kind` model sets that dfjax does not implement.

  Keys starting with `_` are ignored; the others must be in `known` or `only_supported`, and an
  `only_supported` key's value one of its supported values.

  Raises:
    ValueError: naming every unknown key, or the key, its value and the supported values.
  """
  unknown = sorted(k for k in d if not k.startswith("_") and k not in known and k not in only_supported)
  if unknown:
    raise ValueError(f"unknown {kind} config keys {unknown}: dfjax does not know what they change, "
                     "so it will not guess. Remove them if they are inert.")
  for key, supported in only_supported.items():
    if key in d and d[key] not in supported:
      raise ValueError(_unsupported(key, d[key], supported, kind))


def _unsupported(key: str, value: Any, supported: Sequence[Any], kind: str = "UNet") -> str:
  return (f"{kind} config {key}={value!r} is not supported by dfjax; supported values: "
          f"{', '.join(repr(s) for s in supported)}")


def _tuples(value: Any) -> Any:
  """JSON lists (nested too) → tuples, so configs are hashable and compare equal."""
  if isinstance(value, (list, tuple)):
    return tuple(_tuples(v) for v in value)
  return value


def _per_layer(depth: PerLayer, num_layers: int, name: str) -> tuple[int, ...]:
  if isinstance(depth, int):
    return (depth,) * num_layers
  if len(depth) != num_layers:
    raise ValueError(f"{name}={depth} gives {len(depth)} depths for a block of {num_layers} layers")
  return tuple(depth)


def _nearest_multiples(n: int, m: int) -> list[int]:
  """The multiples of m nearest to n, nearest first (at most two, all positive)."""
  below = n // m * m
  return sorted((c for c in (below, below + m) if c > 0), key=lambda c: (abs(c - n), c))
