"""dfjax.schedulers against diffusers' DDIM, Euler discrete and DPM-Solver++(2M) schedulers.

Both sides start from the same noise and see the same pseudo model output at every step; every
intermediate sample must agree to a relative error (max |ours - ref| / max |ref|, per step) of 1e-5.
Ours runs as one jitted `lax.scan` per case; the reference is diffusers in float32.
"""

import dataclasses
import itertools
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dfjax.schedulers import (PREDICTION_TYPES, SchedulerConfig, make_scheduler, prediction_target,
                              train_alphas_cumprod)

REFERENCE = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}
SHAPE_BHWC = (2, 8, 8, 4)
RTOL = 1e-5
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
# diffusers' own numpy-2 deprecation noise
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


# A per-element phase keeps the samples spread out: with a spatially constant pseudo model, DDIM's
# clipping drives every element to one value that is a small difference of O(1) terms, where even
# diffusers' own float32 result is 3.6e-5 away from float64 (relative to the sample's size).
PHASE = np.linspace(0.0, 2 * np.pi, np.prod(SHAPE_BHWC), dtype=np.float32).reshape(SHAPE_BHWC)


def pseudo_model(x, t, phase, sin):
  """A deterministic stand-in for the UNet: 0.1·x + sin(t/100 + phase)."""
  return 0.1 * x + sin(t / 100 + phase)


def sampling_fn(sched, phase=PHASE):
  """The sampling loop: noise [B, H, W, C] → all S intermediate samples [S, B, H, W, C]."""

  def body(carry, i):
    x, state = carry
    m = pseudo_model(sched.scale_model_input(x, i), sched.model_timestep(i), phase, jnp.sin)
    x, state = sched.step(state, m, i, x)
    return (x, state), x

  return lambda x: lax.scan(body, (x, sched.init_state(x)), jnp.arange(sched.num_steps))[1]


def sample_diffusers(ref, x):
  x, out = torch.from_numpy(x), []
  for t in ref.timesteps:
    m = pseudo_model(ref.scale_model_input(x, t), t.float(), torch.from_numpy(PHASE), torch.sin)
    x = ref.step(m, t, x).prev_sample
    out.append(x.numpy())
  return np.stack(out)


def check_parity(name, num_steps, **config):
  cfg = SchedulerConfig(**config)
  sched = make_scheduler(name, cfg, num_steps)
  # Unset options (None) are left out, so that diffusers applies its own defaults.
  ref = REFERENCE[name].from_config({k: v for k, v in dataclasses.asdict(cfg).items() if v is not None})
  ref.set_timesteps(num_steps)

  ref_t = ref.timesteps.numpy()
  assert sched.timesteps.dtype == ref_t.dtype
  np.testing.assert_array_equal(sched.timesteps, ref_t)
  np.testing.assert_allclose(sched.init_noise_sigma, float(ref.init_noise_sigma), rtol=RTOL)

  noise = np.random.default_rng(num_steps).standard_normal(SHAPE_BHWC, dtype=np.float32)
  x = noise * np.float32(sched.init_noise_sigma)
  ours, theirs = np.asarray(jax.jit(sampling_fn(sched))(x)), sample_diffusers(ref, x)
  assert ours.shape == theirs.shape == (num_steps, *SHAPE_BHWC)
  rel = np.abs(ours - theirs).max(axis=(1, 2, 3, 4)) / np.abs(theirs).max(axis=(1, 2, 3, 4))
  worst = int(rel.argmax())
  assert rel[worst] <= RTOL, f"step {worst} (t={ref_t[worst]}): relative error {rel[worst]:.2e} > {RTOL}"


# scheduler × spacing × prediction × beta schedule; the step count rotates through 10/25/50 so that
# every (scheduler, spacing) pair and every (scheduler, step count) pair is covered with one compile a case.
STEPS = (10, 25, 50)
GRID = [
  (name, spacing, pred, betas, STEPS[(s + k) % 3])
  for name in REFERENCE
  for s, spacing in enumerate(("leading", "trailing", "linspace"))
  for k, (pred, betas) in enumerate(
    itertools.product(("epsilon", "v_prediction"), ("linear", "scaled_linear"))
  )
]


@pytest.mark.parametrize("name, spacing, prediction_type, betas, num_steps", GRID)
def test_parity_grid(name, spacing, prediction_type, betas, num_steps):
  beta_kwargs = SD_BETAS if betas == "scaled_linear" else {}
  check_parity(name, num_steps, timestep_spacing=spacing, prediction_type=prediction_type, **beta_kwargs)


@pytest.mark.parametrize(
  "steps_offset, set_alpha_to_one, clip_sample, num_steps",
  [(*flags, STEPS[k % 3]) for k, flags in enumerate(itertools.product((0, 1), (True, False), (True, False)))],
)
def test_parity_ddim_options(steps_offset, set_alpha_to_one, clip_sample, num_steps):
  check_parity(
    "ddim",
    num_steps,
    steps_offset=steps_offset,
    set_alpha_to_one=set_alpha_to_one,
    clip_sample=clip_sample,
    **SD_BETAS,
  )


TRAINED_BETAS = tuple(np.linspace(1e-4, 0.03, 1000) ** 1.1)


@pytest.mark.parametrize(
  "name, num_steps, config",
  [
    *[(name, 25, dict(prediction_type="sample")) for name in REFERENCE],
    *[(name, 10, dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing")) for name in REFERENCE],
    # One step from t=999 ("linspace"/"leading" would take it at t=0, where diffusers' float32
    # sigma = sqrt((1-ᾱ)/ᾱ) is 8e-5 off by cancellation; ours is computed in float64).
    *[(name, 1, dict(timestep_spacing="trailing")) for name in REFERENCE],
    ("ddim", 25, dict(clip_sample_range=1.5, prediction_type="v_prediction")),
    # Stable Diffusion 1.x's config names no spacing: each scheduler takes its own default.
    *[(name, 25, dict(steps_offset=1, **SD_BETAS)) for name in REFERENCE],
    ("euler", 10, dict(final_sigmas_type="sigma_min", timestep_spacing="trailing")),
    ("dpmpp_2m", 10, dict(final_sigmas_type="sigma_min")),  # n < 15: first-order last step
    ("dpmpp_2m", 20, dict(final_sigmas_type="sigma_min")),  # second-order last step
    ("dpmpp_2m", 10, dict(final_sigmas_type="sigma_min", lower_order_final=False)),
    ("dpmpp_2m", 20, dict(final_sigmas_type="sigma_min", euler_at_final=True)),
    ("dpmpp_2m", 25, dict(trained_betas=TRAINED_BETAS, timestep_spacing="linspace")),
  ],
  ids=lambda v: (
    ",".join(f"{k}={v}" for k, v in v.items() if k != "trained_betas") if isinstance(v, dict) else None
  ),
)
def test_parity_other_options(name, num_steps, config):
  check_parity(name, num_steps, **config)


def _lowered(name, num_steps):
  sched = make_scheduler(name, SchedulerConfig(**SD_BETAS), num_steps)
  return jax.jit(sampling_fn(sched)).lower(jax.ShapeDtypeStruct(SHAPE_BHWC, jnp.float32))


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_prediction_target_is_what_the_sampler_reads(prediction_type):
  """A model that outputs exactly `prediction_target` makes one DDIM step land on the forward
  process's sample at the next timestep (x0 and ε recovered exactly); the v target equals
  diffusers' `get_velocity`."""
  config = dict(beta_schedule="linear", prediction_type=prediction_type, timestep_spacing="trailing",
                clip_sample=False)
  abar = train_alphas_cumprod(SchedulerConfig.from_diffusers_config(config))
  rng = np.random.default_rng(0)
  x0, eps = rng.standard_normal((2, *SHAPE_BHWC), np.float32)
  t, t_next = 999, 899
  x_t, x_next = (np.sqrt(abar[k]) * x0 + np.sqrt(1 - abar[k]) * eps for k in (t, t_next))
  target = np.asarray(prediction_target(prediction_type, x0, eps, np.sqrt(abar[t]), np.sqrt(1 - abar[t])))
  reference = DDIMScheduler(**config)
  reference.set_timesteps(10)
  assert reference.timesteps[:2].tolist() == [t, t_next]
  stepped = reference.step(torch.from_numpy(target), t, torch.from_numpy(x_t)).prev_sample.numpy()
  np.testing.assert_allclose(stepped, x_next, atol=2e-4)
  if prediction_type == "v_prediction":
    velocity = DDPMScheduler(beta_schedule="linear").get_velocity(
        torch.from_numpy(x0), torch.from_numpy(eps), torch.tensor([t])).numpy()
    np.testing.assert_allclose(target, velocity, atol=1e-5)


@pytest.mark.parametrize("name", list(REFERENCE))
def test_program_does_not_grow_with_steps(name):
  def structure(text):  # drop the coefficient tables' values and every number (sizes, SSA ids)
    return re.sub(r"\d+", "N", re.sub(r"dense<[^>]*>", "dense<…>", text))

  low10, low50 = _lowered(name, 10), _lowered(name, 50)
  assert structure(low10.as_text()) == structure(low50.as_text())
  size10, size50 = len(low10.compile().as_text()), len(low50.compile().as_text())
  assert abs(size50 - size10) <= 0.05 * size10, (size10, size50)


@pytest.mark.parametrize("name", list(REFERENCE))
def test_step_runs_on_row_patches(name):
  """step is elementwise: the scan inside shard_map over 8 row patches equals the unsharded scan."""
  sched = make_scheduler(name, SchedulerConfig(**SD_BETAS), 10)
  mesh = jax.make_mesh((8,), ("patch",))
  run = sampling_fn(sched, phase=0.0)
  patched = jax.shard_map(run, mesh=mesh, in_specs=P(None, "patch"), out_specs=P(None, None, "patch"))
  x = np.random.default_rng(0).standard_normal(SHAPE_BHWC, dtype=np.float32)
  x_sharded = jax.device_put(x, NamedSharding(mesh, P(None, "patch")))
  np.testing.assert_allclose(jax.jit(patched)(x_sharded), jax.jit(run)(x), rtol=1e-6, atol=1e-6)


def test_scheduler_is_hashable_by_config():
  a, b = make_scheduler("ddim", SchedulerConfig(), 10), make_scheduler("ddim", SchedulerConfig(), 10)
  assert a == b and hash(a) == hash(b)
  assert a != make_scheduler("ddim", SchedulerConfig(), 11)
  assert a != make_scheduler("ddim", SchedulerConfig(clip_sample=False), 10)


@pytest.mark.parametrize("cls", list(REFERENCE.values()))
def test_from_diffusers_config_reads_default_configs(cls):
  d = dict(cls().config)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    cfg = SchedulerConfig.from_diffusers_config(d)
  for field in dataclasses.fields(SchedulerConfig):
    if field.name in d:
      assert getattr(cfg, field.name) == d[field.name], field.name


def test_from_diffusers_config_reads_stable_diffusion_config():
  sd15 = {  # runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json (PNDMScheduler)
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
  }
  cfg = SchedulerConfig.from_diffusers_config(sd15)
  got = (cfg.beta_schedule, cfg.steps_offset, cfg.set_alpha_to_one, cfg.clip_sample)
  assert got == ("scaled_linear", 1, False, False)


def test_unknown_config_key_warns():
  with pytest.warns(UserWarning, match=r"ignored by dfjax: \['solver_p'\]"):
    SchedulerConfig.from_diffusers_config({"solver_p": None})


@pytest.mark.parametrize(
  "d, match",
  [
    ({"use_karras_sigmas": True}, r"unsupported use_karras_sigmas=True; supported: False, None"),
    ({"thresholding": True}, r"unsupported thresholding=True; supported: False"),
    ({"rescale_betas_zero_snr": True}, r"unsupported rescale_betas_zero_snr=True"),
    (
      {"algorithm_type": "sde-dpmsolver++"},
      r"algorithm_type='sde-dpmsolver\+\+'; supported: 'dpmsolver\+\+'",
    ),
    ({"solver_order": 3}, r"unsupported solver_order=3; supported: 2"),
    (
      {"interpolation_type": "log_linear"},
      r"unsupported interpolation_type='log_linear'; supported: 'linear'",
    ),
    ({"beta_schedule": "sigmoid"}, r"unsupported beta_schedule='sigmoid'; supported: 'linear', 'scaled_lin"),
    (
      {"timestep_spacing": "uniform"},
      r"unsupported timestep_spacing='uniform'; supported: 'leading', 'trail",
    ),
    ({"prediction_type": "flow_prediction"}, r"prediction_type='flow_prediction'; supported: 'epsilon'"),
    ({"final_sigmas_type": "one"}, r"unsupported final_sigmas_type='one'; supported: 'zero', 'sigma_min'"),
    ({"beta_start": 0.1, "beta_end": 0.01}, r"beta_start <= beta_end < 1, got beta_start=0.1, beta_end=0.01"),
    ({"trained_betas": [0.01] * 10}, r"trained_betas must hold num_train_timesteps=1000 values .*, got 10 "),
    ({"steps_offset": -1}, r"steps_offset must be an int in \[0, 1000\), got -1"),
    ({"num_train_timesteps": 1}, r"num_train_timesteps must be an int >= 2, got 1"),
    ({"clip_sample_range": 0.0}, r"clip_sample_range must be > 0, got 0.0"),
  ],
)
def test_config_errors(d, match):
  with pytest.raises(ValueError, match=match):
    SchedulerConfig.from_diffusers_config(d)


@pytest.mark.parametrize(
  "name, num_steps, config, match",
  [
    ("heun", 10, {}, r"unknown scheduler 'heun'; valid names: \[.*'ddim'.*'dpmpp_2m'.*'euler'"),
    ("ddim", 0, {}, r"num_steps must be an int in \[1, num_train_timesteps=1000\], got 0"),
    ("euler", 1001, {}, r"num_steps must be an int in \[1, num_train_timesteps=1000\], got 1001"),
    ("dpmpp_2m", 1000, {}, r"'linspace' with steps_offset=0 and num_steps=1000 gives timesteps that are "
     r"not strictly decreasing inside \[0, 999\] \(steps 499 and 500 are 500, 500\)"),
    ("ddim", 1000, {"steps_offset": 1}, r"'leading' .* \(step 0 is 1000\)"),
    (
      "ddim",
      10,
      {"steps_offset": 150},
      r"num_steps=10 gives timesteps .* inside \[0, 999\] \(step 0 is 1050\); use fewer",
    ),
  ],
)
def test_make_scheduler_errors(name, num_steps, config, match):
  with pytest.raises(ValueError, match=match):
    make_scheduler(name, SchedulerConfig(**config), num_steps)
