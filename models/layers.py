"""Convolution, normalisation, embedding and resnet layers of the diffusion UNet (NHWC).

The layers that need rows beyond this device's (a k×k conv's halo, GroupNorm's image-wide
moments) ask the parallel context `ctx` given at call time, with their `ctx_key`: the layer's
dotted path in diffusers naming ("down_blocks.0.resnets.1.conv1"), set once by the model's
constructor with `assign_ctx_keys`. With the default `SINGLE_DEVICE` context they are ordinary
layers. Attribute and param names mirror diffusers' modules so that checkpoints map one-for-one.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from models.parallel import SINGLE_DEVICE, ParallelContext, keep_for_next_step

Dtype = Any

# Logical param axes. Every param names each of its axes by its role (NNX `out_sharding`
# metadata, see `param`), and a strategy's rule table (sharding/partitioning.py) maps the names
# to mesh axes; by default every param is replicated.
#
# Tensor parallelism (Megatron) splits the INNER_WIDTHS: the widths a block creates inside itself
# and reduces back before its residual add. A column-parallel layer writes an inner width
# ((EMBED, HEADS), (EMBED, MLP), (CONV_IN, CONV_HIDDEN)), the row-parallel layer that reads it
# ((HEADS, EMBED), (MLP, EMBED), (CONV_HIDDEN, CONV_OUT)) holds a slice of its input and so
# computes a partial sum, which it asks the context to reduce (`ctx.reduce_partial_sums`) before
# adding its bias. Every pair needs no exchange between its two layers and one reduce after them:
#   attention  to_q/to_k/to_v (heads split) → attend per head → to_out;
#   feed-forward  proj_in (inner width split) → activation → proj_out;
#   UNet resnet  conv1 (channels split) → + time_emb_proj (split alike) → norm2 (GroupNorm of the
#                split channels) → conv2 → + shortcut. The block's input, its norm1 and shortcut
#                stay whole: in a UNet every block boundary (resnet and transformer outputs, the
#                skips concatenated in the up path) is a whole activation, so a concatenation never
#                mixes two splits.
# Everything else is kept whole on every device (replicated): the 1×1/linear projections into and
# out of a transformer, the resamplers, conv_in/conv_out, and EMBED_INNER, the inner width of the
# conditioning MLPs and adaLN modulations: one vector per sample (or per text token), too little
# work to pay a reduce for.
EMBED = "embed"  # the width a layer reads (and a projection back writes): tokens, embeddings
HEADS = "heads"  # attention inner width, heads × head width
MLP = "mlp"  # a feed-forward's inner width
EMBED_INNER = "embed_inner"  # conditioning MLPs' inner width and adaLN modulation outputs (kept whole)
CONV_IN = "conv_in"  # the channels a conv reads (and GroupNorm normalises)
CONV_OUT = "conv_out"  # the channels a conv writes
CONV_HIDDEN = "conv_hidden"  # a resnet's channels between conv1 and conv2
KERNEL_H = "kernel_h"  # conv taps: rows
KERNEL_W = "kernel_w"  # conv taps: columns
VOCAB = "vocab"  # embedding table rows
MODULATION = "modulation"  # rows of a learned modulation table (PixArt's shift/scale/gate `scale_shift_table`)
PARAM_AXES = (EMBED, HEADS, MLP, EMBED_INNER, CONV_IN, CONV_OUT, CONV_HIDDEN, KERNEL_H, KERNEL_W, VOCAB,
              MODULATION)
INNER_WIDTHS = (HEADS, MLP, CONV_HIDDEN)  # what tensor parallelism splits; their readers reduce


def param(value: jax.Array, axes: tuple[str, ...], chunks: tuple[int, ...] | None = None) -> nnx.Param:
  """An `nnx.Param` whose axes carry the logical names `axes`, one per axis.

  The names go in NNX's own sharding metadata (`out_sharding`); `eager_sharding=False` because
  they are logical, not mesh axes: NNX must not place the value when it is created, the
  strategy's rule table does when a run starts (`sharding.partitioning.param_specs`).
  `chunks` (one count per axis, default all 1) says that an axis is k equal parts the layer splits
  apart after the matmul (GEGLU's value and gate): a device holding a slice of that axis must hold
  the same slice of each part (`sharding.partitioning.shard_layout`).
  """
  if len(axes) != value.ndim:
    raise ValueError(f"param of shape {tuple(value.shape)} needs {value.ndim} axis names, got {axes}")
  chunks = (1,) * value.ndim if chunks is None else tuple(chunks)
  if len(chunks) != value.ndim or any(n % k for n, k in zip(value.shape, chunks)):
    raise ValueError(f"param of shape {tuple(value.shape)}: chunks {chunks} must give each axis a count "
                     "that divides it")
  return nnx.Param(value, out_sharding=tuple(axes), chunks=chunks, eager_sharding=False)


def param_key(rngs: nnx.Rngs) -> jax.Array:
  """The next key of the `params` stream; the same key as `rngs.params()`.

  `rngs.params()` writes its counter through an indexed update whose check asks a tracer for
  its sharding, and under `nnx.eval_shape`/`jit` that error message walks the whole trace: model
  construction becomes quadratic in the number of layers (minutes for SDXL). Reading and
  replacing the counter as whole values avoids that path.
  """
  stream = rngs.params
  key = jax.random.fold_in(stream.key.get_value(), stream.count.get_value())
  stream.count.set_value(stream.count.get_value() + 1)
  return key


def _lecun_normal(key: jax.Array, shape: tuple[int, ...], dtype: Dtype) -> jax.Array:
  """Normal with variance 1/fan_in (fan_in: all axes but the last).

  Checkpoints replace these values; a plain (not truncated) normal keeps random models cheap to
  build on CPU, where every new param shape compiles its own sampler.
  """
  fan_in = math.prod(shape[:-1])
  return (jax.random.normal(key, shape, jnp.float32) / math.sqrt(fan_in)).astype(dtype)


def assign_ctx_keys(root: nnx.Module) -> None:
  """Sets `ctx_key` of every submodule that has one to its dotted path below `root`."""
  for path, node in list(nnx.iter_graph(root)):
    if isinstance(node, nnx.Module) and hasattr(node, "ctx_key"):
      node.ctx_key = ".".join(str(p) for p in path)


# ---------------------------------------------------------------------------------- costs
# Every layer with matrix work or a request to the context says what it costs for one sample
# (`cost`), and every block sums its layers' costs in the order it calls them: the model's own
# layout is the only source of FLOP counts (dfjax/bench/flops.py) and exchange volumes
# (sharding/accounting/analytic.py). Elementwise work (norms, activations, softmax, adds) is left
# out: about 1 % of a Stable Diffusion forward.

@dataclasses.dataclass(frozen=True)
class Workload:
  """What a cost is asked for, one sample: the image rows and columns where the layer runs (whole
  image, not a patch), the text tokens cross-attention reads, and whether conv FLOPs count the taps
  on the zero padding (`padded`, as published figures do) or only those inside the image (XLA)."""

  rows: int
  cols: int
  text_tokens: int
  padded: bool = True

  @property
  def tokens(self) -> int:
    return self.rows * self.cols

  def coarser(self, levels: int) -> Workload:
    """`levels` resolution levels lower (negative: higher): rows and columns times 2^-levels."""
    scale = 2.0 ** -levels
    return dataclasses.replace(self, rows=int(self.rows * scale), cols=int(self.cols * scale))


@dataclasses.dataclass(frozen=True)
class Exchange:
  """One request of a layer to the parallel context in one sample's forward, at whole-image size."""

  kind: str      # "halo" (conv_halo), "input_halo" (input_halo), "kv" (attend), "moments" (norm_moments)
                 # or "partial_sums" (reduce_partial_sums)
  key: str       # the asking layer's ctx_key
  rows: int      # rows and columns of the layer's input (partial_sums: of its output; tokens × 1 for a Linear)
  cols: int
  channels: int  # halo: the conv's input channels; kv: heads × head width; moments: groups;
                 # partial_sums: the layer's output width
  halo_rows: int = 0  # halo: rows asked for above and below
  heads: int = 0      # kv: attention heads (Ulysses splits them over devices)
  axis: str = ""      # the logical axis of `channels`: tensor parallelism splits the INNER_WIDTHS
  group_size: int = 0  # moments: channels per group


@dataclasses.dataclass(frozen=True)
class Cost:
  """One sample's FLOPs by kind ("conv", "linear", "attention"; 2 per multiply-add) and context
  requests (in call order) of a layer, block or segment. `+` concatenates parts in call order."""

  flops: Mapping[str, int] = dataclasses.field(default_factory=dict)
  exchanges: tuple[Exchange, ...] = ()

  def __add__(self, other: Cost) -> Cost:
    return Cost(dict(Counter(self.flops) + Counter(other.flops)), self.exchanges + other.exchanges)


def total(costs) -> Cost:
  """The sum of an iterable of costs (zero cost when empty)."""
  return sum(costs, Cost())


def _taps(size: int, kernel: int, stride: int, padded: bool, pad: int) -> int:
  """Kernel taps along one axis summed over the outputs of a conv with `pad` zero padding;
  without `padded`, only the taps inside the image."""
  outputs = size // stride
  if padded:
    return outputs * kernel
  return sum(min(i * stride - pad + kernel, size) - max(i * stride - pad, 0) for i in range(outputs))


def _reduce_partial_sums(layer: nnx.Module, y: jax.Array, ctx: ParallelContext) -> jax.Array:
  """A row-parallel layer's output before its bias: summed over the devices holding the other slices
  of its input width (a no-op for a layer reading a whole width, or on one device)."""
  if not layer.reads_inner_width:
    return y
  y, sent = ctx.reduce_partial_sums(y, layer.ctx_key)
  keep_for_next_step(layer, sent)
  return y


def _axis_names(variable: nnx.Variable) -> tuple[str, ...]:
  return variable.get_metadata("out_sharding")


class Linear(nnx.Module):
  """y = x·kernel + bias, `kernel` (C, D) (torch's (D, C) transposed), optional `bias` (D,).

  `axes` names the (input, output) feature axes of `kernel`; `bias` is named by the output's.
  `out_chunks`: the output is that many equal parts the caller splits apart (GEGLU's value, gate).
  A Linear reading an inner width (INNER_WIDTHS: row-parallel under tensor parallelism) asks
  `ctx.reduce_partial_sums` for the sum of its partial products before adding the bias.

  Shape letters: C input features, D output features (any leading axes).
  """

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
               axes: tuple[str, str] = (EMBED, MLP), out_chunks: int = 1, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.kernel = param(_lecun_normal(param_key(rngs), (in_features, out_features), param_dtype), axes,
                        (1, out_chunks))
    self.bias = param(jnp.zeros((out_features,), param_dtype), axes[1:], (out_chunks,)) if use_bias else None
    self.reads_inner_width = axes[0] in INNER_WIDTHS
    self.dtype = dtype
    self.ctx_key = ""

  def __call__(self, x_c: jax.Array, *, ctx: ParallelContext = SINGLE_DEVICE) -> jax.Array:
    y_d = jnp.einsum("...c,cd->...d", x_c.astype(self.dtype), self.kernel[...].astype(self.dtype))  # ..., D
    y_d = _reduce_partial_sums(self, y_d, ctx)  # ..., D
    return y_d if self.bias is None else y_d + self.bias[...].astype(self.dtype)  # ..., D

  def cost(self, tokens: int) -> Cost:
    """Applied to `tokens` feature vectors."""
    c_in, c_out = self.kernel.shape
    reduce = ((Exchange("partial_sums", self.ctx_key, tokens, 1, c_out, axis=_axis_names(self.kernel)[1]),)
              if self.reads_inner_width else ())
    return Cost({"linear": 2 * tokens * c_in * c_out}, reduce)


class _AffineNorm(nnx.Module):
  """`scale` and `bias` (C,), named `axis`, applied in fp32 to a normalised fp32 input, then cast.

  Without `affine` (torch's `elementwise_affine=False`) there are no params and only the cast.
  """

  def __init__(self, num_features: int, *, epsilon: float, axis: str, dtype: Dtype, param_dtype: Dtype,
               affine: bool = True):
    self.scale = param(jnp.ones((num_features,), param_dtype), (axis,)) if affine else None
    self.bias = param(jnp.zeros((num_features,), param_dtype), (axis,)) if affine else None
    self.epsilon = epsilon
    self.dtype = dtype

  def _affine(self, y_c: jax.Array) -> jax.Array:
    if self.scale is not None:
      y_c = y_c * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)  # ..., C
    return y_c.astype(self.dtype)  # ..., C


class LayerNorm(_AffineNorm):
  """LayerNorm over the last axis with `scale` and `bias` (none without `elementwise_affine`, as in
  torch); statistics and affine in fp32.

  Shape letters: C features (any leading axes).
  """

  def __init__(self, num_features: int, *, epsilon: float, elementwise_affine: bool = True, axis: str = EMBED,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    del rngs  # ones and zeros
    super().__init__(num_features, epsilon=epsilon, axis=axis, dtype=dtype, param_dtype=param_dtype,
                     affine=elementwise_affine)

  def __call__(self, x_c: jax.Array) -> jax.Array:
    x_c = x_c.astype(jnp.float32)  # ..., C
    centred_c = x_c - jnp.mean(x_c, axis=-1, keepdims=True)  # ..., C
    var_1 = jnp.mean(jnp.square(centred_c), axis=-1, keepdims=True)  # ..., 1
    return self._affine(centred_c * lax.rsqrt(var_1 + self.epsilon))  # ..., C


class Embed(nnx.Module):
  """Lookup table `embedding` (N, D) (torch `nn.Embedding`).

  Shape letters: B ids, N table rows, D width.
  """

  def __init__(self, num_embeddings: int, features: int, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.embedding = param(jax.random.normal(param_key(rngs), (num_embeddings, features), param_dtype),
                           (VOCAB, EMBED))
    self.dtype = dtype

  def __call__(self, ids_b: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids_b, axis=0).astype(self.dtype)  # B, D

  def cost(self) -> Cost:
    return Cost()  # a lookup: no matrix work


class Conv2d(nnx.Module):
  """k×k conv (odd k, stride 1 or 2), zero padding k//2, HWIO `kernel` and `bias`; or, with stride
  = k (any k), non-overlapping k×k patches without padding (a DiT's patch embedding); or, with
  `pad_after_only` (3×3, stride 2: diffusers' `Downsample2D(padding=0)`, the VAE encoder's), one zero
  row and column after the image and none before (torch's `F.pad(x, (0, 1, 0, 1))`).

  For a padded conv the k//2 rows above and below come from `ctx.conv_halo` (`ctx.input_halo` for a
  conv on the model's input, `model_input=True`: always this step's rows), and the conv runs with
  VALID row padding on them (zero padding on columns), so a row patch yields exactly its rows of
  the full-image conv. 1×1 convs and patch convs (on patches of whole k-row bands) need no other
  rows. `pad_after_only` asks for the same one-row halo and drops the rows from above. `axes` names
  the (input, output) channel axes of `kernel` (its taps are KERNEL_H, KERNEL_W); `bias` is named
  by the output's. A conv reading an inner width (a resnet's conv2) asks `ctx.reduce_partial_sums`
  for the sum of its partial outputs before adding the bias.

  Shape letters: B batch, H rows, W columns, C input channels, D output channels, s stride.
  """

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *, stride: int = 1,
               axes: tuple[str, str] = (CONV_IN, CONV_OUT), model_input: bool = False,
               pad_after_only: bool = False, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    if kernel_size % 2 != 1 and stride != kernel_size:
      raise ValueError(f"Conv2d kernel_size={kernel_size}, stride={stride}: only odd sizes (zero padding "
                       "k//2), or stride = kernel_size (patches, no padding)")
    if pad_after_only and (kernel_size, stride) != (3, 2):
      raise ValueError(f"Conv2d pad_after_only is diffusers' Downsample2D(padding=0): a 3×3 stride-2 conv, "
                       f"got kernel_size={kernel_size}, stride={stride}")
    shape = (kernel_size, kernel_size, in_channels, out_channels)
    self.kernel = param(_lecun_normal(param_key(rngs), shape, param_dtype), (KERNEL_H, KERNEL_W, *axes))
    self.bias = param(jnp.zeros((out_channels,), param_dtype), axes[1:])
    self.kernel_size = kernel_size
    self.stride = stride
    self.pad = 0 if stride == kernel_size else kernel_size // 2
    self.pad_after_only = pad_after_only
    self.model_input = model_input
    self.reads_inner_width = axes[0] in INNER_WIDTHS
    self.dtype = dtype
    self.ctx_key = ""

  def __call__(self, x_bhwc: jax.Array, *, ctx: ParallelContext = SINGLE_DEVICE) -> jax.Array:
    pad = self.pad
    if pad:
      ask = ctx.input_halo if self.model_input else ctx.conv_halo
      x_bhwc, sent = ask(x_bhwc, pad, self.ctx_key)  # B, H+2·pad, W, C
      keep_for_next_step(self, sent)
    columns = (pad, pad)
    if self.pad_after_only:
      x_bhwc, columns = x_bhwc[:, pad:], (0, pad)  # B, H+1, W, C: the row below only
    y_bhwd = lax.conv_general_dilated(
        x_bhwc.astype(self.dtype), self.kernel[...].astype(self.dtype),
        window_strides=(self.stride, self.stride), padding=((0, 0), columns),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))  # B, H/s, W/s, D
    y_bhwd = _reduce_partial_sums(self, y_bhwd, ctx)  # B, H/s, W/s, D
    return y_bhwd + self.bias[...].astype(self.dtype)  # B, H/s, W/s, D

  def cost(self, at: Workload) -> Cost:
    """On an input of `at.rows` × `at.cols`: every kernel tap, or only those inside the image."""
    k, _, c_in, c_out = self.kernel.shape
    axis_in, axis_out = _axis_names(self.kernel)[2:]
    before = 0 if self.pad_after_only else self.pad  # zero padding before the image; `_taps` clips after it
    taps = (_taps(at.rows, k, self.stride, at.padded, before)
            * _taps(at.cols, k, self.stride, at.padded, before))
    kind = "input_halo" if self.model_input else "halo"
    halo = (Exchange(kind, self.ctx_key, at.rows, at.cols, c_in, self.pad, axis=axis_in),) if self.pad else ()
    reduce = ((Exchange("partial_sums", self.ctx_key, at.rows // self.stride, at.cols // self.stride, c_out,
                        axis=axis_out),) if self.reads_inner_width else ())
    return Cost({"conv": 2 * taps * c_in * c_out}, halo + reduce)


class GroupNorm(_AffineNorm):
  """GroupNorm over (rows, columns, channels of a group) with image-wide moments from `ctx`.

  Per-group E[x] and E[x²] of this device's rows are computed in fp32, made image-wide by
  `ctx.norm_moments`, and the normalisation and affine run in fp32 before the cast to
  `dtype`. Params `scale`, `bias` (C,), named `axis`.

  Under tensor parallelism a GroupNorm of an inner width (a resnet's norm2) sees a slice of the
  channels. Its moments are then taken over parts of groups: runs of channels that lie on one
  device and in one group (a whole group when the slice holds whole groups); when a group's parts
  lie on several devices, `ctx.norm_group_moments` makes each part's moments its group's.

  Shape letters: B batch, H rows, W columns, C channels (this device's), G groups (or group parts
  here), K channels per group (or part).
  """

  def __init__(self, num_groups: int, num_channels: int, *, epsilon: float, axis: str = CONV_IN,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    del rngs  # ones and zeros
    if num_channels % num_groups:
      raise ValueError(f"GroupNorm: {num_channels} channels do not split into {num_groups} groups")
    super().__init__(num_channels, epsilon=epsilon, axis=axis, dtype=dtype, param_dtype=param_dtype)
    self.num_groups = num_groups
    self.group_size = num_channels // num_groups
    self.ctx_key = ""

  def __call__(self, x_bhwc: jax.Array, *, ctx: ParallelContext = SINGLE_DEVICE) -> jax.Array:
    b, h, w, c = x_bhwc.shape
    k = math.gcd(c, self.group_size)  # channels per part: a whole group unless c slices groups
    g = c // k
    x_bhwgk = x_bhwc.astype(jnp.float32).reshape(b, h, w, g, k)  # B, H, W, G, K
    mean_bg = jnp.mean(x_bhwgk, axis=(1, 2, 4))  # B, G
    meansq_bg = jnp.mean(jnp.square(x_bhwgk), axis=(1, 2, 4))  # B, G
    moments_bg2, sent = ctx.norm_moments(jnp.stack([mean_bg, meansq_bg], -1), self.ctx_key)  # B, G, 2
    keep_for_next_step(self, sent)
    if k < self.group_size:  # this device holds parts of groups: their moments are the groups'
      moments_bg2, sent = ctx.norm_group_moments(moments_bg2, self.group_size // k, self.ctx_key)  # B, G, 2
      keep_for_next_step(self, sent)
    mean_bg, meansq_bg = moments_bg2[..., 0], moments_bg2[..., 1]  # B, G each
    var_bg = jnp.maximum(meansq_bg - jnp.square(mean_bg), 0.0)  # B, G
    inv_bg = lax.rsqrt(var_bg + self.epsilon)  # B, G
    y_bhwgk = (x_bhwgk - mean_bg[:, None, None, :, None]) * inv_bg[:, None, None, :, None]  # B, H, W, G, K
    return self._affine(y_bhwgk.reshape(b, h, w, c))  # B, H, W, C

  def cost(self, at: Workload) -> Cost:
    """No matrix work; one request for the moments of its groups."""
    moments = Exchange("moments", self.ctx_key, at.rows, at.cols, self.num_groups, axis=_axis_names(self.scale)[0],
                       group_size=self.group_size)
    return Cost(exchanges=(moments,))


def timestep_embedding(t_b: jax.Array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of (possibly fractional) timesteps, fp32, as diffusers' `Timesteps`.

  The frequencies are computed in fp32 in diffusers' order of operations, so that large
  timesteps (SDXL time ids reach ~1000s) round the same way as in PyTorch.

  Args:
    t_b: (B,) timesteps, any real dtype.
    dim: embedding width; odd widths get a zero last column.
  Returns:
    (B, dim) float32: [sin | cos] halves, or [cos | sin] with `flip_sin_to_cos`.
  """
  half = dim // 2
  exponent_f = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)  # F
  angle_bf = t_b.astype(jnp.float32)[:, None] * jnp.exp(exponent_f)[None, :]  # B, F
  sin_bf, cos_bf = jnp.sin(angle_bf), jnp.cos(angle_bf)  # B, F each
  emb_bd = jnp.concatenate([cos_bf, sin_bf] if flip_sin_to_cos else [sin_bf, cos_bf], -1)  # B, 2F
  return jnp.pad(emb_bd, ((0, 0), (0, dim % 2)))  # B, dim


class TimestepEmbedding(nnx.Module):
  """Two-layer SiLU MLP on an embedding (diffusers `TimestepEmbedding`): `linear_1`, `linear_2`.

  Shape letters: B batch, F input features, D embedding width.
  """

  def __init__(self, in_features: int, embed_dim: int, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.linear_1 = Linear(in_features, embed_dim, axes=(EMBED, EMBED_INNER), **kw)
    self.linear_2 = Linear(embed_dim, embed_dim, axes=(EMBED_INNER, EMBED), **kw)

  def __call__(self, x_bf: jax.Array) -> jax.Array:
    h_bd = nnx.silu(self.linear_1(x_bf))  # B, D
    return self.linear_2(h_bd)  # B, D

  def cost(self) -> Cost:
    """One embedding per sample."""
    return self.linear_1.cost(1) + self.linear_2.cost(1)


class ResnetBlock2D(nnx.Module):
  """diffusers `ResnetBlock2D` ("default" time scale shift): GroupNorm-SiLU-conv twice, with the
  projected time embedding added between, and a 1×1 `conv_shortcut` when channels change.
  `temb_channels=None` (the VAE's blocks): no `time_emb_proj`, and no embedding is taken.

  Shape letters: B batch, H rows, W columns, C input channels, D output channels, E embedding.
  """

  def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, *, groups: int,
               eps: float, output_scale_factor: float = 1.0, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # conv1 column-parallel, conv2 row-parallel over CONV_HIDDEN (see the axis names above): the
    # block's one reduce is conv2's; its input, norm1 and shortcut stay whole.
    self.norm1 = GroupNorm(groups, in_channels, epsilon=eps, **kw)
    self.conv1 = Conv2d(in_channels, out_channels, 3, axes=(CONV_IN, CONV_HIDDEN), **kw)
    # its output adds to conv1's, so it is named (and split) as conv1's output channels
    self.time_emb_proj = (None if temb_channels is None else
                          Linear(temb_channels, out_channels, axes=(EMBED, CONV_HIDDEN), **kw))
    self.norm2 = GroupNorm(groups, out_channels, epsilon=eps, axis=CONV_HIDDEN, **kw)
    self.conv2 = Conv2d(out_channels, out_channels, 3, axes=(CONV_HIDDEN, CONV_OUT), **kw)
    self.conv_shortcut = Conv2d(in_channels, out_channels, 1, **kw) if in_channels != out_channels else None
    self.output_scale_factor = output_scale_factor

  def __call__(self, x_bhwc: jax.Array, temb_be: jax.Array | None = None, *,
               ctx: ParallelContext = SINGLE_DEVICE) -> jax.Array:
    h_bhwc = nnx.silu(self.norm1(x_bhwc, ctx=ctx))  # B, H, W, C
    h_bhwd = self.conv1(h_bhwc, ctx=ctx)  # B, H, W, D
    if self.time_emb_proj is not None:
      h_bhwd = h_bhwd + self.time_emb_proj(nnx.silu(temb_be))[:, None, None, :]  # B, H, W, D
    h_bhwd = nnx.silu(self.norm2(h_bhwd, ctx=ctx))  # B, H, W, D
    h_bhwd = self.conv2(h_bhwd, ctx=ctx)  # B, H, W, D
    skip_bhwd = x_bhwc if self.conv_shortcut is None else self.conv_shortcut(x_bhwc)  # B, H, W, D
    return (skip_bhwd + h_bhwd) / self.output_scale_factor  # B, H, W, D

  def cost(self, at: Workload) -> Cost:
    shortcut = Cost() if self.conv_shortcut is None else self.conv_shortcut.cost(at)
    embedding = Cost() if self.time_emb_proj is None else self.time_emb_proj.cost(1)
    return (self.norm1.cost(at) + self.conv1.cost(at) + embedding + self.norm2.cost(at)
            + self.conv2.cost(at) + shortcut)


class Downsample2D(nnx.Module):
  """Stride-2 3×3 `conv` (diffusers `Downsample2D(use_conv=True, padding=1)`; `padding=0`, the VAE
  encoder's: one zero row and column after the image only).

  Shape letters: B batch, H rows, W columns, C channels.
  """

  def __init__(self, channels: int, *, padding: int = 1, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    if padding not in (0, 1):
      raise ValueError(f"Downsample2D padding={padding!r}: diffusers' stride-2 3×3 conv takes 1 (one zero "
                       "row and column on each side) or 0 (one after the image only)")
    self.conv = Conv2d(channels, channels, 3, stride=2, pad_after_only=padding == 0, dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x_bhwc: jax.Array, *, ctx: ParallelContext = SINGLE_DEVICE) -> jax.Array:
    return self.conv(x_bhwc, ctx=ctx)  # B, H/2, W/2, C

  def cost(self, at: Workload) -> Cost:
    return self.conv.cost(at)


class Upsample2D(nnx.Module):
  """Nearest-neighbour ×2 then 3×3 `conv` (diffusers `Upsample2D(use_conv=True)`).

  Shape letters: B batch, H rows, W columns, C channels.
  """

  def __init__(self, channels: int, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    self.conv = Conv2d(channels, channels, 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x_bhwc: jax.Array, *, ctx: ParallelContext = SINGLE_DEVICE) -> jax.Array:
    b, h, w, c = x_bhwc.shape
    x_bh2w2c = jnp.broadcast_to(x_bhwc[:, :, None, :, None, :], (b, h, 2, w, 2, c))  # B, H, 2, W, 2, C
    x_bhwc = x_bh2w2c.reshape(b, 2 * h, 2 * w, c)  # B, 2H, 2W, C
    return self.conv(x_bhwc, ctx=ctx)  # B, 2H, 2W, C

  def cost(self, at: Workload) -> Cost:
    """On an input of `at.rows` × `at.cols` (the conv runs at twice that)."""
    return self.conv.cost(at.coarser(-1))
