"""diffusers' `UNet2DConditionModel` in Flax NNX, NHWC, for the SD1.x, SD2.x and SDXL families.

Sections in reading order: down blocks, mid block, up blocks, segments, the UNet, its input checks.
Attribute names and list indices mirror diffusers' modules, so a diffusers state dict maps onto
`nnx.state(model, nnx.Param)` one-for-one (see `convert/keymap.py`). Every layer that needs other
devices' rows asks the parallel context `ctx` (see `models/parallel.py`) under its `ctx_key`,
the layer's dotted diffusers path, e.g. "down_blocks.0.resnets.1.conv1" or
"mid_block.attentions.0.transformer_blocks.0.attn1".

The forward is a fold over named segments ("embed", "down_blocks.i", "mid_block", "up_blocks.i",
"out") that hand each other an explicit `UNetCarry`: pipeline methods cut the model there. Every
block also says what it costs (`cost`, models/layers.py): `models.build.segment_costs` reads a config's FLOPs
and context requests off the model itself, the one description of the UNet's layout.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from models.attention import Transformer2DModel
from models.config import UNetConfig
from models.layers import (Conv2d, Cost, Downsample2D, Dtype, Embed, GroupNorm, ResnetBlock2D,
                           TimestepEmbedding, Upsample2D, Workload, assign_ctx_keys, timestep_embedding,
                           total)
from models.parallel import SINGLE_DEVICE, ParallelContext

__all__ = ["UNetConfig", "UNet2DConditionModel", "UNetCarry", "Segment", "DownBlock2D",
           "CrossAttnDownBlock2D", "UNetMidBlock2DCrossAttn", "UpBlock2D", "CrossAttnUpBlock2D"]


def _attentions(config: UNetConfig, level: int, channels: int, depths: tuple[int, ...], *,
                dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs) -> nnx.List:
  """One Transformer2DModel per layer of a cross-attention block at `level` (diffusers indexing)."""
  heads = config.num_attention_heads[level]
  return nnx.List([
      Transformer2DModel(channels, heads, channels // heads, context_dim=config.cross_attention_dim[level],
                         num_layers=depth, groups=config.norm_num_groups,
                         use_linear_projection=config.use_linear_projection,
                         upcast=config.upcast_attention, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
      for depth in depths])


def _block_cost(at: Workload, resnets, attentions, resamplers) -> Cost:
  """A down or up block at `at`, in its call order: each resnet (and its attention), the resampler."""
  cost = Cost()
  for i, resnet in enumerate(resnets):
    cost += resnet.cost(at)
    if attentions is not None:
      cost += attentions[i].cost(at)
  return cost if resamplers is None else cost + resamplers[0].cost(at)


# ---------------------------------------------------------------------------------- down blocks

class DownBlock2D(nnx.Module):
  """`resnets` at one resolution, then an optional stride-2 `downsamplers[0]`.

  Returns the output and the skip activations the up path concatenates: each resnet's (or
  resnet+attention's) output, then the downsampled output.

  Shape letters: B batch, H rows, W columns, C input channels, D output channels, E embedding,
  S text tokens, F text channels.
  """

  has_cross_attention = False

  def __init__(self, config: UNetConfig, level: int, in_channels: int, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    out = config.block_out_channels[level]
    self.resnets = nnx.List([
        ResnetBlock2D(in_channels if i == 0 else out, out, config.blocks_time_embed_dim,
                      groups=config.norm_num_groups, eps=config.norm_eps, **kw)
        for i in range(config.layers_per_block[level])])
    self.attentions = (_attentions(config, level, out, config.down_transformer_layers(level), **kw)
                       if self.has_cross_attention else None)
    is_last = level == config.num_levels - 1
    self.downsamplers = None if is_last else nnx.List([Downsample2D(out, **kw)])
    self.level = level

  def __call__(self, x_bhwc: jax.Array, temb_be: jax.Array, context_bsf: jax.Array, *,
               ctx: ParallelContext = SINGLE_DEVICE) -> tuple[jax.Array, list[jax.Array]]:
    h_bhwd, skips = x_bhwc, []  # B, H, W, C (D after the first resnet)
    for i, resnet in enumerate(self.resnets):
      h_bhwd = resnet(h_bhwd, temb_be, ctx=ctx)  # B, H, W, D
      if self.attentions is not None:
        h_bhwd = self.attentions[i](h_bhwd, context_bsf, ctx=ctx)  # B, H, W, D
      skips.append(h_bhwd)
    if self.downsamplers is not None:
      h_bhwd = self.downsamplers[0](h_bhwd, ctx=ctx)  # B, H/2, W/2, D
      skips.append(h_bhwd)
    return h_bhwd, skips

  def cost(self, latent: Workload) -> Cost:
    """Per sample, for a UNet input of `latent.rows` × `latent.cols`."""
    return _block_cost(latent.coarser(self.level), self.resnets, self.attentions, self.downsamplers)


class CrossAttnDownBlock2D(DownBlock2D):
  """`DownBlock2D` with a Transformer2DModel (`attentions[i]`) after each resnet."""

  has_cross_attention = True


# ---------------------------------------------------------------------------------- mid block

class UNetMidBlock2DCrossAttn(nnx.Module):
  """`resnets[0]`, then (`attentions[0]`, `resnets[1]`) at the lowest resolution.

  Shape letters: B batch, H rows, W columns, C channels, E embedding, S text tokens, F text channels.
  """

  def __init__(self, config: UNetConfig, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    level = config.num_levels - 1
    c = config.block_out_channels[level]
    self.resnets = nnx.List([
        ResnetBlock2D(c, c, config.blocks_time_embed_dim, groups=config.norm_num_groups,
                      eps=config.norm_eps, output_scale_factor=config.mid_block_scale_factor, **kw)
        for _ in range(2)])
    self.attentions = _attentions(config, level, c, (config.mid_transformer_layers,), **kw)
    self.level = level

  def __call__(self, x_bhwc: jax.Array, temb_be: jax.Array, context_bsf: jax.Array, *,
               ctx: ParallelContext = SINGLE_DEVICE) -> jax.Array:
    x_bhwc = self.resnets[0](x_bhwc, temb_be, ctx=ctx)  # B, H, W, C
    x_bhwc = self.attentions[0](x_bhwc, context_bsf, ctx=ctx)  # B, H, W, C
    return self.resnets[1](x_bhwc, temb_be, ctx=ctx)  # B, H, W, C

  def cost(self, latent: Workload) -> Cost:
    """Per sample, for a UNet input of `latent.rows` × `latent.cols`."""
    at = latent.coarser(self.level)
    return self.resnets[0].cost(at) + self.attentions[0].cost(at) + self.resnets[1].cost(at)


# ---------------------------------------------------------------------------------- up blocks

class UpBlock2D(nnx.Module):
  """`resnets` on [x, skip] channel concatenations (skips popped from the end), then an optional
  nearest-×2 `upsamplers[0]`. `index` counts up blocks from the lowest resolution.

  Shape letters: B batch, H rows, W columns, C input channels, K skip channels, D output channels,
  E embedding, S text tokens, F text channels.
  """

  has_cross_attention = False

  def __init__(self, config: UNetConfig, index: int, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    channels = config.block_out_channels[::-1]
    prev = channels[max(index - 1, 0)]  # what the block below (or the mid block) outputs
    out = channels[index]
    skip_last = channels[min(index + 1, config.num_levels - 1)]  # the level above's down output
    n = config.layers_per_block[::-1][index] + 1
    self.resnets = nnx.List([
        ResnetBlock2D((prev if i == 0 else out) + (skip_last if i == n - 1 else out), out,
                      config.blocks_time_embed_dim, groups=config.norm_num_groups,
                      eps=config.norm_eps, **kw)
        for i in range(n)])
    level = config.num_levels - 1 - index
    self.attentions = (_attentions(config, level, out, config.up_transformer_layers(index), **kw)
                       if self.has_cross_attention else None)
    is_last = index == config.num_levels - 1
    self.upsamplers = None if is_last else nnx.List([Upsample2D(out, **kw)])
    self.level = level

  def __call__(self, x_bhwc: jax.Array, skips: list[jax.Array], temb_be: jax.Array,
               context_bsf: jax.Array, *, ctx: ParallelContext = SINGLE_DEVICE) -> jax.Array:
    h_bhwd = x_bhwc  # B, H, W, C (D after the first resnet)
    for i, resnet in enumerate(self.resnets):
      hs_bhwk = jnp.concatenate([h_bhwd, skips[-1 - i]], axis=-1)  # B, H, W, D+K (diffusers' order)
      h_bhwd = resnet(hs_bhwk, temb_be, ctx=ctx)  # B, H, W, D
      if self.attentions is not None:
        h_bhwd = self.attentions[i](h_bhwd, context_bsf, ctx=ctx)  # B, H, W, D
    if self.upsamplers is not None:
      h_bhwd = self.upsamplers[0](h_bhwd, ctx=ctx)  # B, 2H, 2W, D
    return h_bhwd

  def cost(self, latent: Workload) -> Cost:
    """Per sample, for a UNet input of `latent.rows` × `latent.cols`."""
    return _block_cost(latent.coarser(self.level), self.resnets, self.attentions, self.upsamplers)


class CrossAttnUpBlock2D(UpBlock2D):
  """`UpBlock2D` with a Transformer2DModel (`attentions[i]`) after each resnet."""

  has_cross_attention = True


_DOWN_BLOCKS = {"DownBlock2D": DownBlock2D, "CrossAttnDownBlock2D": CrossAttnDownBlock2D}
_UP_BLOCKS = {"UpBlock2D": UpBlock2D, "CrossAttnUpBlock2D": CrossAttnUpBlock2D}


# ---------------------------------------------------------------------------------- segments

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class UNetCarry:
  """What one segment hands the next: arrays only, so that a pipeline can send it to another device.

  Attributes:
    h_bhwc: the hidden state: the input latent (cast, centred) before "embed", the prediction after "out".
    skips: the down path's activations the up blocks have not consumed yet, oldest first.
    temb_be: the embedding every resnet reads (timesteps + class or SDXL micro-conditioning); None
      before "embed".
    context_bsf: the text states cross-attention reads.
    embedding_inputs: what "embed" embeds: "timesteps" (B,) and any of "text_embeds", "time_ids",
      "class_labels"; "embed" empties it.
  """

  h_bhwc: jax.Array
  skips: tuple[jax.Array, ...]
  temb_be: jax.Array | None
  context_bsf: jax.Array
  embedding_inputs: dict[str, jax.Array]

  @property
  def h(self) -> jax.Array:
    """The hidden state, by the name every model's carry gives it (models/dit.py's `DiTCarry.h`)."""
    return self.h_bhwc


@dataclasses.dataclass(frozen=True)
class Segment:
  """A cut point of the model: `segment(carry, ctx=…)` runs it; `cost(latent)` is what it costs per
  sample for a UNet input of `latent.rows` × `latent.cols` (models/layers.py)."""

  name: str
  run: Callable[[UNetCarry, ParallelContext], UNetCarry]
  cost: Callable[[Workload], Cost]

  def __call__(self, carry: UNetCarry, *, ctx: ParallelContext = SINGLE_DEVICE) -> UNetCarry:
    return self.run(carry, ctx)


def _run_down(block: DownBlock2D, carry: UNetCarry, ctx: ParallelContext) -> UNetCarry:
  h_bhwd, skips = block(carry.h_bhwc, carry.temb_be, carry.context_bsf, ctx=ctx)  # B, H/2^l, W/2^l, Dl
  return dataclasses.replace(carry, h_bhwc=h_bhwd, skips=carry.skips + tuple(skips))


def _run_mid(block: UNetMidBlock2DCrossAttn, carry: UNetCarry, ctx: ParallelContext) -> UNetCarry:
  return dataclasses.replace(carry, h_bhwc=block(carry.h_bhwc, carry.temb_be, carry.context_bsf, ctx=ctx))


def _run_up(block: UpBlock2D, carry: UNetCarry, ctx: ParallelContext) -> UNetCarry:
  n = len(block.resnets)  # each resnet concatenates one skip, the newest first
  h_bhwd = block(carry.h_bhwc, carry.skips[-n:], carry.temb_be, carry.context_bsf, ctx=ctx)  # B, H/2^l, W/2^l
  return dataclasses.replace(carry, h_bhwc=h_bhwd, skips=carry.skips[:-n])


# ---------------------------------------------------------------------------------- the UNet

class UNet2DConditionModel(nnx.Module):
  """diffusers' `UNet2DConditionModel`, NHWC: ε (or v) from a noisy latent, timesteps and text.

  Shape letters: B batch, H rows, W columns, C latent channels, D block channels, E time
  embedding, S text tokens, F text channels, P pooled text + time-id features, N time ids.
  """

  def __init__(self, config: UNetConfig, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32):
    """Args:
      config: the hyper-parameters (`UNetConfig.from_diffusers_config(config_json_dict)`).
      rngs: initialiser randomness (the weights are normally replaced by a checkpoint).
      dtype: activation / compute dtype (GroupNorm statistics and softmax stay fp32).
      param_dtype: dtype the params are stored in.
    """
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.config = config
    self.dtype = dtype
    c0, temb = config.block_out_channels[0], config.time_embed_dim
    self.conv_in = Conv2d(config.in_channels, c0, config.conv_in_kernel, model_input=True, **kw)
    self.time_embedding = TimestepEmbedding(c0, temb, **kw)
    match config.class_embedding_kind:
      case None:
        self.class_embedding = None
      case "embedding":
        self.class_embedding = Embed(config.num_class_embeds, temb, **kw)
      case "timestep":
        self.class_embedding = TimestepEmbedding(c0, temb, **kw)
      case "projection":
        self.class_embedding = TimestepEmbedding(config.projection_class_embeddings_input_dim, temb, **kw)
      case kind:
        raise ValueError(f"class embedding {kind!r}; valid: None, embedding, timestep, projection")
    self.add_embedding = (TimestepEmbedding(config.projection_class_embeddings_input_dim, temb, **kw)
                          if config.addition_embed_type == "text_time" else None)
    in_channels = (c0,) + config.block_out_channels[:-1]
    self.down_blocks = nnx.List([_DOWN_BLOCKS[kind](config, level, in_channels[level], **kw)
                                 for level, kind in enumerate(config.down_block_types)])
    self.mid_block = UNetMidBlock2DCrossAttn(config, **kw)
    self.up_blocks = nnx.List([_UP_BLOCKS[kind](config, index, **kw)
                               for index, kind in enumerate(config.up_block_types)])
    self.conv_norm_out = GroupNorm(config.norm_num_groups, c0, epsilon=config.norm_eps, **kw)
    self.conv_out = Conv2d(c0, config.out_channels, config.conv_out_kernel, **kw)
    assign_ctx_keys(self)

  def __call__(self, x: jax.Array, timesteps: jax.Array | float | int,
               encoder_hidden_states: jax.Array, *, text_embeds: jax.Array | None = None,
               time_ids: jax.Array | None = None, class_labels: jax.Array | None = None,
               ctx: ParallelContext | None = None) -> jax.Array:
    """Predicts the noise (or v) of the latent `x`: `segments()` folded over `first_carry(...)`.

    Args:
      x: (B, H, W, C) noisy latent, NHWC (this device's rows under a patch-parallel context).
      timesteps: scalar or (B,), int or float.
      encoder_hidden_states: (B, S, F) text-encoder states, F = config.encoder_dim.
      text_embeds: (B, P − N·addition_time_embed_dim) pooled text embedding (SDXL only).
      time_ids: (B, N) micro-conditioning ids (SDXL: 6, the refiner: 5).
      class_labels: (B,) ids, (B,) timesteps or (B, P) vectors for class-conditional configs.
      ctx: the parallel context; None means one device holds the whole image.
    Returns:
      (B, H, W, out_channels) in `dtype`.
    Raises:
      ValueError: inputs that do not fit the config (checked while tracing: shapes are static).
    """
    ctx = SINGLE_DEVICE if ctx is None else ctx
    carry = self.first_carry(x, timesteps, encoder_hidden_states, text_embeds=text_embeds, time_ids=time_ids,
                             class_labels=class_labels)
    for segment in self.segments():
      carry = segment(carry, ctx=ctx)
    return carry.h_bhwc  # B, H, W, C_out

  def first_carry(self, x: jax.Array, timesteps: jax.Array | float | int, encoder_hidden_states: jax.Array,
                  *, text_embeds: jax.Array | None = None, time_ids: jax.Array | None = None,
                  class_labels: jax.Array | None = None) -> UNetCarry:
    """The carry "embed" starts from: the inputs of `__call__`, checked, cast and broadcast."""
    b = _check_inputs(self.config, x, timesteps, encoder_hidden_states, text_embeds, time_ids, class_labels)
    x_bhwc = x.astype(self.dtype)  # B, H, W, C
    if self.config.center_input_sample:
      x_bhwc = 2 * x_bhwc - 1.0  # B, H, W, C
    t_b = jnp.broadcast_to(jnp.reshape(jnp.asarray(timesteps), (-1,)), (b,))  # B
    given = dict(text_embeds=text_embeds, time_ids=time_ids, class_labels=class_labels)
    inputs = {"timesteps": t_b, **{name: jnp.asarray(v) for name, v in given.items() if v is not None}}
    return UNetCarry(x_bhwc, (), None, encoder_hidden_states.astype(self.dtype), inputs)  # context: B, S, F

  def segments(self) -> tuple[Segment, ...]:
    """The ordered cut points: "embed" (time, class and SDXL embeddings, conv_in), "down_blocks.i",
    "mid_block", "up_blocks.i", "out" (conv_norm_out, SiLU, conv_out)."""
    return (Segment("embed", self._embed, self._embed_cost),
            *(Segment(f"down_blocks.{i}", functools.partial(_run_down, block), block.cost)
              for i, block in enumerate(self.down_blocks)),
            Segment("mid_block", functools.partial(_run_mid, self.mid_block), self.mid_block.cost),
            *(Segment(f"up_blocks.{i}", functools.partial(_run_up, block), block.cost)
              for i, block in enumerate(self.up_blocks)),
            Segment("out", self._out, self._out_cost))

  def _embed(self, carry: UNetCarry, ctx: ParallelContext) -> UNetCarry:
    cfg, inputs = self.config, carry.embedding_inputs
    emb_be = self.time_embedding(self._sinusoid(inputs["timesteps"], cfg.block_out_channels[0]))  # B, E
    if self.class_embedding is not None:
      class_be = self._class_embedding(inputs["class_labels"])  # B, E
      emb_be = (jnp.concatenate([emb_be, class_be], -1) if cfg.class_embeddings_concat
                else emb_be + class_be)  # B, E (2E when concatenated)
    if self.add_embedding is not None:
      b, time_ids_bn = emb_be.shape[0], inputs["time_ids"]
      time_bnd = self._sinusoid(time_ids_bn.reshape(-1), cfg.addition_time_embed_dim).reshape(b, -1)  # B, N·A
      add_bp = jnp.concatenate([inputs["text_embeds"].astype(self.dtype), time_bnd], -1)  # B, P
      emb_be = emb_be + self.add_embedding(add_bp)  # B, E
    h_bhwd = self.conv_in(carry.h_bhwc, ctx=ctx)  # B, H, W, D0
    return UNetCarry(h_bhwd, (h_bhwd,), emb_be, carry.context_bsf, {})

  def _embed_cost(self, latent: Workload) -> Cost:
    embeddings = (self.time_embedding, self.class_embedding, self.add_embedding)
    return total(e.cost() for e in embeddings if e is not None) + self.conv_in.cost(latent)

  def _out(self, carry: UNetCarry, ctx: ParallelContext) -> UNetCarry:
    h_bhwd = nnx.silu(self.conv_norm_out(carry.h_bhwc, ctx=ctx))  # B, H, W, D0
    return dataclasses.replace(carry, h_bhwc=self.conv_out(h_bhwd, ctx=ctx))  # B, H, W, C_out

  def _out_cost(self, latent: Workload) -> Cost:
    return self.conv_norm_out.cost(latent) + self.conv_out.cost(latent)

  def _sinusoid(self, t: jax.Array, dim: int) -> jax.Array:
    """diffusers' `Timesteps` projection (shared by time, class and SDXL time-id embeddings)."""
    cfg = self.config
    return timestep_embedding(t, dim, flip_sin_to_cos=cfg.flip_sin_to_cos,
                              freq_shift=cfg.freq_shift).astype(self.dtype)  # B, dim

  def _class_embedding(self, class_labels: jax.Array) -> jax.Array:
    match self.config.class_embedding_kind:
      case "embedding":
        return self.class_embedding(class_labels.astype(jnp.int32))  # B, E
      case "timestep":
        return self.class_embedding(self._sinusoid(class_labels, self.config.block_out_channels[0]))  # B, E
      case "projection":
        return self.class_embedding(class_labels.astype(self.dtype))  # B, E
      case kind:
        raise ValueError(f"class embedding {kind!r}; valid: embedding, timestep, projection")


# ---------------------------------------------------------------------------------- input checks

def _check_inputs(cfg: UNetConfig, x, timesteps, context, text_embeds, time_ids, class_labels) -> int:
  """Raises a ValueError naming the problem and the fix; returns the batch size."""
  if jnp.ndim(x) != 4:
    raise ValueError(f"x must be an NHWC latent (B, H, W, C) of rank 4, got shape {jnp.shape(x)}")
  b, h, w, c = x.shape
  if c != cfg.in_channels:
    hint = (" It looks NCHW: transpose with x.transpose(0, 2, 3, 1)."
            if h == cfg.in_channels else "")
    raise ValueError(f"x has {c} channels (last axis of shape {x.shape}) but the UNet takes "
                     f"in_channels={cfg.in_channels}.{hint}")
  cfg.check_latent_size(h, w)
  t_shape = jnp.shape(timesteps)
  if len(t_shape) > 1 or (len(t_shape) == 1 and t_shape[0] not in (1, b)):
    raise ValueError(f"timesteps must be a scalar or have shape ({b},) for batch {b}, got shape "
                     f"{t_shape}")
  if context is None:
    raise ValueError(f"encoder_hidden_states is required: (B, S, {cfg.encoder_dim}) text-encoder "
                     "states (zeros of that shape for an unconditional pass)")
  if jnp.ndim(context) != 3 or context.shape[-1] != cfg.encoder_dim:
    raise ValueError(f"encoder_hidden_states must have shape (B, S, {cfg.encoder_dim}) "
                     f"(cross_attention_dim), got {jnp.shape(context)}")
  batches = {"encoder_hidden_states": context.shape[0]}
  if cfg.addition_embed_type == "text_time":
    if text_embeds is None or time_ids is None:
      missing = [n for n, v in (("text_embeds", text_embeds), ("time_ids", time_ids)) if v is None]
      raise ValueError(f"this UNet (addition_embed_type='text_time', SDXL) needs {' and '.join(missing)}:"
                       " text_embeds (B, pooled text width) and time_ids (B, 6) "
                       "(original size, crop top-left, target size)")
    if jnp.ndim(text_embeds) != 2 or jnp.ndim(time_ids) != 2:
      raise ValueError(f"text_embeds and time_ids must be rank 2 (B, ·), got shapes "
                       f"{jnp.shape(text_embeds)} and {jnp.shape(time_ids)}")
    width = text_embeds.shape[-1] + time_ids.shape[-1] * cfg.addition_time_embed_dim
    if width != cfg.projection_class_embeddings_input_dim:
      raise ValueError(
          f"text_embeds {text_embeds.shape} and time_ids {time_ids.shape} give "
          f"{text_embeds.shape[-1]} + {time_ids.shape[-1]}×{cfg.addition_time_embed_dim} = {width} "
          f"features, but projection_class_embeddings_input_dim={cfg.projection_class_embeddings_input_dim}"
          f": with {time_ids.shape[-1]} time ids text_embeds needs last dim "
          f"{cfg.projection_class_embeddings_input_dim - time_ids.shape[-1] * cfg.addition_time_embed_dim}")
    batches.update(text_embeds=text_embeds.shape[0], time_ids=time_ids.shape[0])
  kind = cfg.class_embedding_kind
  if kind is not None:
    if class_labels is None:
      raise ValueError(f"this UNet is class-conditional (class embedding {kind!r}): pass class_labels")
    want = 2 if kind == "projection" else 1
    if jnp.ndim(class_labels) != want:
      raise ValueError(f"class_labels for a {kind!r} class embedding must be rank {want}, got shape "
                       f"{jnp.shape(class_labels)}")
    if kind == "projection" and class_labels.shape[-1] != cfg.projection_class_embeddings_input_dim:
      raise ValueError(f"class_labels must have shape (B, {cfg.projection_class_embeddings_input_dim}),"
                       f" got {class_labels.shape}")
    batches["class_labels"] = class_labels.shape[0]
  wrong = {name: n for name, n in batches.items() if n != b}
  if wrong:
    raise ValueError(f"batch sizes disagree: x has batch {b} but {wrong}; give every input the "
                     "same leading batch size (timesteps may be a scalar)")
  return b
