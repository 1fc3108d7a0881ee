"""Device meshes with the named axes dfjax's strategies shard over (sharding/axes.py).

Every dfjax mesh has all six axes, outermost first: data, cfg, stage, patch, ulysses, tensor; an
axis a run does not split has size 1, so every strategy can name any axis in its partition specs.
"""

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from sharding.axes import CFG, DATA, MESH_AXES, PATCH, STAGE, TENSOR, ULYSSES


def make_mesh(data: int = 1, cfg: int = 1, patch: int | None = None, *, stage: int = 1, ulysses: int = 1,
              tensor: int = 1, devices=None) -> Mesh:
  """Builds a (data, cfg, stage, patch, ulysses, tensor) mesh over `devices` (default: all devices of all processes).

  Args:
    data, cfg, stage, tensor: sizes of the batch, guidance, pipeline-stage and tensor axes.
    patch: size of the row-patch axis (USP's ring degree); None takes every device the other axes leave.
    ulysses: USP's Ulysses degree, the second split of the tokens (`make_mesh(patch=2, ulysses=4)`).
    devices: the devices to use, in order; a single-process run may use a prefix of them.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = {DATA: data, CFG: cfg, STAGE: stage, PATCH: patch, ULYSSES: ulysses, TENSOR: tensor}
  for name, size in sizes.items():
    if size is not None and (not isinstance(size, int) or size < 1):
      raise ValueError(f"make_mesh: {name}={size!r} must be a positive integer.")
  if cfg not in (1, 2):
    raise ValueError(f"make_mesh: cfg={cfg} must be 1 or 2 (guidance has two halves).")
  others = data * cfg * stage * ulysses * tensor
  named = " × ".join(f"{name}={size}" for name, size in sizes.items() if name != PATCH and size > 1) or "1"
  if patch is None:
    if len(devices) % others:
      raise ValueError(
          f"make_mesh: {named} does not divide the {len(devices)} devices; pass patch= explicitly or "
          "choose sizes whose product divides the device count.")
    sizes[PATCH] = patch = len(devices) // others
  size = others * patch
  if size > len(devices):
    shown = " × ".join(f"{name}={s}" for name, s in sizes.items() if s > 1) or "1"
    raise ValueError(
        f"make_mesh: {shown} = {size} devices, but only {len(devices)} are available "
        f"({devices[0].platform}). On a CPU, set XLA_FLAGS=--xla_force_host_platform_device_count={size} "
        "before jax starts (or pass --cpu-devices to the dfjax command).")
  if size < len(devices) and jax.process_count() > 1:
    raise ValueError(
        f"make_mesh: the mesh uses {size} of {len(devices)} devices; across "
        f"{jax.process_count()} processes every device must be in the mesh.")
  grid = np.asarray(devices[:size], dtype=object).reshape(tuple(sizes[name] for name in MESH_AXES))
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Explicit,) * len(MESH_AXES))


def parse_degrees(text: str) -> dict[str, int]:
  """'data=1,cfg=2,patch=2,tensor=2' → {axis: size}, the keyword degrees of `make_mesh`; unnamed axes are 1."""
  degrees = {}
  for item in filter(None, (part.strip() for part in text.split(","))):
    name, _, value = item.partition("=")
    if name not in MESH_AXES or not value.strip().isdigit():
      raise ValueError(f"mesh degree {item!r}: write AXIS=SIZE, comma-separated, with AXIS one of "
                       f"{', '.join(MESH_AXES)} (e.g. data=1,cfg=2,patch=2,tensor=2).")
    if name in degrees:
      raise ValueError(f"mesh degrees name {name!r} twice in {text!r}.")
    degrees[name] = int(value)
  return {name: degrees.get(name, 1) for name in MESH_AXES}


def axis_sizes(mesh: Mesh) -> dict[str, int]:
  """{axis name: size} of a dfjax mesh; a clear error for any other mesh."""
  if tuple(mesh.axis_names) != MESH_AXES:
    raise ValueError(f"mesh axes {tuple(mesh.axis_names)} are not dfjax's {MESH_AXES}: build the mesh with "
                     "dfjax.make_mesh (axes a run does not split have size 1).")
  return dict(mesh.shape)


def single_device_mesh() -> Mesh:
  """The mesh of one device that `sample` uses when given none, so the sharded path always runs."""
  return make_mesh(1, 1, 1, devices=jax.devices()[:1])


def describe(mesh: Mesh) -> str:
  """E.g. 'cfg=2×patch=4': the guidance and patch axes always, any other axis where it splits."""
  sizes = axis_sizes(mesh)
  return "×".join(f"{name}={size}" for name, size in sizes.items() if name in (CFG, PATCH) or size > 1)
