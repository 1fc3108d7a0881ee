"""diffusers' `AutoencoderKL` in Flax NNX, NHWC: the encoder (image → diagonal Gaussian over latents)
and the decoder (latents → image) of the SD1.x, SD2.x, SDXL and SD3/Flux VAEs.

Sections in reading order: the mid-block attention, the blocks, the encoder, the decoder, the
autoencoder. Attribute names and list indices mirror diffusers' modules, so its state dict maps
onto `nnx.state(model, nnx.Param)` one-for-one (convert/vae_keymap.py renames `to_out.0` and the
old `query/key/value/proj_attn` names). Every conv, GroupNorm and the mid-block self-attention ask
the parallel context `ctx` (models/parallel.py) under their dotted diffusers path
("decoder.up_blocks.0.resnets.1.conv1", "decoder.mid_block.attentions.0"), so the same code decodes
one image's rows split over devices (dfjax/vae_decode.py): the decoder only upsamples, nearest
neighbour, which needs no other rows.

Shape letters: B batch, H rows, W columns, C channels, L latent channels, T = H·W tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.attention import Attention
from models.layers import (Conv2d, Cost, Downsample2D, Dtype, GroupNorm, ResnetBlock2D, Upsample2D, Workload,
                           assign_ctx_keys, total)
from models.parallel import SINGLE_DEVICE, ParallelContext
from models.vae_config import VAEConfig

__all__ = ["AutoencoderKL", "Encoder", "Decoder", "VAEConfig"]

_EPS = 1e-6  # diffusers' Encoder/Decoder: every GroupNorm (resnets, attention, conv_norm_out)
_LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps the log-variance


class VAEAttention(Attention):
  """The VAE mid block's single-head self-attention over every pixel (diffusers `Attention` with
  `_from_deprecated_attn_block`): `group_norm`, `to_q`/`to_k`/`to_v` (with biases), `to_out`, and
  the residual. The attention itself is the context's `attend`: patch contexts gather K/V.

  Shape letters: B batch, H rows, W columns, C channels, T = H·W tokens.
  """

  def __init__(self, channels: int, *, groups: int, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    super().__init__(channels, 1, channels, bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.group_norm = GroupNorm(groups, channels, epsilon=_EPS, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x_bhwc: jax.Array, *, ctx: ParallelContext = SINGLE_DEVICE) -> jax.Array:
    b, h, w, c = x_bhwc.shape
    h_btc = self.group_norm(x_bhwc, ctx=ctx).reshape(b, h * w, c)  # B, T, C
    out_btc = super().__call__(h_btc, ctx=ctx)  # B, T, C
    return out_btc.reshape(b, h, w, c) + x_bhwc  # B, H, W, C

  def cost(self, at: Workload) -> Cost:
    return self.group_norm.cost(at) + super().cost(at)


def _resnet(in_channels: int, out_channels: int, groups: int, **kw) -> ResnetBlock2D:
  """The VAE's resnet: no time embedding, eps 1e-6."""
  return ResnetBlock2D(in_channels, out_channels, None, groups=groups, eps=_EPS, **kw)


# ---------------------------------------------------------------------------------- blocks

class UNetMidBlock2D(nnx.Module):
  """`resnets[0]`, then (`attentions[0]`, `resnets[1]`); without `add_attention`, the two resnets only.

  Shape letters: B batch, H rows, W columns, C channels.
  """

  def __init__(self, channels: int, *, groups: int, add_attention: bool, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = nnx.List([_resnet(channels, channels, groups, **kw) for _ in range(2)])
    self.attentions = nnx.List([VAEAttention(channels, groups=groups, **kw)]) if add_attention else None

  def __call__(self, x_bhwc: jax.Array, *, ctx: ParallelContext = SINGLE_DEVICE) -> jax.Array:
    x_bhwc = self.resnets[0](x_bhwc, ctx=ctx)  # B, H, W, C
    if self.attentions is not None:
      x_bhwc = self.attentions[0](x_bhwc, ctx=ctx)  # B, H, W, C
    return self.resnets[1](x_bhwc, ctx=ctx)  # B, H, W, C

  def cost(self, at: Workload) -> Cost:
    attention = Cost() if self.attentions is None else self.attentions[0].cost(at)
    return self.resnets[0].cost(at) + attention + self.resnets[1].cost(at)


class _ResnetsThenResample(nnx.Module):
  """What the encoder's and decoder's blocks share: `resnets` at one resolution, then the optional
  resampler each names as diffusers does (`downsamplers[0]` or `upsamplers[0]`)."""

  @staticmethod
  def _resnets(in_channels: int, out_channels: int, num_layers: int, groups: int, **kw) -> nnx.List:
    return nnx.List([_resnet(in_channels if i == 0 else out_channels, out_channels, groups, **kw)
                     for i in range(num_layers)])

  def _resampler(self) -> nnx.Module | None:
    raise NotImplementedError

  def __call__(self, x_bhwc: jax.Array, *, ctx: ParallelContext = SINGLE_DEVICE) -> jax.Array:
    for resnet in self.resnets:
      x_bhwc = resnet(x_bhwc, ctx=ctx)  # B, H, W, D
    resampler = self._resampler()
    return x_bhwc if resampler is None else resampler(x_bhwc, ctx=ctx)  # B, H/2, W/2, D or B, 2H, 2W, D

  def cost(self, at: Workload) -> Cost:
    resampler = self._resampler()
    return total(resnet.cost(at) for resnet in self.resnets) + (Cost() if resampler is None else resampler.cost(at))


class DownEncoderBlock2D(_ResnetsThenResample):
  """`resnets`, then (all but the last level) `downsamplers[0]`, stride 2 with zero padding after only.

  Shape letters: B batch, H rows, W columns, C input channels, D output channels.
  """

  def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, groups: int, downsample: bool,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = self._resnets(in_channels, out_channels, num_layers, groups, **kw)
    self.downsamplers = nnx.List([Downsample2D(out_channels, padding=0, **kw)]) if downsample else None

  def _resampler(self):
    return None if self.downsamplers is None else self.downsamplers[0]


class UpDecoderBlock2D(_ResnetsThenResample):
  """`resnets`, then (all but the last level) `upsamplers[0]`: nearest ×2 and a 3×3 conv.

  Shape letters: B batch, H rows, W columns, C input channels, D output channels.
  """

  def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, groups: int, upsample: bool,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = self._resnets(in_channels, out_channels, num_layers, groups, **kw)
    self.upsamplers = nnx.List([Upsample2D(out_channels, **kw)]) if upsample else None

  def _resampler(self):
    return None if self.upsamplers is None else self.upsamplers[0]


# ---------------------------------------------------------------------------------- encoder, decoder

class Encoder(nnx.Module):
  """`conv_in`, `down_blocks`, `mid_block`, `conv_norm_out`, SiLU, `conv_out` to 2·L channels (mean and
  log-variance).

  Shape letters: B batch, H rows, W columns, C image channels, L latent channels, f = 2^(levels−1).
  """

  def __init__(self, config: VAEConfig, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    channels, groups = config.block_out_channels, config.norm_num_groups
    self.conv_in = Conv2d(config.in_channels, channels[0], 3, **kw)
    self.down_blocks = nnx.List([
        DownEncoderBlock2D(channels[max(i - 1, 0)], channels[i], num_layers=config.layers_per_block, groups=groups,
                           downsample=i < config.num_levels - 1, **kw)
        for i in range(config.num_levels)])
    self.mid_block = UNetMidBlock2D(channels[-1], groups=groups, add_attention=config.mid_block_add_attention, **kw)
    self.conv_norm_out = GroupNorm(groups, channels[-1], epsilon=_EPS, **kw)
    self.conv_out = Conv2d(channels[-1], 2 * config.latent_channels, 3, **kw)

  def __call__(self, x_bhwc: jax.Array, *, ctx: ParallelContext = SINGLE_DEVICE) -> jax.Array:
    for index in range(len(self.layer_names)):
      x_bhwc = self.run_layer(index, x_bhwc, ctx=ctx)  # B, H/f, W/f, 2L after the last
    return x_bhwc

  # The encoder as a chain of layers, for schedulers that place its work layer by layer (DiffusionPipe
  # fills pipeline bubbles with a frozen encoder's layers, each on a part of the batch).

  @property
  def layer_names(self) -> tuple[str, ...]:
    """"conv_in", "down_blocks.i" per level, "mid_block", "conv_out" (with conv_norm_out and the SiLU)."""
    return ("conv_in", *(f"down_blocks.{i}" for i in range(len(self.down_blocks))), "mid_block", "conv_out")

  def run_layer(self, index: int, x_bhwc: jax.Array, *, ctx: ParallelContext = SINGLE_DEVICE) -> jax.Array:
    """Layer `index` of `layer_names` on its input (the image for 0, the previous layer's output else)."""
    name = self.layer_names[index]
    if name == "conv_in":
      return self.conv_in(x_bhwc, ctx=ctx)  # B, H, W, C0
    if name == "mid_block":
      return self.mid_block(x_bhwc, ctx=ctx)  # B, H/f, W/f, C_last
    if name == "conv_out":
      return self.conv_out(nnx.silu(self.conv_norm_out(x_bhwc, ctx=ctx)), ctx=ctx)  # B, H/f, W/f, 2L
    return self.down_blocks[index - 1](x_bhwc, ctx=ctx)  # B, H/2^i, W/2^i, C_i (halved but at the last level)

  def layer_costs(self, image: Workload) -> dict[str, Cost]:
    """Each layer's cost per sample, for an image of `image.rows` × `image.cols`, by `layer_names`."""
    latent = image.coarser(len(self.down_blocks) - 1)
    blocks = {f"down_blocks.{i}": block.cost(image.coarser(i)) for i, block in enumerate(self.down_blocks)}
    return {"conv_in": self.conv_in.cost(image), **blocks, "mid_block": self.mid_block.cost(latent),
            "conv_out": self.conv_norm_out.cost(latent) + self.conv_out.cost(latent)}


class Decoder(nnx.Module):
  """`conv_in`, `mid_block`, `up_blocks` (channels in reverse), `conv_norm_out`, SiLU, `conv_out`.

  Shape letters: B batch, h rows, w columns (latent), L latent channels, f = 2^(levels−1).
  """

  def __init__(self, config: VAEConfig, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    channels, groups = config.block_out_channels[::-1], config.norm_num_groups
    self.conv_in = Conv2d(config.latent_channels, channels[0], 3, **kw)
    self.mid_block = UNetMidBlock2D(channels[0], groups=groups, add_attention=config.mid_block_add_attention, **kw)
    self.up_blocks = nnx.List([
        UpDecoderBlock2D(channels[max(i - 1, 0)], channels[i], num_layers=config.layers_per_block + 1,
                         groups=groups, upsample=i < config.num_levels - 1, **kw)
        for i in range(config.num_levels)])
    self.conv_norm_out = GroupNorm(groups, channels[-1], epsilon=_EPS, **kw)
    self.conv_out = Conv2d(channels[-1], config.out_channels, 3, **kw)

  def __call__(self, z_bhwl: jax.Array, *, ctx: ParallelContext = SINGLE_DEVICE) -> jax.Array:
    h_bhwc = self.conv_in(z_bhwl, ctx=ctx)  # B, h, w, C_last
    h_bhwc = self.mid_block(h_bhwc, ctx=ctx)  # B, h, w, C_last
    for block in self.up_blocks:
      h_bhwc = block(h_bhwc, ctx=ctx)  # B, f·h, f·w, C0 after the last
    h_bhwc = nnx.silu(self.conv_norm_out(h_bhwc, ctx=ctx))  # B, f·h, f·w, C0
    return self.conv_out(h_bhwc, ctx=ctx)  # B, f·h, f·w, 3

  def cost(self, latent: Workload) -> Cost:
    """Per sample, for a latent of `latent.rows` × `latent.cols`."""
    image = latent.coarser(1 - len(self.up_blocks))
    blocks = total(block.cost(latent.coarser(-i)) for i, block in enumerate(self.up_blocks))
    return (self.conv_in.cost(latent) + self.mid_block.cost(latent) + blocks + self.conv_norm_out.cost(image)
            + self.conv_out.cost(image))


# ---------------------------------------------------------------------------------- the autoencoder

class AutoencoderKL(nnx.Module):
  """diffusers' `AutoencoderKL`: `encoder`, `quant_conv`, `decoder`, `post_quant_conv` (1×1 convs, each
  present where the config uses it), and the map between its latents and the diffusion model's.

  Shape letters: B batch, H rows, W columns (image), h, w (latent), L latent channels.
  """

  def __init__(self, config: VAEConfig, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    latent = config.latent_channels
    self.config = config
    self.encoder = Encoder(config, **kw)
    self.decoder = Decoder(config, **kw)
    self.quant_conv = Conv2d(2 * latent, 2 * latent, 1, **kw) if config.use_quant_conv else None
    self.post_quant_conv = Conv2d(latent, latent, 1, **kw) if config.use_post_quant_conv else None
    assign_ctx_keys(self)

  def encode(self, x_bhwc: jax.Array, *, ctx: ParallelContext = SINGLE_DEVICE) -> tuple[jax.Array, jax.Array]:
    """Images in [−1, 1] → the posterior's (mean, log-variance), (B, h, w, L) each, the log-variance
    clamped to [−30, 20] as diffusers' `DiagonalGaussianDistribution`; sample with
    `mean + exp(logvar / 2) · ε`, then `scale_latents` for the diffusion model."""
    moments_bhw2l = self.encoder(x_bhwc, ctx=ctx)  # B, h, w, 2L
    if self.quant_conv is not None:
      moments_bhw2l = self.quant_conv(moments_bhw2l)  # B, h, w, 2L
    mean_bhwl, logvar_bhwl = jnp.split(moments_bhw2l, 2, axis=-1)  # B, h, w, L each
    return mean_bhwl, jnp.clip(logvar_bhwl, *_LOGVAR_RANGE)

  def decode_cost(self, latent: Workload) -> Cost:
    """What `decode` costs per sample, for a latent of `latent.rows` × `latent.cols`."""
    post = Cost() if self.post_quant_conv is None else self.post_quant_conv.cost(latent)
    return post + self.decoder.cost(latent)

  def decode(self, z_bhwl: jax.Array, *, ctx: ParallelContext = SINGLE_DEVICE) -> jax.Array:
    """The VAE's latents (`unscale_latents` of the diffusion model's) → images, about [−1, 1], (B, H, W, 3)."""
    if self.post_quant_conv is not None:
      z_bhwl = self.post_quant_conv(z_bhwl)  # B, h, w, L
    return self.decoder(z_bhwl, ctx=ctx)  # B, H, W, 3

  def scale_latents(self, z_bhwl: jax.Array) -> jax.Array:
    """The VAE's latents → the diffusion model's, as diffusers' pipelines do after `encode`."""
    return scale_latents(z_bhwl, self.config)

  def unscale_latents(self, latents_bhwl: jax.Array) -> jax.Array:
    """The diffusion model's latents → the VAE's, as diffusers' pipelines do before `decode`:
    latents·std/scaling_factor + mean with latents_mean/std, else latents/scaling_factor + shift_factor."""
    mean_l, std_l = _latent_statistics(self.config)
    return latents_bhwl * (std_l / self.config.scaling_factor) + mean_l  # B, h, w, L


def scale_latents(z_bhwl: jax.Array, config: VAEConfig) -> jax.Array:
  """The VAE's latents → the diffusion model's: (z − mean)·scaling_factor/std with
  latents_mean/std, else (z − shift_factor)·scaling_factor."""
  mean_l, std_l = _latent_statistics(config)
  return (z_bhwl - mean_l) * (config.scaling_factor / std_l)  # B, h, w, L


def posterior_mean_latents(moments_bhw2l: jax.Array, config: VAEConfig) -> jax.Array:
  """The encoder's moments (mean ‖ log-variance, (B, h, w, 2L)) → the diffusion model's latents of the
  posterior mean: what a model trained behind a frozen encoder that is not sampled learns to draw."""
  return scale_latents(moments_bhw2l[..., :config.latent_channels], config)  # B, h, w, L


def _latent_statistics(c: VAEConfig) -> tuple[jax.Array, jax.Array]:
  """(per-channel offset, per-channel std) of the latent map, (L,) each."""
  if c.latents_mean is not None:
    return jnp.asarray(c.latents_mean, jnp.float32), jnp.asarray(c.latents_std, jnp.float32)
  ones = jnp.ones((c.latent_channels,), jnp.float32)
  return ones * (c.shift_factor or 0.0), ones
