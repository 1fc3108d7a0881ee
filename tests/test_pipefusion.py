"""PipeFusion on 8 virtual CPU devices, fp32: with warm-up over every step it equals `single`; one
patch through N stages is a plain pipeline, exact at every step; after warm-up, M ≥ N patches
really use stale K/V (different from `single`) and stay close; with sequence parallelism inside
each stage (`patch`: K/V gathered, `ulysses`: all-to-alls) it is exact with warm-up and, after it,
no further from `single` than plain PipeFusion; each device holds only its stage's params; bad
settings name the valid choices."""

import jax
import numpy as np
import pytest
from flax import nnx

from dfjax.sampling import Conditioning, prepare_sample, sample, stale_buffer_shapes
from models.config import UNetConfig
from models.dit import DiTConfig, DiTTransformer2DModel, PixArtTransformer2DModel
from models.dit_config import PixArtConfig
from models.unet import UNet2DConditionModel
from sharding.mesh import make_mesh
from sharding.strategies import Strategy
from test_unet import CONFIGS

STEPS = 4
TINY_DIT = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=4,
                sample_size=8, patch_size=2)
TINY_PIXART = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=4,
                   sample_size=8, patch_size=2, cross_attention_dim=16, caption_channels=12,
                   use_additional_conditions=False, norm_elementwise_affine=True)
HEIGHT, WIDTH = 16, 8  # 8 token rows: 1, 2, 4 or 8 patches


@pytest.fixture(scope="module")
def dit():
  model = DiTTransformer2DModel(DiTConfig.from_diffusers_config(TINY_DIT), rngs=nnx.Rngs(0))
  _perturb(model)
  return model


def _perturb(model):
  """Random (not zero-initialised) adaLN-Zero gates and output layers, so every block matters."""
  _, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  nnx.update(model, jax.tree.unflatten(treedef, [l + 0.05 * jax.random.normal(k, l.shape, l.dtype)
                                                  for l, k in zip(leaves, keys)]))


def _args(model, mesh, strategy, steps=STEPS, scheduler="ddim", batch=1):
  noise = jax.random.normal(jax.random.key(3), (batch, HEIGHT, WIDTH, 4))
  if isinstance(model, PixArtTransformer2DModel):
    rng = np.random.default_rng(0)
    text = rng.normal(size=(batch, 5, 12)).astype(np.float32)
    mask = np.ones((batch, 5), np.float32)
    mask[:, 3:] = 0
    cond = Conditioning(encoder_hidden_states=text, encoder_attention_mask=mask)
    uncond = Conditioning(encoder_hidden_states=np.zeros_like(text), encoder_attention_mask=mask)
  else:
    cond = Conditioning(class_labels=np.arange(3, 3 + batch))
    uncond = Conditioning(class_labels=np.full((batch,), model.config.null_class))
  return (model, noise, cond), dict(uncond=uncond, num_steps=steps, mesh=mesh, strategy=strategy, scheduler=scheduler)


def _run(model, mesh, strategy, **kw):
  args, kwargs = _args(model, mesh, strategy, **kw)
  return np.asarray(sample(*args, **kwargs))


def _error(a, b):
  return np.abs(a - b).max() / np.abs(b).max()


@pytest.fixture(scope="module")
def dit_single(dit):
  return _run(dit, None, Strategy.single())


@pytest.mark.parametrize("stages,patches", [(2, 2), pytest.param(2, 4, marks=pytest.mark.slow),
                                            pytest.param(4, 4, marks=pytest.mark.slow),
                                            pytest.param(4, 8, marks=pytest.mark.slow)])
def test_warm_up_over_every_step_equals_single(dit, dit_single, stages, patches):
  strategy = Strategy.pipefusion(num_patches=patches, warmup_steps=STEPS)
  got = _run(dit, make_mesh(stage=stages, patch=1, devices=jax.devices()[:stages]), strategy)
  assert _error(got, dit_single) <= 1e-5


@pytest.fixture(scope="module")
def dit8():
  """TINY_DIT with 8 blocks: one per device at N = 8 stages."""
  model = DiTTransformer2DModel(DiTConfig.from_diffusers_config({**TINY_DIT, "num_layers": 8}), rngs=nnx.Rngs(2))
  _perturb(model)
  return model


@pytest.mark.slow
@pytest.mark.parametrize("patches,warmup_steps", [(8, STEPS), (1, 0)], ids=["M=8 warm-up over every step", "M=1"])
def test_eight_stages_are_exact(dit8, patches, warmup_steps):
  """N = 8 (8 blocks, one per device): with warm-up over every step, and one patch at every step."""
  got = _run(dit8, make_mesh(stage=8, patch=1), Strategy.pipefusion(num_patches=patches, warmup_steps=warmup_steps))
  assert _error(got, _run(dit8, None, Strategy.single())) <= 1e-5


@pytest.mark.parametrize("stages", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_one_patch_is_a_plain_pipeline_exact_at_every_step(dit, dit_single, stages):
  strategy = Strategy.pipefusion(num_patches=1, warmup_steps=0)  # pipelined from step 1 on
  got = _run(dit, make_mesh(stage=stages, patch=1, devices=jax.devices()[:stages]), strategy)
  assert _error(got, dit_single) <= 1e-5


@pytest.mark.parametrize("stages,patches,scheduler", [(2, 4, "dpmpp_2m"), pytest.param(4, 4, "ddim", marks=pytest.mark.slow),
                                                      pytest.param(2, 2, "euler", marks=pytest.mark.slow)])
def test_after_warm_up_patches_use_stale_kv_no_worse_than_distrifusion(dit, stages, patches, scheduler):
  """PipeFusion's later patches are one step stale; DistriFusion's every other patch is: on the
  same model, warm-up and patch count its error must be real but no larger than DistriFusion's."""
  single = _run(dit, None, Strategy.single(), steps=6, scheduler=scheduler)
  pipefusion = _run(dit, make_mesh(stage=stages, patch=1, devices=jax.devices()[:stages]),
                    Strategy.pipefusion(num_patches=patches, warmup_steps=1), steps=6, scheduler=scheduler)
  displaced = _run(dit, make_mesh(patch=patches, devices=jax.devices()[:patches]), Strategy.displaced(warmup_steps=1),
                   steps=6, scheduler=scheduler)
  error, baseline = _error(pipefusion, single), _error(displaced, single)
  assert 1e-5 < error <= 1.25 * baseline, (error, baseline)


@pytest.fixture(scope="module")
def pixart():
  model = PixArtTransformer2DModel(PixArtConfig.from_diffusers_config(TINY_PIXART), rngs=nnx.Rngs(1))
  _perturb(model)
  return model


def _mesh(**degrees):
  return make_mesh(**degrees, devices=jax.devices()[:int(np.prod(list(degrees.values())))])


@pytest.mark.parametrize("family,degrees", [
    ("dit", dict(stage=2, patch=2, ulysses=2)),  # both inside each stage: 1 token row per rank
    pytest.param("dit", dict(stage=2, patch=2), marks=pytest.mark.slow),
    pytest.param("dit", dict(stage=2, patch=1, ulysses=2), marks=pytest.mark.slow),
    pytest.param("pixart", dict(stage=2, patch=2), marks=pytest.mark.slow),
    pytest.param("pixart", dict(stage=2, patch=1, ulysses=2), marks=pytest.mark.slow)])
def test_sequence_parallel_stages_with_warm_up_over_every_step_equal_single(request, family, degrees):
  model = request.getfixturevalue(family)
  batch = 2 if family == "pixart" else 1
  expected = _run(model, None, Strategy.single(), batch=batch)
  got = _run(model, _mesh(**degrees), Strategy.pipefusion(num_patches=2, warmup_steps=STEPS), batch=batch)
  assert _error(got, expected) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("degrees", [dict(stage=2, patch=2), dict(stage=2, patch=1, ulysses=2)])
def test_sequence_parallel_stages_after_warm_up_are_stale_but_no_further_than_plain_pipefusion(dit, degrees):
  """The ranks of a stage hold the whole patch's fresh K/V (a rank's own tokens' alone would miss the
  others'), so the hybrid's staleness is plain PipeFusion's: the same error from `single`."""
  args = dict(steps=6, scheduler="dpmpp_2m")
  single = _run(dit, None, Strategy.single(), **args)
  strategy = Strategy.pipefusion(num_patches=4, warmup_steps=1)
  plain = _run(dit, _mesh(stage=2, patch=1), strategy, **args)
  hybrid = _run(dit, _mesh(**degrees), strategy, **args)
  error, baseline = _error(hybrid, single), _error(plain, single)
  assert 1e-5 < error <= baseline * (1 + 1e-3), (error, baseline)


@pytest.mark.slow
def test_cfg_and_sequence_parallel_stages_on_a_pixart_are_exact_up_to_rounding(pixart):
  """cfg 2 × stage 2 × patch 2 with full warm-up: 1.52e-5 from `single`, and plain Ulysses on cfg 2 × patch 2
  gives the very same 1.52e-5: both differ from `single` by one f32 rounding after the first step
  (1.2e-7), which this trajectory amplifies — moving `single`'s own noise one ulp gives 2.3e-5. So the bar
  is that sensitivity (a wrong half, text or patch is orders of magnitude beyond it)."""
  args, kwargs = _args(pixart, None, Strategy.single(), batch=2)
  expected = np.asarray(sample(*args, **kwargs))
  model, noise, cond = args
  bumped = np.asarray(sample(model, jax.numpy.nextafter(noise, np.inf), cond, **kwargs))
  rounding = _error(bumped, expected)
  got = _run(pixart, _mesh(cfg=2, stage=2, patch=2), Strategy.pipefusion(num_patches=2, warmup_steps=STEPS), batch=2)
  assert _error(got, expected) <= max(1e-5, rounding), rounding


@pytest.mark.slow
def test_cfg_and_stages_compose_on_a_pixart(pixart):
  expected = _run(pixart, None, Strategy.single(), batch=2)
  mesh = make_mesh(cfg=2, stage=2, patch=1, devices=jax.devices()[:4])
  got = _run(pixart, mesh, Strategy.pipefusion(num_patches=1), batch=2)  # one patch: exact at every step
  assert _error(got, expected) <= 1e-5


def test_each_device_holds_only_its_stages_params(dit):
  args, kwargs = _args(dit, make_mesh(stage=4, patch=1, devices=jax.devices()[:4]), Strategy.pipefusion())
  program = prepare_sample(*args, **kwargs)
  staged = program.plan.staged
  nbytes = lambda tree: sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))  # noqa: E731
  whole = nbytes(nnx.split(dit)[1])
  assert sum(staged.stage_bytes()) == whole
  assert staged.bytes_per_device() == max(staged.stage_bytes()) < whole
  assert staged.stage_bytes()[1:3] == (nbytes(nnx.state(dit.transformer_blocks[1])),) * 2  # one block each
  rows = program.inputs[0]["rows"]["float32"]
  assert {shard.data.shape for shard in rows.addressable_shards} == {(1, staged.bytes_per_device() // 4)}


@pytest.mark.parametrize("ulysses", [1, 2])
def test_stale_kv_buffers_are_the_analytic_bytes(dit, ulysses):
  """Per layer, the whole sequence's K and V of the device's heads (all of them, or 1/ulysses)."""
  strategy = Strategy.pipefusion(num_patches=4, stage_layers=(3, 1))
  args, kwargs = _args(dit, _mesh(stage=2, patch=1, ulysses=ulysses), strategy)
  kv = stale_buffer_shapes(*args, **kwargs)["kv"]
  assert kv.shape[0] == 3  # K/V slots of the larger stage, in every device
  tokens, heads = (HEIGHT // 2) * (WIDTH // 2), TINY_DIT["num_attention_heads"] // ulysses
  assert kv.shape[1:] == (2, 2, tokens, heads, TINY_DIT["attention_head_dim"])  # K/V, guidance pair, S, N/U, D
  expected = strategy.stale_bytes(dit.config, HEIGHT, WIDTH, {"stage": 2, "ulysses": ulysses}, 2, activation_bytes=4)
  assert kv.size * kv.dtype.itemsize == expected["kv"]


def test_bad_settings_name_the_valid_choices(dit):
  mesh = make_mesh(stage=2, patch=1, devices=jax.devices()[:2])
  with pytest.raises(ValueError, match="do not split into num_patches=3 patches: valid patch counts: 1, 2, 4, 8"):
    sample(*_args(dit, mesh, Strategy.pipefusion(num_patches=3))[0], **_args(dit, mesh, Strategy.pipefusion(num_patches=3))[1])
  with pytest.raises(ValueError, match=r"stage_layers=\(1, 2\) must be 2 positive counts summing to the model's 4"):
    args, kwargs = _args(dit, mesh, Strategy.pipefusion(stage_layers=(1, 2)))
    sample(*args, **kwargs)
  with pytest.raises(ValueError, match=r"4 blocks cannot fill 8 stages: use a stage axis of at most 4"):
    args, kwargs = _args(dit, make_mesh(stage=8, patch=1), Strategy.pipefusion())
    sample(*args, **kwargs)
  with pytest.raises(ValueError, match=r"leave the last stage empty: use a stage axis of \[1, 2, 4\].*\[2, 1, 1\]"):
    args, kwargs = _args(dit, make_mesh(stage=3, patch=1, devices=jax.devices()[:3]), Strategy.pipefusion())
    sample(*args, **kwargs)
  unet = UNet2DConditionModel(UNetConfig.from_diffusers_config(CONFIGS["sd15"]), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="this model is a UNet: use single, exact, displaced"):
    Strategy.pipefusion().validate(unet.config, 16, 16, {"data": 1, "cfg": 1, "stage": 2, "patch": 1, "tensor": 1})
  sizes = {"data": 1, "cfg": 1, "stage": 2, "patch": 2, "ulysses": 1, "tensor": 1}
  with pytest.raises(ValueError, match=r"4 patches has 2 token rows, which do not split over patch × ulysses = 2 × 2 = 4.*: 1, 2 "):
    Strategy.pipefusion(num_patches=4).validate(dit.config, HEIGHT, WIDTH, {**sizes, "patch": 2, "ulysses": 2})
  with pytest.raises(ValueError, match=r"pipefusion splits .* ulysses=4 does not divide the 2 heads.*degrees: \[1, 2\]"):
    Strategy.pipefusion(num_patches=1).validate(dit.config, HEIGHT, WIDTH, {**sizes, "patch": 1, "ulysses": 4})
  with pytest.raises(ValueError, match=r"cfg=2 × stage=4 × patch=2 = 16 devices, but only 8 are available"):
    make_mesh(cfg=2, stage=4, patch=2)  # the hybrid larger than the devices
  with pytest.raises(ValueError, match="warmup_steps=-1 must be an integer ≥ 0"):
    Strategy.pipefusion(warmup_steps=-1)
  with pytest.raises(ValueError, match="bench simulate --strategies pipefusion` projects it from FLOP counts"):
    Strategy.pipefusion().phases(STEPS, sizes, simulated=True)
