"""AsyncDiff through `dfjax.sample` on 8 virtual CPU devices, fp32.

With every step in warm-up it equals `single`. After warm-up it equals an independent one-device
reference of the method written here from the UNet's own carry (each component on its makers'
outputs of the previous iteration, a skip taken from the component that pushed it, the time
embedding of the component's own step), and stays close to `single`. The compiled program's
asynchronous steps consume none of their collectives, and their traffic equals the analytic volume
(sharding/accounting/stages.py), as do the transfers traced from the model. On a tiny DiT and
PixArt (four blocks) the same strategy is exact with every step in warm-up, cfg composing, and each
device carries only the token grids it receives.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dfjax import schedulers
from dfjax.sampling import lower_sample, sample, stale_buffer_shapes
from models.config import UNetConfig
from models.dit import DiTConfig, DiTTransformer2DModel, PixArtTransformer2DModel
from models.dit_config import PixArtConfig
from models.unet import UNet2DConditionModel, UNetCarry
from sharding.accounting import comm
from sharding.accounting import stages as stage_accounting
from sharding.mesh import axis_sizes, make_mesh
from sharding.stage_carry import CarryLayout
from sharding.strategies import Strategy
from test_pipefusion import HEIGHT as DIT_HEIGHT
from test_pipefusion import TINY_DIT, TINY_PIXART
from test_pipefusion import WIDTH as DIT_WIDTH
from test_pipefusion import _args as dit_args
from test_pipefusion import _error as relative_error
from test_pipefusion import _perturb as perturb
from test_pipefusion import _run as run_dit
from test_strategies import SD_SCHEDULER, TWO_LEVEL_UNET, _inputs

STEPS, SIDE, GUIDANCE = 4, 8, 5.0  # 4 steps: with warm-up 1, stride 2 ends with a half pair
_SLOW = pytest.mark.slow
# The latents reach ~25 and the reference is another XLA program (fp32 sums in another order): a
# wrong input, step or timestep anywhere moves them by ~1.
REFERENCE_TOLERANCE = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def model():
  return UNet2DConditionModel(UNetConfig.from_diffusers_config(TWO_LEVEL_UNET), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def args(model):
  noise, cond, uncond = _inputs(model.config, SIDE, SIDE)
  return noise, cond, uncond


@pytest.fixture(scope="module")
def reference(model, args):
  """The one-device reference of (components, stride), warm-up 1, computed once per module."""
  return functools.cache(lambda components, stride: _reference(model, args, components, stride, 1))


@pytest.fixture(scope="module")
def single(model, args):
  noise, cond, uncond = args
  return np.asarray(sample(model, noise, cond, uncond=uncond, num_steps=STEPS, scheduler_config=SD_SCHEDULER))


def _mesh(components, stride, cfg=1):
  devices = components + stride - 1
  return make_mesh(1, cfg, 1, stage=devices, devices=jax.devices()[:cfg * devices])


def _kwargs(args, components, stride, warmup, cfg=1):
  return dict(uncond=args[2], num_steps=STEPS, scheduler_config=SD_SCHEDULER, guidance_scale=GUIDANCE,
              mesh=_mesh(components, stride, cfg), strategy=Strategy.asyncdiff(stride=stride, warmup_steps=warmup))


def _asyncdiff(model, args, components, stride, warmup, cfg=1):
  return np.asarray(sample(model, args[0], args[1], **_kwargs(args, components, stride, warmup, cfg)))


# ---------------------------------------------------------------------------------- an independent reference

def _reference(model, args, components, stride, warmup):
  """AsyncDiff on one device, from the UNet's carry fields: iteration i (steps i .. i + stride − 1)
  runs component c on the previous iteration's outputs (component 0 on the latent), the last
  component once per step of the iteration; the predictions are applied at the next iteration."""
  noise, cond, uncond = args
  sched = schedulers.make_scheduler("ddim", schedulers.SchedulerConfig.from_diffusers_config(SD_SCHEDULER), STEPS)
  strategy = Strategy.asyncdiff(stride=stride, warmup_steps=warmup)
  sizes = axis_sizes(_mesh(components, stride))
  owner = strategy.stage_of_segment(model.config, SIDE, SIDE, sizes)
  context = jnp.concatenate([uncond.encoder_hidden_states, cond.encoder_hidden_states])
  guided = lambda out: out[:1] + GUIDANCE * (out[1:] - out[:1])  # (uncond, cond) → guided

  def component(c, carry):
    for segment, s in zip(model.segments(), owner):
      if s == c:
        carry = segment(carry)
    return carry

  def fresh_input(c, outputs, t):
    """Component c's input: the hidden state of component c − 1, each skip from the component that pushed it."""
    temb = model.segments()[0](model.first_carry(jnp.zeros_like(noise.repeat(2, 0)), t, context)).temb_be
    before = outputs[c - 1]
    maker = lambda j: min(p for p in range(components) if len(outputs[p].skips) > j)
    skips = tuple(outputs[maker(j)].skips[j] for j in range(len(before.skips)))
    return UNetCarry(before.h_bhwc, skips, temb, context, {})

  @jax.jit
  def run():
    x = noise * sched.init_noise_sigma
    state = sched.init_state(x)
    for i in range(warmup):  # synchronous: the components in order, their outputs kept
      carry, outputs = model.first_carry(jnp.concatenate([x, x]), sched.model_timestep(i), context), []
      for c in range(components):
        carry = component(c, carry)
        outputs.append(carry)
      x, state = sched.step(state, guided(carry.h_bhwc), i, x)
    pending = []
    for i in range(warmup, STEPS, stride):
      for k, out in enumerate(pending):
        x, state = sched.step(state, guided(out), i - stride + k, x)
      t = lambda offset: sched.model_timestep(min(i + offset, STEPS - 1))
      late = stride - 1  # the step the first N − 1 components compute for
      new = [component(0, model.first_carry(jnp.concatenate([x, x]), t(late), context))]
      new += [component(c, fresh_input(c, outputs, t(late))) for c in range(1, components)]
      pending = [component(components - 1, fresh_input(components - 1, outputs, t(0))).h_bhwc] if stride == 2 else []
      pending.append(new[-1].h_bhwc)
      outputs = new
    last = warmup + stride * ((STEPS - warmup - 1) // stride)
    for k, out in enumerate(pending[:STEPS - last]):
      x, state = sched.step(state, guided(out), last + k, x)
    return x

  return np.asarray(run())


# ---------------------------------------------------------------------------------- results

def test_full_warmup_equals_single(model, args, single):
  np.testing.assert_allclose(_asyncdiff(model, args, 2, 1, STEPS), single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("components,stride", [pytest.param(2, 2, marks=_SLOW), pytest.param(3, 1, marks=_SLOW),
                                               pytest.param(3, 2, marks=_SLOW), pytest.param(4, 1, marks=_SLOW),
                                               pytest.param(4, 2, marks=_SLOW)])
def test_full_warmup_equals_single_on_more_components(model, args, single, components, stride):
  np.testing.assert_allclose(_asyncdiff(model, args, components, stride, STEPS), single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("components,stride", [(2, 1), pytest.param(2, 2, marks=_SLOW), pytest.param(3, 1, marks=_SLOW),
                                               pytest.param(4, 1, marks=_SLOW), pytest.param(3, 2, marks=_SLOW)])
def test_after_warmup_equals_the_reference_and_stays_close(model, args, single, reference, components, stride):
  got = _asyncdiff(model, args, components, stride, 1)
  np.testing.assert_allclose(got, reference(components, stride), **REFERENCE_TOLERANCE)
  difference = np.abs(got - single).max() / np.abs(single).max()
  assert 1e-4 < difference < 0.5, difference  # stale inputs change the result, not beyond recognition


@pytest.mark.parametrize("components,cfg", [pytest.param(2, 2, marks=_SLOW), pytest.param(4, 2, marks=_SLOW)])
def test_cfg_composes(model, args, reference, components, cfg):
  got = _asyncdiff(model, args, components, 1, 1, cfg)
  np.testing.assert_allclose(got, reference(components, 1), **REFERENCE_TOLERANCE)


# ---------------------------------------------------------------------------------- the compiled program

@pytest.fixture(scope="module")
def compiled_n2(model, args):  # two warm-up steps: XLA inlines a loop of one
  return lower_sample(model, args[0], args[1], **_kwargs(args, 2, 1, 2)).compile().as_text()


def test_asynchronous_steps_consume_none_of_their_collectives(compiled_n2):
  warmup, asynchronous = comm.consumed_in_step(compiled_n2)
  assert warmup  # the synchronous steps wait at every cut
  assert asynchronous == []


def test_traffic_from_the_hlo_equals_the_analytic_volume(model, args, compiled_n2):
  traffic = comm.traffic_per_step(compiled_n2)[-1]
  sizes = axis_sizes(_mesh(2, 1))
  strategy = Strategy.asyncdiff(stride=1, warmup_steps=2)
  expected = strategy.expected_traffic(model.config, SIDE, SIDE, sizes, batch=2, activation_bytes=4)
  assert traffic.total_bytes == sum(expected.values())
  # by hand: cut before up_blocks.0 (the balanced N=2 cut of this UNet): the mid block's output and the
  # three skips (conv_in 8², down0 8², down0's downsample 4²; 32 channels) and down1's 4² × 64, batch 2
  assert expected["activations"] == 2 * 4 * (8 * 8 * 32 * 2 + 4 * 4 * 32 + 4 * 4 * 64 * 2)
  stale = stale_buffer_shapes(model, args[0], args[1], **_kwargs(args, 2, 1, 2))
  assert sum(s.size * s.dtype.itemsize for s in jax.tree.leaves(stale)) == sum(
      strategy.stale_bytes(model.config, SIDE, SIDE, sizes, 2, 4).values())


@_SLOW
@pytest.mark.parametrize("components,stride", [(3, 1), (3, 2)])
def test_rounds_of_several_pairs_are_neither_consumed_nor_miscounted(model, args, components, stride):
  """N ≥ 3: permutes of several pairs (one round), and a sender in two rounds; HLO as for N = 2."""
  kwargs = {**_kwargs(args, components, stride, 2), "num_steps": 2 + 2 * stride}  # two iterations: a loop
  compiled = lower_sample(model, args[0], args[1], **kwargs).compile().as_text()
  warmup, asynchronous = comm.consumed_in_step(compiled)
  assert warmup and asynchronous == []
  expected = kwargs["strategy"].expected_traffic(model.config, SIDE, SIDE, axis_sizes(kwargs["mesh"]), 2, 4)
  assert comm.traffic_per_step(compiled)[-1].total_bytes == sum(expected.values())
  stale = stale_buffer_shapes(model, args[0], args[1], **kwargs)
  assert sum(s.size * s.dtype.itemsize for s in jax.tree.leaves(stale)) == sum(
      kwargs["strategy"].stale_bytes(model.config, SIDE, SIDE, axis_sizes(kwargs["mesh"]), 2, 4).values())


@pytest.mark.parametrize("components", [2, 3, 4])
def test_traced_transfers_equal_the_analytic_ones(model, args, components):
  strategy = Strategy.asyncdiff()
  owner = strategy.stage_of_segment(model.config, SIDE, SIDE, axis_sizes(_mesh(components, 1)))
  x = jax.ShapeDtypeStruct((2, SIDE, SIDE, 4), jnp.float32)
  text = jax.ShapeDtypeStruct((2, 5, model.config.encoder_dim), jnp.float32)
  layout = CarryLayout.trace(model, x, jnp.float32(0), {"encoder_hidden_states": text}, owner)
  traced = sorted((t.source, t.destination, int(np.prod(t.shape[1:]))) for t in layout.transfers)
  expected = sorted((s, d, v) for _, s, d, v in stage_accounting.transfers(model.config, SIDE, SIDE, owner))
  assert traced == expected
  assert any(d - s > 1 for s, d, _ in traced) == (components > 2)  # skips go straight to their reader


# ---------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("options,sizes,message", [
    (dict(stride=3), dict(stage=2), r"stride=3: AsyncDiff's stride is one of 1, 2"),
    (dict(warmup_steps=0), dict(stage=2), r"warmup_steps=0 must be an integer ≥ 1"),
    (dict(), dict(stage=1), r"valid stage sizes 2 to 7, but the mesh has stage=1"),
    (dict(stride=2), dict(stage=9), r"valid stage sizes 3 to 8, but the mesh has stage=9"),
    (dict(cuts=(2, 4)), dict(stage=2), r"cuts=\(2, 4\) make 3 components.*need stage = N \+ S − 1 = 3"),
    (dict(cuts=(4, 2)), dict(stage=3), r"strictly increasing segment indices in 1..6.*0 embed, 1 down_blocks.0"),
])
def test_bad_input_names_the_valid_choices(model, options, sizes, message):
  with pytest.raises(ValueError, match=message):
    strategy = Strategy.asyncdiff(**options)
    strategy.validate(model.config, SIDE, SIDE, {"data": 1, "cfg": 1, "patch": 1, "tensor": 1, **sizes})


# ---------------------------------------------------------------------------------- the DiT family

@pytest.fixture(scope="module")
def dit():
  model = DiTTransformer2DModel(DiTConfig.from_diffusers_config(TINY_DIT), rngs=nnx.Rngs(0))  # 6 segments
  perturb(model)
  return model


@pytest.fixture(scope="module")
def dit_single(dit):
  return run_dit(dit, None, Strategy.single(), scheduler="euler")


def _dit_asyncdiff(model, components, stride, warmup, cfg=1, **kw):
  devices = components + stride - 1
  mesh = make_mesh(1, cfg, 1, stage=devices, devices=jax.devices()[:cfg * devices])
  return run_dit(model, mesh, Strategy.asyncdiff(stride=stride, warmup_steps=warmup), scheduler="euler", **kw)


@pytest.mark.parametrize("components,stride", [(2, 1), (3, 2), pytest.param(3, 1, marks=_SLOW),
                                               pytest.param(4, 1, marks=_SLOW), pytest.param(2, 2, marks=_SLOW),
                                               pytest.param(4, 2, marks=_SLOW)])
def test_dit_full_warmup_equals_single(dit, dit_single, components, stride):
  assert relative_error(_dit_asyncdiff(dit, components, stride, STEPS), dit_single) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("components,stride", [(2, 1), (3, 2)])
def test_dit_after_warmup_differs_but_stays_close(dit, dit_single, components, stride):
  difference = relative_error(_dit_asyncdiff(dit, components, stride, 1), dit_single)
  assert 1e-4 < difference < 0.5, difference


@pytest.mark.slow
def test_cfg_and_stages_compose_on_a_pixart():
  pixart = PixArtTransformer2DModel(PixArtConfig.from_diffusers_config(TINY_PIXART), rngs=nnx.Rngs(1))
  perturb(pixart)
  expected = run_dit(pixart, None, Strategy.single(), batch=2)
  mesh = make_mesh(cfg=2, stage=4, patch=1, devices=jax.devices()[:8])
  got = run_dit(pixart, mesh, Strategy.asyncdiff(warmup_steps=STEPS), batch=2)
  assert relative_error(got, expected) <= 1e-5


@pytest.mark.parametrize("components,stride,grids", [(4, 1, 1), (3, 2, 2)])
def test_each_device_carries_only_the_token_grids_it_receives(dit, components, stride, grids):
  """A chain of N blocks' components: each device receives one token grid, so one round carries them all
  (N − 1 grids before); stride 2's second last-component device needs a second round from the same sender."""
  devices = components + stride - 1
  args, kwargs = dit_args(dit, make_mesh(stage=devices, patch=1, devices=jax.devices()[:devices]),
                          Strategy.asyncdiff(stride=stride, warmup_steps=1))
  stale = stale_buffer_shapes(*args, **kwargs)
  token_grid = 2 * (DIT_HEIGHT // 2) * (DIT_WIDTH // 2) * dit.config.inner_dim * 4  # guidance pair, fp32, patch 2
  assert sum(s.size * s.dtype.itemsize for s in stale["inputs"]) == grids * token_grid
