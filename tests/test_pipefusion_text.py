"""PipeFusion's text, handled once per run as its authors do, read from the compiled program: the
caption projection and every cross-attention layer's K/V projections of the (constant) text states
run in the first step only — each stage keeps the K/V in the carry (`stale_bytes`' "text_kv") and
the micro-steps read them — and the text states cross each cut in that step only. Tiny PixArt,
2 stages of 2 blocks, fp32, the guidance pair on every device (batch 2), 5 text tokens."""

import jax
import numpy as np
import pytest
from flax import nnx

from dfjax.sampling import lower_sample, sample, stale_buffer_shapes
from models.dit import PixArtTransformer2DModel
from models.dit_config import PixArtConfig
from sharding.accounting import comm, flops
from sharding.strategies import Strategy
from test_pipefusion import HEIGHT, STEPS, TINY_PIXART, WIDTH, _args, _error, _mesh, _perturb, _run

D, TEXT, CAPTION, BATCH = 16, 5, 12, 2  # width (2 heads × 8), text tokens, caption channels, guidance pair
CAPTION_FLOPS = 2 * BATCH * TEXT * (CAPTION + D) * D  # caption projection: linear_1 (12 → 16), linear_2 (16 → 16)
TEXT_KV_FLOPS = 2 * 2 * BATCH * TEXT * D * D  # one cross-attention layer's to_k and to_v (16 → 16)


@pytest.fixture(scope="module")
def pixart():
  """Its initial weights: what it computes does not matter to FLOPs, bytes and shapes."""
  return PixArtTransformer2DModel(PixArtConfig.from_diffusers_config(TINY_PIXART), rngs=nnx.Rngs(1))


def _compiled_text(model, strategy, steps, stages=2):
  args, kwargs = _args(model, _mesh(stage=stages, patch=1), strategy, steps=steps, batch=1)
  return lower_sample(*args, **kwargs).compile().as_text()


def _single_forward_flops(model):
  """Dot FLOPs of one compiled single-device model call on the whole image, for the guidance pair."""
  args, kwargs = _args(model, None, Strategy.single(), batch=1)
  cond, uncond = args[2].as_kwargs(), kwargs["uncond"].as_kwargs()
  pair = {name: np.concatenate([cond[name], uncond[name]]) for name in cond}
  x = jax.numpy.zeros((BATCH, HEIGHT, WIDTH, 4))
  return flops.program_flops(jax.jit(lambda x, pair: model(x, 500.0, **pair)).lower(x, pair).compile().as_text())


@pytest.mark.parametrize("stages", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_text_projections_run_in_the_first_step_only(pixart, stages):
  """One patch, so a micro-step runs a stage on the whole image, as the first (synchronous) step does: each
  stage's micro-step does exactly its text projections fewer FLOPs (stage 0: the caption projection too)."""
  text = _compiled_text(pixart, Strategy.pipefusion(num_patches=1), steps=2, stages=stages)  # sync, pipelined
  conditionals = flops.branch_flops(text)
  synchronous = [max(branches) for branches in conditionals if len(branches) == 2]  # each stage's (idle, run)
  (micro_step,) = {branches for branches in conditionals if len(branches) == stages + 1}  # stages…, idle
  assert sum(synchronous) == _single_forward_flops(pixart)  # the first step: the whole model, every stage once
  blocks = TINY_PIXART["num_layers"] // stages
  saved = [blocks * TEXT_KV_FLOPS + (CAPTION_FLOPS if stage == 0 else 0) for stage in range(stages)]
  assert [run - kept for run, kept in zip(synchronous, saved)] == list(micro_step[:stages])
  assert micro_step[stages] == 0  # a stage with no patch this micro-step computes nothing
  assert Strategy.pipefusion().text_flops(pixart.config, stages, BATCH, TEXT) == tuple(saved)


@pytest.mark.slow
def test_text_states_cross_each_cut_in_the_first_step_only(pixart):
  """Three synchronous steps (warm-up 2): the first sends the activation and the text states and mask across
  the cut, the later two only the activation (they read what each stage kept)."""
  run = comm.run_traffic(_compiled_text(pixart, Strategy.pipefusion(num_patches=2, warmup_steps=2), steps=3))
  tokens = (HEIGHT // 2) * (WIDTH // 2)
  activation = BATCH * (tokens + 7) * D * 4  # the token grid, the timestep embedding, adaLN-single's 6D; fp32
  text_states = BATCH * TEXT * (D * 4 + 4)  # 5 projected states 16 wide and the (float32) mask, per sample
  assert pixart.config.patch_size == 2 and text_states == Strategy.pipefusion().conditioning_bytes(
      pixart.config, BATCH, 4, TEXT, mask_itemsize=4)
  assert run.by_kind["collective-permute"] == (3 * 3 + 2, 3 * activation + text_states)  # 3 leaves a step, 2 once


@pytest.mark.parametrize("ulysses", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_kept_text_kv_are_the_analytic_bytes(pixart, ulysses):
  """Every cross-attention layer's K and V of the text, all heads (the text is not split over `ulysses`)."""
  strategy = Strategy.pipefusion(num_patches=2, stage_layers=(3, 1))
  args, kwargs = _args(pixart, _mesh(stage=2, patch=1, ulysses=ulysses), strategy, batch=1)
  kept = stale_buffer_shapes(*args, **kwargs)["text_kv"]
  assert kept.shape == (3, 2, BATCH, TEXT, 2, 8)  # the larger stage's 3 layers, K/V, pair, text, heads, width
  sizes = {"stage": 2, "ulysses": ulysses}
  expected = strategy.stale_bytes(pixart.config, HEIGHT, WIDTH, sizes, BATCH, 4, text_tokens=TEXT)
  assert kept.size * kept.dtype.itemsize == expected["text_kv"]


@pytest.mark.slow
def test_warm_up_over_every_step_equals_single_reading_the_kept_text():
  """Every step after the first reads the kept text K/V and text states: still `single`'s result."""
  pixart = PixArtTransformer2DModel(PixArtConfig.from_diffusers_config(TINY_PIXART), rngs=nnx.Rngs(1))
  _perturb(pixart)  # random gates and output layers, so that every block matters
  expected = _run(pixart, None, Strategy.single())
  got = _run(pixart, _mesh(stage=2, patch=1), Strategy.pipefusion(num_patches=2, warmup_steps=STEPS))
  assert _error(got, expected) <= 1e-5
