"""VAE decode in one jit, one image's rows split over the mesh axis `patch` (exact patch parallelism).

`decode_latents` maps the diffusion model's latents to the VAE's (`unscale_latents`) and decodes
them with `shard_map` over the mesh: every device decodes its equal share of the latent rows with
the exact patch context (sharding/contexts/patch.py), which gives each 3×3 conv this step's halo
rows from its neighbours, makes every GroupNorm's moments image-wide and gathers the mid-block
attention's K/V. All of it is synchronous, so the result is the single-device decode's, while each
device holds only its rows of every activation: about 1/N of the memory, the point of DistVAE
(xDiT), which decodes 10240-pixel images where one GPU runs out of memory at 8192. Nearest-neighbour
upsampling needs no other rows, so nothing else changes between one device and N.

Batch entries split over the mesh axis `data`; other axes (cfg, stage, tensor) hold copies.

Shape letters: B batch, h, w latent rows and columns, L latent channels, H, W image rows and columns.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from models.parallel import SINGLE_DEVICE
from models.vae import AutoencoderKL
from sharding.axes import DATA, PATCH
from sharding.contexts.patch import PatchContext
from sharding.mesh import axis_sizes, single_device_mesh
from sharding.partitioning import AxisRules, param_specs

_ROWS = P(DATA, PATCH)  # latents and images: batch over data, rows over patch


@dataclasses.dataclass(frozen=True)
class DecodeProgram:
  """`decode_latents`' program lowered, and the placed inputs its compiled form runs on:
  `lowered.compile()(*inputs)` returns the images `decode_latents` does."""

  lowered: jax.stages.Lowered
  inputs: tuple


def decode_latents(vae: AutoencoderKL, latents: jax.Array, *, mesh: Mesh | None = None) -> jax.Array:
  """The images of the diffusion model's `latents`, decoded by `vae` in one jitted program.

  Args:
    vae: an `AutoencoderKL` (models/vae.py).
    latents: (B, h, w, L) latents as the diffusion model samples them (scaled: `decode_latents`
      applies the VAE's `unscale_latents`), NHWC.
    mesh: a `dfjax.make_mesh` mesh; its `patch` axis splits the latent rows (an equal share per
      device), `data` the batch. None decodes on one device.
  Returns:
    (B, f·h, f·w, out_channels) images, about [−1, 1] as diffusers' `vae.decode(...).sample`
    (`(x / 2 + 0.5).clip(0, 1)` is its pipelines' `output_type="np"`), rows laid out over `patch`.
  Raises:
    ValueError: latents that are not (B, h, w, L) with the VAE's L, a batch that does not split over
      `data`, latent rows that do not split over `patch` (naming the valid patch counts).
  """
  graphdef, inputs, mesh = _prepare(vae, latents, mesh)
  return _decode_jit(graphdef, *inputs, mesh=mesh)


def prepare_decode(vae: AutoencoderKL, latents: jax.Array, *, mesh: Mesh | None = None) -> DecodeProgram:
  """`decode_latents`' program and inputs (same arguments), to compile and run apart: to time it or
  read its compiled memory analysis."""
  graphdef, inputs, mesh = _prepare(vae, latents, mesh)
  return DecodeProgram(_decode_jit.lower(graphdef, *inputs, mesh=mesh), inputs)


def _prepare(vae, latents, mesh):
  """Checks `decode_latents`' arguments; returns the VAE's graph, the placed (params, latents) and the mesh."""
  if not isinstance(vae, AutoencoderKL):
    raise ValueError(f"vae must be a dfjax AutoencoderKL (models/vae.py), got {type(vae).__name__}.")
  mesh = single_device_mesh() if mesh is None else mesh
  sizes = axis_sizes(mesh)
  channels = vae.config.latent_channels
  if not isinstance(latents, (np.ndarray, jax.Array)) or latents.ndim != 4 or latents.shape[-1] != channels:
    shape = tuple(getattr(latents, "shape", ())) or type(latents).__name__
    raise ValueError(f"latents must be an NHWC array (B, h, w, {channels}) for this VAE "
                     f"(latent_channels={channels}), got {shape}.")
  batch, height, width, _ = latents.shape
  if batch < 1 or batch % sizes[DATA]:
    raise ValueError(f"latents have batch {batch}, which does not split over data={sizes[DATA]} devices: "
                     f"use a positive multiple of {sizes[DATA]} or a smaller data axis.")
  vae.config.check_latent_size(height, width, row_splits=sizes[PATCH])
  graphdef, params = nnx.split(vae)
  specs = param_specs(params, AxisRules.replicated(), sizes)
  params = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
  return graphdef, (params, jax.device_put(latents, NamedSharding(mesh, _ROWS))), mesh


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh"))
def _decode_jit(graphdef, params, latents, *, mesh: Mesh):
  patches = axis_sizes(mesh)[PATCH]
  ctx = PatchContext(patches) if patches > 1 else SINGLE_DEVICE  # synchronous: the single-device maths

  def on_device(params, latents_bhwl):
    vae = nnx.merge(graphdef, params)
    return vae.decode(vae.unscale_latents(latents_bhwl), ctx=ctx)  # B, H/n, W, 3: this device's rows

  specs = param_specs(params, AxisRules.replicated(), axis_sizes(mesh))
  return jax.shard_map(on_device, mesh=mesh, in_specs=(specs, _ROWS), out_specs=_ROWS)(params, latents)
