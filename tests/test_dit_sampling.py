"""`dfjax.sample` with DiT and PixArt: against reference loops written with diffusers' models and
schedulers (DDIM, Euler, DPM-Solver++ 2M) as diffusers' DiTPipeline and PixArtAlphaPipeline run them
(null class 1000, learned variance dropped, guidance on the noise), and the row-patch strategies
against one device."""

import diffusers
import jax
import numpy as np
import pytest
import torch

import dfjax
from dfjax.sampling import sample
from test_dit import make_dit, make_pixart, nchw

SCHEDULER = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "clip_sample": False,
             "set_alpha_to_one": False, "steps_offset": 1}
DIFFUSERS_SCHEDULERS = {"ddim": diffusers.DDIMScheduler, "euler": diffusers.EulerDiscreteScheduler,
                        "dpmpp_2m": diffusers.DPMSolverMultistepScheduler}
BATCH, SIZE, STEPS, GUIDANCE = 2, 8, 10, 4.0
NULL_CLASS = 1000  # diffusers' DiTPipeline: class_null = [1000] * batch


@pytest.fixture(scope="module")
def dit():
  return make_dit()


@pytest.fixture(scope="module")
def noise():
  return np.random.default_rng(0).standard_normal((BATCH, SIZE, SIZE, 4), np.float32)


def dit_conditioning():
  labels = np.array([3, 7], np.int32)
  return {"class_labels": labels}, {"class_labels": np.full_like(labels, NULL_CLASS)}


def pixart_conditioning():
  rng = np.random.default_rng(1)
  mask = np.ones((BATCH, 6), np.float32)
  mask[0, 4:] = 0
  extra = {"resolution": np.full((BATCH, 2), 8.0 * SIZE, np.float32), "aspect_ratio": np.ones((BATCH, 1), np.float32)}
  cond = {"encoder_hidden_states": rng.standard_normal((BATCH, 6, 20), np.float32), "encoder_attention_mask": mask,
          **extra}
  null_mask = np.zeros_like(mask)
  null_mask[:, 0] = 1
  uncond = {"encoder_hidden_states": rng.standard_normal((BATCH, 6, 20), np.float32),
            "encoder_attention_mask": null_mask, **extra}
  return cond, uncond


def reference_loop(predict, noise, scheduler="ddim", config=SCHEDULER):
  """The pipelines' loop: both halves in one batch (cond first, as DiTPipeline), guidance on the first
  in_channels output channels, the learned variance dropped, `scheduler` steps on the latents (each
  diffusers class from `config` with its own defaults). `predict(x, t)` → the model's (2B, 2C, H, W)
  output."""
  scheduler = DIFFUSERS_SCHEDULERS[scheduler].from_config(config)
  scheduler.set_timesteps(STEPS)
  x = nchw(noise) * scheduler.init_noise_sigma
  channels = x.shape[1]
  with torch.no_grad():
    for t in scheduler.timesteps:
      x_in = scheduler.scale_model_input(torch.cat([x, x]), t)
      eps = predict(x_in, t.expand(2 * BATCH))[:, :channels]
      cond_eps, uncond_eps = eps.chunk(2)
      x = scheduler.step(uncond_eps + GUIDANCE * (cond_eps - uncond_eps), t, x).prev_sample
  return x.numpy().transpose(0, 2, 3, 1)


def both(cond, uncond, name):
  return torch.from_numpy(np.concatenate([cond[name], uncond[name]]))


def run(model, noise, cond, uncond, **kwargs):
  defaults = {"scheduler": "ddim", "scheduler_config": SCHEDULER, "num_steps": STEPS, "guidance_scale": GUIDANCE}
  return np.asarray(sample(model, noise, cond, uncond=uncond, **{**defaults, **kwargs}))


def relative_error(got, expected) -> float:
  return float(np.abs(got - expected).max() / np.abs(expected).max())


def dit_predict(torch_dit, cond, uncond):
  """DiTPipeline's model call on the (cond, uncond) batch."""
  labels = both(cond, uncond, "class_labels").long()
  return lambda x, t: torch_dit(x, timestep=t, class_labels=labels).sample


def pixart_predict(torch_pixart, cond, uncond):
  """PixArtAlphaPipeline's model call on the (cond, uncond) batch: masked text, size conditions."""
  text, mask = both(cond, uncond, "encoder_hidden_states"), both(cond, uncond, "encoder_attention_mask")
  added = {"resolution": both(cond, uncond, "resolution"), "aspect_ratio": both(cond, uncond, "aspect_ratio")}
  return lambda x, t: torch_pixart(x, encoder_hidden_states=text, encoder_attention_mask=mask, timestep=t,
                                   added_cond_kwargs=added).sample


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpmpp_2m"])
def test_dit_ten_steps_equal_the_dit_pipeline_loop(dit, noise, scheduler):
  torch_dit, model = dit
  cond, uncond = dit_conditioning()
  expected = reference_loop(dit_predict(torch_dit, cond, uncond), noise, scheduler)
  assert model.config.predicts_variance
  assert relative_error(run(model, noise, cond, uncond, scheduler=scheduler), expected) <= 1e-4


@pytest.mark.parametrize("scheduler", ["ddim", pytest.param("euler", marks=pytest.mark.slow),
                                       pytest.param("dpmpp_2m", marks=pytest.mark.slow)])
def test_pixart_ten_steps_equal_the_pixart_pipeline_loop(noise, scheduler):
  torch_pixart, model = make_pixart("alpha")
  cond, uncond = pixart_conditioning()
  expected = reference_loop(pixart_predict(torch_pixart, cond, uncond), noise, scheduler)
  assert relative_error(run(model, noise, cond, uncond, scheduler=scheduler), expected) <= 1e-4


@pytest.mark.parametrize("family", ["dit", "pixart"])
@pytest.mark.parametrize("patches", [2, 4])
def test_exact_and_fully_warmed_displaced_patches_equal_single(dit, noise, family, patches):
  model = dit[1] if family == "dit" else make_pixart("alpha")[1]
  cond, uncond = dit_conditioning() if family == "dit" else pixart_conditioning()
  steps = 3
  single = run(model, noise, cond, uncond, num_steps=steps)
  mesh = dfjax.make_mesh(patch=patches, devices=jax.devices()[:patches])
  for strategy in (dfjax.Strategy.exact(), dfjax.Strategy.displaced(warmup_steps=steps)):
    got = run(model, noise, cond, uncond, num_steps=steps, mesh=mesh, strategy=strategy)
    assert relative_error(got, single) <= 1e-5, strategy.summary()


def test_displaced_after_warm_up_differs_but_stays_close(dit, noise):
  _, model = dit
  cond, uncond = dit_conditioning()
  single = run(model, noise, cond, uncond, num_steps=4)
  mesh = dfjax.make_mesh(patch=2, devices=jax.devices()[:2])
  stale = run(model, noise, cond, uncond, num_steps=4, mesh=mesh, strategy=dfjax.Strategy.displaced(warmup_steps=1))
  error = relative_error(stale, single)
  assert 1e-6 < error < 0.5, error


def test_a_patch_count_that_splits_tokens_is_refused(dit, noise):
  _, model = dit
  cond, uncond = dit_conditioning()
  mesh = dfjax.make_mesh(patch=8, devices=jax.devices()[:8])
  with pytest.raises(ValueError, match=r"height 8 over 8 row patches .*valid patch counts for height 8: \[1, 2, 4\]"):
    run(model, noise, cond, uncond, num_steps=1, mesh=mesh, strategy=dfjax.Strategy.exact())


def test_dit_conditioning_names_the_missing_field(dit, noise):
  _, model = dit
  with pytest.raises(ValueError, match="lacks 'class_labels'"):
    run(model, noise, {"encoder_hidden_states": np.zeros((BATCH, 1, 4), np.float32)}, None, guidance_scale=1.0)
