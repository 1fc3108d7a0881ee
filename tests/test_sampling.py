"""`dfjax.sample` against a reference loop written with diffusers' UNet and schedulers, and the
guarantees of its single jitted program."""

import dataclasses
import re
import time

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import dfjax
from convert import convert_checkpoint
from dfjax.sampling import Conditioning, lower_sample, sample

TINY_SDXL = {
    "in_channels": 4, "out_channels": 4, "block_out_channels": (32, 64), "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "norm_num_groups": 8,
    "attention_head_dim": (2, 4), "transformer_layers_per_block": (1, 2), "cross_attention_dim": 32,
    "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 16 + 6 * 8,
}
SD_SCHEDULER = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
DIFFUSERS_SCHEDULERS = {"ddim": diffusers.DDIMScheduler, "euler": diffusers.EulerDiscreteScheduler,
                        "dpmpp_2m": diffusers.DPMSolverMultistepScheduler}
BATCH, HEIGHT, WIDTH, STEPS, GUIDANCE = 2, 16, 24, 10, 4.0


@pytest.fixture(scope="module")
def unets(tmp_path_factory):
  """(diffusers UNet, the same weights converted and loaded by dfjax)."""
  torch.manual_seed(0)
  unet = diffusers.UNet2DConditionModel(**TINY_SDXL).eval()
  with torch.no_grad():
    for p in unet.parameters():
      p.add_(0.05 * torch.randn_like(p))
  root = tmp_path_factory.mktemp("sampling")
  unet.save_pretrained(root / "diffusers")
  return unet, dfjax.load_model(convert_checkpoint(root / "diffusers", root / "dfjax"))


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  noise = rng.standard_normal((BATCH, HEIGHT, WIDTH, 4), np.float32)
  time_ids = np.tile(np.array([[128, 192, 0, 0, 128, 192]], np.float32), (BATCH, 1))

  def conditioning():
    return Conditioning(rng.standard_normal((BATCH, 7, 32), np.float32),
                        text_embeds=rng.standard_normal((BATCH, 16), np.float32), time_ids=time_ids)

  return noise, conditioning(), conditioning()


def _reference_loop(unet, scheduler_name, noise, cond, uncond):
  """The classic diffusers denoising loop with classifier-free guidance, NCHW, fp32."""
  scheduler = DIFFUSERS_SCHEDULERS[scheduler_name].from_config(SD_SCHEDULER)  # each class's own spacing
  scheduler.set_timesteps(STEPS)
  both = lambda field: torch.from_numpy(np.concatenate([getattr(uncond, field), getattr(cond, field)]))
  added = {"text_embeds": both("text_embeds"), "time_ids": both("time_ids")}
  context = both("encoder_hidden_states")
  x = torch.from_numpy(noise.transpose(0, 3, 1, 2)) * scheduler.init_noise_sigma
  with torch.no_grad():
    for t in scheduler.timesteps:
      x_in = scheduler.scale_model_input(torch.cat([x, x]), t)
      eps_uncond, eps_cond = unet(x_in, t, context, added_cond_kwargs=added).sample.chunk(2)
      x = scheduler.step(eps_uncond + GUIDANCE * (eps_cond - eps_uncond), t, x).prev_sample
  return x.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpmpp_2m"])
def test_ten_steps_equal_a_diffusers_reference_loop(unets, inputs, scheduler):
  torch_unet, model = unets
  noise, cond, uncond = inputs
  expected = _reference_loop(torch_unet, scheduler, noise, cond, uncond)
  got = np.asarray(sample(model, noise, cond, uncond=uncond, scheduler=scheduler, num_steps=STEPS,
                          guidance_scale=GUIDANCE, scheduler_config=SD_SCHEDULER))
  assert np.abs(got - expected).max() / np.abs(expected).max() <= 1e-4


def _instruction_count(compiled_text: str) -> int:
  return len(re.findall(r"^\s*(?:ROOT )?%\S+ = ", compiled_text, re.MULTILINE))


def test_program_and_compile_time_do_not_grow_with_steps(unets, inputs):
  _, model = unets
  noise, cond, uncond = inputs
  counts, seconds = [], []
  for steps in (10, 50):
    lowered = lower_sample(model, noise, cond, uncond=uncond, num_steps=steps, scheduler="dpmpp_2m",
                           mesh=dfjax.make_mesh(1, 2, 4), strategy=dfjax.Strategy.displaced(warmup_steps=2))
    start = time.perf_counter()
    compiled = lowered.compile()
    seconds.append(time.perf_counter() - start)
    counts.append(_instruction_count(compiled.as_text()))
  assert counts[0] == counts[1]
  assert seconds[1] < 2 * seconds[0] + 2.0, seconds


def _sample(model, noise, cond, **kwargs):
  return sample(model, jnp.asarray(noise), cond, **{"num_steps": 2, **kwargs})


def test_bad_input_names_the_problem(unets, inputs):
  _, model = unets
  noise, cond, uncond = inputs
  with pytest.raises(ValueError, match="unknown scheduler"):
    _sample(model, noise, cond, uncond=uncond, scheduler="pndm")
  with pytest.raises(ValueError, match="needs `uncond`"):
    _sample(model, noise, cond)
  with pytest.raises(ValueError, match="NHWC"):
    _sample(model, noise[0], cond, uncond=uncond)
  with pytest.raises(ValueError, match="channel"):
    _sample(model, noise[..., :3], cond, uncond=uncond)
  with pytest.raises(ValueError, match="nearest valid"):
    _sample(model, noise[:, :15], cond, uncond=uncond)
  no_time_ids = Conditioning(cond.encoder_hidden_states, text_embeds=cond.text_embeds)
  with pytest.raises(ValueError, match="time_ids"):
    _sample(model, noise, no_time_ids, guidance_scale=1.0)
  with pytest.raises(ValueError, match="uncond lacks 'time_ids'"):
    _sample(model, noise, cond, uncond=no_time_ids)
  with_labels = dataclasses.replace(uncond, class_labels=np.zeros(noise.shape[0], np.int32))
  with pytest.raises(ValueError, match="same fields"):
    _sample(model, noise, cond, uncond=with_labels)
  with pytest.raises(ValueError, match="batch"):
    _sample(model, noise[:1], cond, uncond=uncond)
  with pytest.raises(ValueError, match="cfg=2"):
    _sample(model, noise, cond, guidance_scale=1.0, mesh=dfjax.make_mesh(1, 2, 1))


def test_conditioning_may_be_a_mapping_of_the_models_names(unets, inputs):
  _, model = unets
  noise, cond, uncond = inputs
  as_dict = lambda c: {k: v for k, v in dataclasses.asdict(c).items() if v is not None}
  from_dataclass = np.asarray(_sample(model, noise, cond, uncond=uncond))
  from_mapping = np.asarray(_sample(model, noise, as_dict(cond), uncond=as_dict(uncond)))
  np.testing.assert_array_equal(from_mapping, from_dataclass)
  with pytest.raises(ValueError, match="unknown conditioning key.*'prompt_embeds'.*encoder_hidden_states"):
    _sample(model, noise, {**as_dict(cond), "prompt_embeds": cond.encoder_hidden_states}, uncond=uncond)
  with pytest.raises(ValueError, match="cond lacks 'text_embeds'.*encoder_hidden_states, text_embeds, time_ids"):
    _sample(model, noise, {k: v for k, v in as_dict(cond).items() if k != "text_embeds"}, uncond=uncond)


def test_opt_in_finite_check_names_the_step_where_nans_appear(unets, inputs):
  _, model = unets
  noise, cond, uncond = inputs
  broken = nnx.clone(model)
  broken.conv_out.bias.value = jnp.full_like(broken.conv_out.bias.value, jnp.nan)
  with pytest.raises(FloatingPointError, match=r"NaN or infinite at step 0 of 2 .*timestep"):
    _sample(broken, noise, cond, uncond=uncond, check_finite=True)
  assert np.isnan(np.asarray(_sample(broken, noise, cond, uncond=uncond))).all()  # unchecked: no error
  assert np.isfinite(np.asarray(_sample(model, noise, cond, uncond=uncond, check_finite=True))).all()
