"""make_mesh's shapes and its errors, and the refusal of meshes dfjax did not build."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from dfjax.sampling import Conditioning, sample
from models.config import UNetConfig
from models.unet import UNet2DConditionModel
from sharding.axes import CFG, DATA, MESH_AXES, PATCH, STAGE, TENSOR, ULYSSES
from sharding.mesh import axis_sizes, describe, make_mesh


def test_patch_takes_the_devices_the_other_axes_leave():
  assert jax.device_count() == 8  # tests/conftest.py
  assert axis_sizes(make_mesh()) == {DATA: 1, CFG: 1, STAGE: 1, PATCH: 8, ULYSSES: 1, TENSOR: 1}
  assert axis_sizes(make_mesh(2, 2)) == {DATA: 2, CFG: 2, STAGE: 1, PATCH: 2, ULYSSES: 1, TENSOR: 1}
  assert axis_sizes(make_mesh(ulysses=4))[PATCH] == 2  # USP's two degrees: patch takes what ulysses leaves
  mesh = make_mesh(1, 2, 2)  # a prefix of the devices, in order
  assert axis_sizes(mesh)[PATCH] == 2 and list(mesh.devices.flat) == jax.devices()[:4]
  assert describe(mesh) == "cfg=2×patch=2"
  assert describe(make_mesh(tensor=2, patch=1)) == "cfg=1×patch=1×tensor=2"


@pytest.mark.parametrize("sizes, named", [
    ({"data": 0}, "data=0"), ({"patch": -1}, "patch=-1"), ({"tensor": 1.5}, "tensor=1.5"),
    ({"stage": "2"}, "stage='2'"), ({"cfg": 0}, "cfg=0"),
])
def test_sizes_must_be_positive_integers(sizes, named):
  with pytest.raises(ValueError, match=f"make_mesh: {named} must be a positive integer"):
    make_mesh(**sizes)


@pytest.mark.parametrize("cfg", [3, 4])
def test_cfg_is_one_or_two(cfg):
  with pytest.raises(ValueError, match=f"cfg={cfg} must be 1 or 2"):
    make_mesh(1, cfg, 1)


def test_more_devices_than_there_are_names_the_flag_and_the_option():
  with pytest.raises(ValueError) as error:
    make_mesh(1, 2, 8)
  message = str(error.value)
  assert "cfg=2 × patch=8 = 16 devices, but only 8 are available (cpu)" in message
  assert "XLA_FLAGS=--xla_force_host_platform_device_count=16" in message and "--cpu-devices" in message
  with pytest.raises(ValueError, match="patch=3 = 3 devices, but only 2"):
    make_mesh(patch=3, devices=jax.devices()[:2])
  with pytest.raises(ValueError, match="patch=4 × ulysses=4 = 16 devices, but only 8"):
    make_mesh(patch=4, ulysses=4)


@pytest.mark.parametrize("sizes, named", [({"data": 3}, "data=3"),
                                          ({"cfg": 2, "tensor": 3}, "cfg=2 × tensor=3"),
                                          ({"ulysses": 3}, "ulysses=3")])
def test_sizes_that_do_not_divide_the_devices_need_an_explicit_patch(sizes, named):
  with pytest.raises(ValueError, match=f"make_mesh: {named} does not divide the 8 devices; pass patch="):
    make_mesh(**sizes)
  assert axis_sizes(make_mesh(**sizes, patch=1))[PATCH] == 1  # the fix the message names


FOREIGN_MESHES = {
    "one axis": lambda: jax.make_mesh((8,), ("rows",)),
    "dfjax's axes reordered": lambda: Mesh(np.asarray(jax.devices()[:1]).reshape((1,) * len(MESH_AXES)), MESH_AXES[::-1]),
}


@pytest.mark.parametrize("build", FOREIGN_MESHES.values(), ids=FOREIGN_MESHES.keys())
def test_a_mesh_dfjax_did_not_build_is_refused(build):
  mesh = build()
  with pytest.raises(ValueError, match=r"are not dfjax's .* build the mesh with dfjax.make_mesh"):
    axis_sizes(mesh)
  config = UNetConfig.from_diffusers_config({
      "block_out_channels": [32], "layers_per_block": 1, "norm_num_groups": 8, "attention_head_dim": 4,
      "cross_attention_dim": 32, "down_block_types": ["CrossAttnDownBlock2D"],
      "up_block_types": ["CrossAttnUpBlock2D"]})
  model = nnx.eval_shape(lambda: UNet2DConditionModel(config, rngs=nnx.Rngs(0)))  # no weights: refused first
  text = Conditioning(np.zeros((1, 5, 32), np.float32))
  with pytest.raises(ValueError, match="are not dfjax's"):  # before any tracing
    sample(model, np.zeros((1, 8, 8, 4), np.float32), text, uncond=text, num_steps=2, mesh=mesh)
