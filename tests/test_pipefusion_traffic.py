"""PipeFusion's per-step traffic read from the compiled program (sharding/accounting/comm.py) equals
its analytic volume (`expected_traffic`: patch activations per stage boundary with their per-sample
vectors — PixArt's text states stay on each stage from the synchronous step — the latent ring, and
with sequence ranks inside each stage their K/V gathers, all-to-alls and output gather), for N = 2, 4
stages and M = N, 2N patches, DiT and PixArt, alone and with `patch` / `ulysses` inside the stages.

Five steps without extra warm-up: the synchronous step, the pipeline's start and its drain are one
step each (XLA inlines those scans), so the one step loop left is the steady phase's two steps,
each a scan of K = max(M, N) micro-steps that the reader counts K times.
"""

import functools

import pytest
from flax import nnx

from dfjax.sampling import lower_sample
from models.dit import DiTConfig, DiTTransformer2DModel, PixArtTransformer2DModel
from models.dit_config import PixArtConfig
from sharding.accounting import comm, hlo
from sharding.axes import CFG, ULYSSES
from sharding.mesh import axis_sizes
from sharding.strategies import Guidance, Strategy
from test_pipefusion import HEIGHT, TINY_DIT, TINY_PIXART, WIDTH, _args, _mesh

STEPS = 5
TEXT_TOKENS = 5  # the PixArt prompt of test_pipefusion's `_args`


@functools.cache
def _model(family: str):
  if family == "dit":
    return DiTTransformer2DModel(DiTConfig.from_diffusers_config(TINY_DIT), rngs=nnx.Rngs(0))
  return PixArtTransformer2DModel(PixArtConfig.from_diffusers_config(TINY_PIXART), rngs=nnx.Rngs(0))


@functools.cache
def _compiled(family: str, stages: int, patches: int, cfg: int = 1, sequence: tuple = ()) -> tuple[str, dict]:
  """(the compiled program's HLO text, the mesh's sizes) of PipeFusion on cfg × stage (× `sequence`: (axis,
  degree) pairs of patch, ulysses) devices; compiled once for every test that reads it."""
  mesh = _mesh(cfg=cfg, stage=stages, **{"patch": 1, **dict(sequence)})
  args, kwargs = _args(_model(family), mesh, Strategy.pipefusion(num_patches=patches), steps=STEPS)
  return lower_sample(*args, **kwargs).compile().as_text(), axis_sizes(mesh)


def _steady_traffic(family: str, stages: int, patches: int, cfg: int = 1, **sequence) -> tuple[comm.StepTraffic, dict]:
  """(the one step loop's traffic from the HLO, the mesh's sizes)."""
  text, sizes = _compiled(family, stages, patches, cfg, tuple(sorted(sequence.items())))
  (steady,) = comm.traffic_per_step(text)
  return steady, sizes


def _expected(model, sizes, patches: int) -> dict[str, int]:
  batch = 2 // sizes[CFG]  # one image: the guidance pair, split over cfg
  return Strategy.pipefusion(num_patches=patches).expected_traffic(model.config, HEIGHT, WIDTH, sizes, batch, 4)


def test_dit_two_stages_by_hand():
  steady, sizes = _steady_traffic("dit", stages=2, patches=2)
  # per micro-step (K = 2): the token patch (2 samples × 16 tokens × 16 wide) and the conditioning (2 × 16)
  # to the next stage; the new latent patch (1 image × 8 × 8 × 4) and its s32 slot back to stage 0
  per_micro_step = (2 * 16 * 16 + 2 * 16) * 4 + 8 * 8 * 4 * 4 + 4
  assert steady.by_kind == {"collective-permute": (2 * 4, 2 * per_micro_step)}
  assert sum(_expected(_model("dit"), sizes, 2).values()) == 2 * per_micro_step


def test_pixart_text_states_stay_on_each_stage_after_the_synchronous_step():
  steady, sizes = _steady_traffic("pixart", stages=2, patches=2)
  # per micro-step (K = 2): the token patch (2 samples × 16 tokens × 16 wide) and the timestep embedding and
  # adaLN-single's modulation (2 × 7 × 16), not the 5 text states and their mask; the ring as for a DiT
  per_micro_step = (2 * 16 * 16 + 2 * 7 * 16) * 4 + 8 * 8 * 4 * 4 + 4
  assert steady.by_kind == {"collective-permute": (2 * 5, 2 * per_micro_step)}  # 3 activation leaves, 2 ring
  assert sum(_expected(_model("pixart"), sizes, 2).values()) == 2 * per_micro_step


@pytest.mark.parametrize("family,sequence", [
    ("dit", dict(patch=2)), pytest.param("dit", dict(ulysses=2), marks=pytest.mark.slow),
    pytest.param("dit", dict(patch=2, ulysses=2), marks=pytest.mark.slow),
    pytest.param("pixart", dict(patch=2), marks=pytest.mark.slow),
    pytest.param("pixart", dict(ulysses=2), marks=pytest.mark.slow)])
def test_sequence_ranks_inside_the_stages_add_their_exchanges(family, sequence):
  """Inside each stage: `patch` ranks' K/V all-gathers, `ulysses` ranks' all-to-alls, the output's rows gathered."""
  steady, sizes = _steady_traffic(family, 2, 2, **sequence)
  expected = _expected(_model(family), sizes, 2)
  assert steady.total_bytes == sum(expected.values()) and expected["sequence"] > 0
  kinds = {"collective-permute", "all-gather"} | ({"all-to-all"} if "ulysses" in sequence else set())
  assert set(steady.by_kind) == kinds


@pytest.mark.parametrize("family,stages,patches", [
    pytest.param("pixart", 2, 4, marks=pytest.mark.slow), pytest.param("dit", 2, 4, marks=pytest.mark.slow), pytest.param("dit", 4, 4, marks=pytest.mark.slow),
    pytest.param("dit", 4, 8, marks=pytest.mark.slow), pytest.param("pixart", 2, 2, marks=pytest.mark.slow),
    pytest.param("pixart", 4, 4, marks=pytest.mark.slow), pytest.param("pixart", 4, 8, marks=pytest.mark.slow)])
def test_steady_step_traffic_equals_the_analytic_volume(family, stages, patches):
  steady, sizes = _steady_traffic(family, stages, patches)
  assert set(steady.by_kind) == {"collective-permute"}  # only point-to-point sends between stages
  assert steady.total_bytes == sum(_expected(_model(family), sizes, patches).values())


@pytest.mark.slow
def test_guidance_over_cfg_adds_each_micro_steps_prediction_gather():
  model = _model("pixart")
  steady, sizes = _steady_traffic("pixart", stages=2, patches=2, cfg=2)
  rows = HEIGHT // 2
  # the guided noise prediction (in_channels: the learned variance is not combined) of each micro-step
  guidance = Guidance.for_mesh(True, sizes).expected_traffic(2 * rows * WIDTH * model.config.in_channels, 4)
  assert steady.by_kind["collective-permute"][1] == sum(_expected(model, sizes, 2).values())
  assert steady.by_kind["all-gather"][1] == guidance["guidance"]


@pytest.mark.parametrize("family,stages,patches,sequence", [
    ("dit", 2, 2, ()), ("pixart", 2, 2, ()), ("dit", 2, 2, (("patch", 2),)),
    pytest.param("dit", 2, 2, (("ulysses", 2),), marks=pytest.mark.slow),
    pytest.param("dit", 4, 8, (), marks=pytest.mark.slow), pytest.param("pixart", 4, 4, (), marks=pytest.mark.slow)],
    ids=["dit-N2-M2", "pixart-N2-M2", "dit-N2-M2-patch2", "dit-N2-M2-ulysses2", "dit-N4-M8", "pixart-N4-M4"])
def test_step_loops_carry_the_analytic_kv_buffers(family, stages, patches, sequence):
  """The stale memory as XLA allocates it: every step loop of the compiled program carries, once, the
  device's K/V buffer — a full-sequence K and V per self-attention layer of the largest stage, of the
  device's heads (1/ulysses of them; patch ranks keep every token's) — and PixArt's cross-attention K/V of
  the 5 text states, every head; their bytes are the analytic `stale_bytes`. (The compiles are the traffic
  tests'.)"""
  text, sizes = _compiled(family, stages, patches, sequence=sequence)
  config, strategy = _model(family).config, Strategy.pipefusion(num_patches=patches)
  layers, tokens = max(strategy.layers_per_stage(config, stages)), (HEIGHT // 2) * (WIDTH // 2)
  heads, head_dim = config.num_attention_heads, config.attention_head_dim
  buffers = {"kv": ("f32", (layers, 2, 2, tokens, heads // sizes[ULYSSES], head_dim))}  # K/V, guidance pair
  if family == "pixart":
    buffers["text_kv"] = ("f32", (layers, 2, 2, TEXT_TOKENS, heads, head_dim))
  expected = strategy.stale_bytes(config, HEIGHT, WIDTH, sizes, 2, 4, text_tokens=TEXT_TOKENS)
  module = hlo.parse(text)
  step_loops = [hlo.array_shapes(i.shape) for i in module.computations[module.entry] if i.opcode == "while"]
  assert len(step_loops) >= 2  # the synchronous step, the pipeline's
  for name, buffer in buffers.items():
    assert all(carry.count(buffer) == 1 for carry in step_loops), (name, buffer, step_loops)
    assert hlo.nbytes(*buffer) == expected[name]
