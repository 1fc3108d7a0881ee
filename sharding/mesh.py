"""Device meshes with the named axes dfjax's strategies shard over.

Axes, outermost first: `data` splits the batch, `cfg` splits the conditional / unconditional
halves of classifier-free guidance, `patch` splits the latent's rows (DistriFusion patches).
"""

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "cfg", "patch")


def make_mesh(data: int = 1, cfg: int = 1, patch: int | None = None, *, devices=None) -> Mesh:
  """Builds a (data, cfg, patch) mesh over `devices` (default: all devices of all processes).

  Args:
    data, cfg: sizes of the batch and guidance axes.
    patch: size of the row-patch axis; None takes every device the other axes leave.
    devices: the devices to use, in order; a single-process run may use a prefix of them.
  """
  devices = list(jax.devices() if devices is None else devices)
  for name, size in (("data", data), ("cfg", cfg), ("patch", patch)):
    if size is not None and (not isinstance(size, int) or size < 1):
      raise ValueError(f"make_mesh: {name}={size!r} must be a positive integer.")
  if cfg not in (1, 2):
    raise ValueError(f"make_mesh: cfg={cfg} must be 1 or 2 (guidance has two halves).")
  if patch is None:
    if len(devices) % (data * cfg):
      raise ValueError(
          f"make_mesh: data={data} × cfg={cfg} does not divide the {len(devices)} devices; "
          "pass patch= explicitly or choose sizes whose product divides the device count.")
    patch = len(devices) // (data * cfg)
  size = data * cfg * patch
  if size > len(devices):
    raise ValueError(
        f"make_mesh: data={data} × cfg={cfg} × patch={patch} = {size} devices, but only "
        f"{len(devices)} are available ({devices[0].platform}). On a CPU, set "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={size} before jax starts.")
  if size < len(devices) and jax.process_count() > 1:
    raise ValueError(
        f"make_mesh: the mesh uses {size} of {len(devices)} devices; across "
        f"{jax.process_count()} processes every device must be in the mesh.")
  grid = np.asarray(devices[:size], dtype=object).reshape(data, cfg, patch)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Explicit,) * len(MESH_AXES))


def axis_sizes(mesh: Mesh) -> dict[str, int]:
  """{axis name: size} for the dfjax axes, 1 for any the mesh lacks."""
  missing = set(mesh.axis_names) - set(MESH_AXES)
  if missing:
    raise ValueError(f"mesh axes {mesh.axis_names} include {sorted(missing)}; dfjax meshes have "
                     f"axes {MESH_AXES}: build one with dfjax.make_mesh.")
  return {name: mesh.shape.get(name, 1) for name in MESH_AXES}


def single_device_mesh() -> Mesh:
  """The 1×1×1 mesh `sample` uses when given none, so the sharded path always runs."""
  return make_mesh(1, 1, 1, devices=jax.devices()[:1])

