"""The UNet's segments: run one by one with the carry handed over explicitly (as a pipeline would)
they give the full forward, on one device and under the exact patch context; each segment's
analytic FLOPs agree with XLA's cost analysis of that segment alone; the context requests each
segment reports are the ones its layers make when it runs; names and order are stable."""

import functools

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dfjax.bench.flops import analytic_unet_flops, segment_flops
from models.config import UNetConfig
from models.layers import Workload
from models.parallel import ParallelContext
from models.build import segment_costs
from models.unet import UNet2DConditionModel, UNetCarry
from sharding.axes import PATCH
from sharding.contexts.patch import PatchContext
from sharding.mesh import make_mesh
from test_unet import CONFIGS, HEIGHT, TOKENS, WIDTH, inputs, relative_error  # SD1.5- and SDXL-shaped configs

COMPILE = {"xla_backend_optimization_level": 0}  # halves CPU compile time; the maths is unchanged


@functools.cache
def model(name: str) -> UNet2DConditionModel:
  return UNet2DConditionModel(UNetConfig.from_diffusers_config(CONFIGS[name]), rngs=nnx.Rngs(0))


def forward_args(name: str) -> dict:
  """Random keyword arguments of the forward, batch 2, for tests/test_unet.py's config `name`."""
  return dict(inputs(name, 2), timesteps=np.array([3.0, 870.0], np.float32))


def full_forward(unet: UNet2DConditionModel, args: dict) -> np.ndarray:
  graphdef, state = nnx.split(unet)
  forward = jax.jit(lambda state, args: nnx.merge(graphdef, state)(**args), compiler_options=COMPILE)
  return np.asarray(forward(state, args))


def one_segment(graphdef, index: int, ctx: ParallelContext):
  """Segment `index` of the model as a function of (state, carry), as a pipeline stage would run it."""
  return lambda state, carry: nnx.merge(graphdef, state).segments()[index](carry, ctx=ctx)


def carry_spec(carry: UNetCarry) -> UNetCarry:
  """Rows split over `patch` for the image-shaped parts (hidden state, skips), the rest replicated."""
  return UNetCarry(P(None, PATCH), tuple(P(None, PATCH) for _ in carry.skips),
                   None if carry.temb_be is None else P(), P(), {k: P() for k in carry.embedding_inputs})


# ---------------------------------------------------------------------------------- the carry handed over

@pytest.mark.slow  # 32 s (sd15), 11 s (sdxl); each segment's FLOPs and the stage tests stay in the default run
@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_segments_one_by_one_give_the_full_forward(name):
  unet = model(name)
  args = forward_args(name)
  graphdef, state = nnx.split(unet)
  carry = unet.first_carry(**args)
  for index, segment in enumerate(unet.segments()):
    carry = jax.jit(one_segment(graphdef, index, ParallelContext()), compiler_options=COMPILE)(state, carry)
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(carry)), segment.name
  assert carry.skips == () and carry.embedding_inputs == {}
  assert relative_error(carry.h_bhwc, full_forward(unet, args)) <= 1e-6


@pytest.mark.slow  # 25 s (sd15), 17 s (sdxl)
@pytest.mark.parametrize("name,patches", [("sd15", 2), ("sdxl", 4)])
def test_segments_one_by_one_on_row_patches_give_the_full_forward(name, patches):
  """Each segment its own shard_map program under the exact patch context; carry rows stay split."""
  unet = model(name)
  args = forward_args(name)
  graphdef, state = nnx.split(unet)
  mesh = make_mesh(1, 1, patches)
  carry = unet.first_carry(**args)
  structure = carry  # the global (unsplit) carry each segment hands on, abstract
  carry = jax.device_put(carry, jax.tree.map(lambda spec: NamedSharding(mesh, spec), carry_spec(carry)))
  for index, _ in enumerate(unet.segments()):
    run = one_segment(graphdef, index, PatchContext(patches))
    in_spec = carry_spec(structure)
    structure = jax.eval_shape(one_segment(graphdef, index, ParallelContext()), state, structure)
    carry = jax.jit(jax.shard_map(run, mesh=mesh, in_specs=(P(), in_spec), out_specs=carry_spec(structure)),
                    compiler_options=COMPILE)(state, carry)
  assert relative_error(carry.h_bhwc, full_forward(unet, args)) <= 1e-5


# ---------------------------------------------------------------------------------- FLOPs and exchanges

# Wide channels, as in tests/test_bench.py: XLA also counts elementwise work, ~1 % here. out_channels
# as wide as the first level, so that the head's conv_out dominates its GroupNorm and SiLU too.
WIDE = dict(CONFIGS["sdxl"], block_out_channels=(128, 256), layers_per_block=1, attention_head_dim=(2, 4),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), transformer_layers_per_block=(1, 2),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), out_channels=128)


def test_each_segments_flops_match_xla_cost_analysis():
  config = UNetConfig.from_diffusers_config(WIDE)
  unet = nnx.eval_shape(lambda: UNet2DConditionModel(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(unet)
  args = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in forward_args("sdxl").items()}  # fit WIDE
  carry = jax.eval_shape(lambda args: nnx.merge(graphdef, state).first_carry(**args), args)
  analytic = segment_flops(config, HEIGHT, WIDTH, batch=2, text_tokens=TOKENS, padded=False)
  assert list(analytic) == [s.name for s in unet.segments()]
  assert sum(analytic.values()) == analytic_unet_flops(config, HEIGHT, WIDTH, 2, TOKENS, padded=False)
  for index, (name, flops) in enumerate(analytic.items()):
    step = jax.jit(one_segment(graphdef, index, ParallelContext()), compiler_options=COMPILE)
    cost = step.lower(state, carry).compile().cost_analysis()
    xla = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
    assert xla == pytest.approx(flops, rel=0.03), name
    carry = jax.eval_shape(step, state, carry)


class Requests(ParallelContext):
  """One device; lists every request as (kind, key, rows, cols, channels, halo rows), in call order."""

  def __init__(self):
    self.seen = []

  def conv_halo(self, x_bhwc, rows, key):
    _, h, w, c = x_bhwc.shape
    self.seen.append(("halo", key, h, w, c, rows))
    return super().conv_halo(x_bhwc, rows, key)

  def input_halo(self, x_bhwc, rows, key):
    _, h, w, c = x_bhwc.shape
    self.seen.append(("input_halo", key, h, w, c, rows))
    return super().conv_halo(x_bhwc, rows, key)  # the single-device answer, without listing it again

  def attend(self, q_btnd, k_btnd, v_btnd, key):
    _, t, n, d = k_btnd.shape
    self.seen.append(("kv", key, t, n * d))
    return super().attend(q_btnd, k_btnd, v_btnd, key)

  def norm_moments(self, moments_bg2, key):
    self.seen.append(("moments", key, moments_bg2.shape[1]))
    return super().norm_moments(moments_bg2, key)

  def reduce_partial_sums(self, y, key):
    self.seen.append(("partial_sums", key, y.shape[-1]))
    return super().reduce_partial_sums(y, key)


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_each_segment_reports_the_requests_its_layers_make(name):
  unet = model(name)
  graphdef, state = nnx.split(unet)
  args = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in forward_args(name).items()}
  carry = jax.eval_shape(lambda args: nnx.merge(graphdef, state).first_carry(**args), args)
  costs = segment_costs(unet.config, Workload(HEIGHT, WIDTH, TOKENS))
  for index, (segment_name, cost) in enumerate(costs.items()):
    requests = Requests()
    carry = jax.eval_shape(one_segment(graphdef, index, requests), state, carry)
    reported = [(e.kind, e.key, e.rows, e.cols, e.channels, e.halo_rows) if e.kind.endswith("halo") else
                (e.kind, e.key, e.rows * e.cols, e.channels) if e.kind == "kv" else
                (e.kind, e.key, e.channels) for e in cost.exchanges]
    assert reported == requests.seen and requests.seen, segment_name


# ---------------------------------------------------------------------------------- names and order

def test_segment_names_and_order():
  sd15, sdxl = model("sd15"), model("sdxl")
  assert [s.name for s in sd15.segments()] == [
      "embed", "down_blocks.0", "down_blocks.1", "down_blocks.2", "down_blocks.3", "mid_block",
      "up_blocks.0", "up_blocks.1", "up_blocks.2", "up_blocks.3", "out"]
  assert [s.name for s in sdxl.segments()] == [
      "embed", "down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block",
      "up_blocks.0", "up_blocks.1", "up_blocks.2", "out"]
  costs = segment_costs(sdxl.config, Workload(HEIGHT, WIDTH, TOKENS))
  assert list(costs) == [s.name for s in sdxl.segments()]
  prefixes = {"embed": ("conv_in",), "out": ("conv_norm_out", "conv_out")}
  for name, cost in costs.items():  # a block segment's requests come from the block of that name
    assert all(e.key.startswith(prefixes.get(name, (name + ".",))) for e in cost.exchanges), name
