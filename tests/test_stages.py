"""Pipeline stages: which params each segment reads (traced) covers every param once; the balanced
cut is the best one (against brute force); a model packed by stage and run stage after stage on
a `stage` mesh (sharding/strategies/staged.py's synchronous forward) equals the model on one
device, with each device holding only its stage's params."""

import itertools

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from models.config import UNetConfig
from models.dit import DiTTransformer2DModel, PixArtTransformer2DModel
from models.dit_config import DiTConfig, PixArtConfig
from models.parallel import SINGLE_DEVICE
from models.unet import UNet2DConditionModel
from sharding.mesh import make_mesh
from sharding.stage_params import StagedParams, leaf_paths, params_by_segment
from sharding.strategies.staged import balanced_cuts, check_cuts, stages_of, synchronous_forward
from test_dit import TINY_DIT, TINY_PIXART_ALPHA
from test_unet import CONFIGS, inputs


def _unet(name):
  model = UNet2DConditionModel(UNetConfig.from_diffusers_config(CONFIGS[name]), rngs=nnx.Rngs(0))
  args = inputs(name, 2)
  return model, args.pop("x"), args


def _dit():
  model = DiTTransformer2DModel(DiTConfig.from_diffusers_config(TINY_DIT), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  return model, rng.normal(size=(2, 8, 8, 4)).astype(np.float32), {"class_labels": np.array([1, 7])}


def _pixart():
  model = PixArtTransformer2DModel(PixArtConfig.from_diffusers_config(TINY_PIXART_ALPHA), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  cond = {"encoder_hidden_states": rng.normal(size=(2, 5, 20)).astype(np.float32),
          "encoder_attention_mask": np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.float32),
          "resolution": np.array([[64.0, 64.0]] * 2, np.float32), "aspect_ratio": np.ones((2, 1), np.float32)}
  return model, rng.normal(size=(2, 8, 8, 4)).astype(np.float32), cond


MODELS = {"sd15": lambda: _unet("sd15"), "sdxl": lambda: _unet("sdxl"), "dit": _dit, "pixart": _pixart}
_SLOW = pytest.mark.slow


@pytest.mark.parametrize("name", ["sd15", "dit", pytest.param("sdxl", marks=_SLOW), pytest.param("pixart", marks=_SLOW)])
def test_every_param_is_read_by_exactly_one_segment(name):
  model, x, cond = MODELS[name]()
  read = params_by_segment(model, x, np.float32(10.0), **cond)
  assert len(read) == len(model.segments())
  paths = leaf_paths(nnx.split(model)[1])
  counts = np.bincount([leaf for r in read for leaf in r], minlength=len(paths))
  assert all(counts == 1), {paths[i]: int(c) for i, c in enumerate(counts) if c != 1}
  # the tracing is not vacuous: the first segment reads conv_in / the patch embedding, the last the output layer
  assert any("conv_in" in paths[i] or "pos_embed" in paths[i] for i in read[0])
  assert any("out" in paths[i] for i in read[-1])


def _brute_force(costs, stages):
  return min(max(sum(costs[a:b]) for a, b in zip((0, *cuts), (*cuts, len(costs))))
             for cuts in itertools.combinations(range(1, len(costs)), stages - 1))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_balanced_cuts_minimise_the_largest_stage(seed, stages):
  costs = list(np.random.default_rng(seed).uniform(0.1, 5.0, size=9))
  cuts = balanced_cuts(costs, stages)
  assert len(cuts) == stages - 1 and list(cuts) == sorted(set(cuts))
  largest = max(sum(costs[a:b]) for a, b in zip((0, *cuts), (*cuts, len(costs))))
  assert largest == pytest.approx(_brute_force(costs, stages))


def test_bad_cuts_name_the_segments():
  names = ["embed", "down_blocks.0", "mid_block", "up_blocks.0", "out"]
  for cuts in [(2,), (3, 2), (0, 2), (2, 5), (2, 2)]:
    with pytest.raises(ValueError, match="strictly increasing segment indices.*0 embed, 1 down_blocks.0"):
      check_cuts(cuts, names, 3)
  check_cuts((1, 4), names, 3)
  with pytest.raises(ValueError, match="cannot cut 5 segments into 6 stages: use 1 to 5"):
    balanced_cuts([1.0] * 5, 6)


class _StageRun:
  """The part of dfjax.sampling's device run the synchronous forward uses: each stage's model."""

  def __init__(self, graphdef, staged, local):
    self.graphdef, self.staged, self.local = graphdef, staged, local

  def model(self, stage):
    return nnx.merge(self.graphdef, self.staged.unpack(self.local, stage))


@pytest.mark.parametrize("name,stages", [("dit", 2), pytest.param("sd15", 2, marks=_SLOW),
                                         pytest.param("sd15", 4, marks=_SLOW), pytest.param("pixart", 3, marks=_SLOW)])
def test_synchronous_stages_equal_one_device(name, stages):
  model, x, cond = MODELS[name]()
  t = np.float32(321.0)
  expected = np.asarray(model(x, t, **cond))
  graphdef, state = nnx.split(model)
  cuts = balanced_cuts([1.0] * len(model.segments()), stages)
  staged = StagedParams.plan(state, params_by_segment(model, x, t, **cond), stages_of(cuts, len(model.segments())))
  mesh = make_mesh(stage=stages, patch=1, devices=jax.devices()[:stages])
  specs = staged.specs()
  placed = jax.device_put(staged.pack(state), jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
  stage_of = stages_of(cuts, len(model.segments()))

  def on_device(local, x, cond):
    return synchronous_forward(_StageRun(graphdef, staged, local), stage_of, x, t, cond, SINGLE_DEVICE)

  run = jax.jit(jax.shard_map(on_device, mesh=mesh, in_specs=(specs, P(), P()), out_specs=P()))
  np.testing.assert_allclose(np.asarray(run(placed, x, cond)), expected, rtol=1e-5, atol=1e-5)
  # each device holds its own stage's row, not the model
  rows = placed["rows"]["float32"]
  assert rows.addressable_shards[0].data.shape == (1, max(staged.stage_bytes()) // 4)
  assert staged.bytes_per_device() < sum(staged.stage_bytes())
