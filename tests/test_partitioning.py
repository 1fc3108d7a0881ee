"""Logical param axes and the rule tables that map them to mesh axes (sharding/partitioning.py).

The SDXL preset's every param path, shape and logical axes are pinned in a golden file. After an
intended change to the model's params or their axis names, regenerate it and review the diff:

    python -m tests.test_partitioning
"""

import pathlib

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from dfjax.sampling import Conditioning, lower_sample, sample
from models.config import UNetConfig
from models.layers import EMBED, HEADS
from models.presets import unet_preset
from models.unet import UNet2DConditionModel
from sharding.axes import MESH_AXES, TENSOR
from sharding.mesh import make_mesh
from sharding.partitioning import AxisRules, param_specs
from sharding.strategies import Strategy

GOLDEN = pathlib.Path(__file__).parent / "golden" / "sdxl_param_axes.txt"
TENSOR_2 = {**dict.fromkeys(MESH_AXES, 1), TENSOR: 2}  # mesh axis sizes
TENSOR_3 = {**TENSOR_2, TENSOR: 3}


def _abstract_params(preset: str) -> nnx.State:
  config = UNetConfig.from_diffusers_config(unet_preset(preset))
  return nnx.state(nnx.eval_shape(lambda: UNet2DConditionModel(config, rngs=nnx.Rngs(0))))


def _flat(params: nnx.State) -> dict[str, nnx.Variable]:
  return {".".join(map(str, path)): variable for path, variable in nnx.to_flat_state(params)}


def param_axes_listing(params: nnx.State) -> str:
  """One line per param, sorted: `path  shape  logical axes`."""
  lines = [f"{path}  {'x'.join(map(str, v.shape))}  {','.join(v.get_metadata('out_sharding', ()))}"
           for path, v in _flat(params).items()]
  return "\n".join(sorted(lines)) + "\n"


@pytest.fixture(scope="module")
def sdxl():
  return _abstract_params("sdxl")


@pytest.fixture(scope="module")
def tiny():
  return _abstract_params("tiny-sdxl")


def test_sdxl_param_axes_match_the_golden_file(sdxl):
  expected, live = GOLDEN.read_text().splitlines(), param_axes_listing(sdxl).splitlines()
  gone, new = sorted(set(expected) - set(live)), sorted(set(live) - set(expected))
  assert not gone and not new, (
      f"the SDXL params differ from {GOLDEN.name}: {len(gone)} lines gone, {len(new)} new; first gone: "
      f"{gone[:3]}, first new: {new[:3]}. If intended, regenerate it: `python -m tests.test_partitioning`.")


@pytest.mark.parametrize("preset", ["sdxl", "tiny-sd15"])  # linear and 1×1-conv attention projections
def test_every_param_names_each_of_its_axes(preset, sdxl):
  params = sdxl if preset == "sdxl" else _abstract_params(preset)
  for path, variable in _flat(params).items():
    names = variable.get_metadata("out_sharding", None)
    assert names is not None and len(names) == variable.ndim, (path, variable.shape, names)


def test_the_default_table_replicates_every_param(sdxl):
  specs = param_specs(sdxl, Strategy.single().param_rules(), TENSOR_2)
  assert set(jax.tree.leaves(specs)) == {P()}
  assert jax.tree.structure(specs) == jax.tree.structure(sdxl)  # usable as shardings / in_specs


def test_heads_over_tensor_split_attention_projections_by_column_and_row(tiny):
  rules = AxisRules.replicated().with_rules({HEADS: TENSOR})
  specs = _flat(param_specs(tiny, rules, TENSOR_2))
  attn = "mid_block.attentions.0.transformer_blocks.0.attn1"
  assert specs[f"{attn}.to_q.kernel"].get_value() == P(None, TENSOR)  # (embed, heads): column-parallel
  assert specs[f"{attn}.to_k.kernel"].get_value() == P(None, TENSOR)
  assert specs[f"{attn}.to_out.kernel"].get_value() == P(TENSOR)  # (heads, embed): row-parallel
  assert specs[f"{attn}.to_out.bias"].get_value() == P()
  projections = (".to_q.kernel", ".to_k.kernel", ".to_v.kernel", ".to_out.kernel")
  split = {path for path, spec in specs.items() if spec.get_value() != P()}
  assert split == {path for path in specs if path.endswith(projections)}


def test_a_size_that_does_not_divide_names_the_param_and_the_valid_sizes(tiny):
  rules = AxisRules.replicated().with_rules({HEADS: TENSOR})
  # tiny-sdxl attends only at its 64-channel levels (its 32-channel level is a DownBlock2D): divisors of 64
  valid = "1, 2, 4, 8, 16, 32, 64"
  with pytest.raises(ValueError, match=rf"tensor=3 does not divide its 'heads' axis .*: {valid}\.$"):
    param_specs(tiny, rules, TENSOR_3)


def test_tables_that_do_not_fit_are_refused_clearly(tiny):
  with pytest.raises(ValueError, match=r"logical axis '\w+', which the axis rules do not know"):
    param_specs(tiny, AxisRules(()), TENSOR_2)
  with pytest.raises(ValueError, match="unknown logical axes"):
    AxisRules.replicated().with_rules({"headz": TENSOR})
  with pytest.raises(ValueError, match="not a mesh axis"):
    AxisRules.replicated().with_rules({HEADS: "model"})
  with pytest.raises(ValueError, match="one mesh axis cannot split two axes"):
    param_specs(tiny, AxisRules.replicated().with_rules({HEADS: TENSOR, EMBED: TENSOR}), TENSOR_2)


SD_SCHEDULER = {"beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
                "steps_offset": 1}


@pytest.fixture(scope="module")
def sampling_args():
  model = UNet2DConditionModel(UNetConfig.from_diffusers_config(unet_preset("tiny-sd15")), rngs=nnx.Rngs(0))
  keys = jax.random.split(jax.random.key(1), 3)
  noise = jax.random.normal(keys[0], (1, 16, 8, model.config.in_channels))
  context = lambda key: Conditioning(jax.random.normal(key, (1, 5, model.config.encoder_dim)))
  kwargs = dict(uncond=context(keys[2]), num_steps=2, scheduler_config=SD_SCHEDULER)
  return (model, noise, context(keys[1])), kwargs


def test_sampling_through_the_default_table_on_two_patches_equals_single(sampling_args):
  args, kwargs = sampling_args
  single = np.asarray(sample(*args, **kwargs))
  exact = np.asarray(sample(*args, mesh=make_mesh(1, 1, 2), strategy=Strategy.exact(), **kwargs))
  np.testing.assert_allclose(exact, single, rtol=0, atol=1e-5 * np.abs(single).max())


def test_the_default_table_leaves_the_program_as_with_every_param_replicated(sampling_args, monkeypatch):
  args, kwargs = sampling_args
  kwargs = dict(kwargs, mesh=make_mesh(1, 1, 2), strategy=Strategy.exact())
  through_table = lower_sample(*args, **kwargs).as_text()
  monkeypatch.setattr("dfjax.sampling._param_specs", lambda plan, params: P())  # the former placement
  assert through_table == lower_sample(*args, **kwargs).as_text()


if __name__ == "__main__":
  GOLDEN.parent.mkdir(exist_ok=True)
  GOLDEN.write_text(param_axes_listing(_abstract_params("sdxl")))
  print(f"wrote {GOLDEN}")
