"""The GPU benchmark harness on the CPU: analytic FLOPs, the simulated per-device program, the CLI.

The simulated program (one device of an N-device patch mesh, collectives replaced by stand-ins)
must have the real shard's output shape and exchange exactly what the real PatchContext does;
the analytic FLOP count must be the published SDXL figure and agree with XLA's cost analysis;
`bench strategies` and `bench simulate` run DiT and PixArt with every sequence strategy.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dfjax import commands
from dfjax.bench import simulate, simulate_stages, strategies, table, unet
from dfjax.bench.models import model_config
from dfjax.bench.flops import analytic_unet_flops, flops_by_kind
from dfjax.bench.timing import device_name
from dfjax.bench.unet import compiled_flops, random_unet, unet_inputs
from dfjax.sampling import Conditioning, stale_buffer_shapes
from models.config import UNetConfig
from models.presets import transformer_config, unet_preset
from sharding.accounting import analytic
from sharding.mesh import axis_sizes, describe, make_mesh
from sharding.strategies import Strategy, strategy_class, strategy_names

# Two levels keep tracing and compiling short; every exchange kind is there (halo convs incl. the
# strided one, self-attention K/V, GroupNorm moments) and SDXL's micro-conditioning.
TWO_LEVEL_SDXL = {
    "block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8, "attention_head_dim": [2, 4],
    "cross_attention_dim": 32, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "transformer_layers_per_block": [1, 2],
    "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 32 + 6 * 8,
}
HEIGHT, WIDTH = 32, 16  # latent: 32 rows split into 2 or 4 patches of whole rows at both levels


@pytest.fixture(scope="module")
def model():
  return random_unet(UNetConfig.from_diffusers_config(TWO_LEVEL_SDXL), jnp.float32)


def _shapes(tree):
  return jax.tree.map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype)), tree)


# ---------------------------------------------------------------------------------- FLOPs

def test_analytic_flops_of_sdxl_at_1024_are_the_published_figure():
  sdxl = UNetConfig.from_diffusers_config(unet_preset("sdxl"))
  assert analytic_unet_flops(sdxl, 128, 128) == pytest.approx(6.76e12, rel=2e-3)  # DistriFusion, DiffusionPipe
  assert analytic_unet_flops(sdxl, 128, 128, batch=2) == 2 * analytic_unet_flops(sdxl, 128, 128)
  by_kind = flops_by_kind(sdxl, 256, 256)  # attention grows with tokens², the rest with tokens
  assert by_kind["attention"] / by_kind["conv"] > flops_by_kind(sdxl, 128, 128)["attention"] / flops_by_kind(sdxl, 128, 128)["conv"]


def test_analytic_flops_match_xla_cost_analysis():
  # Wide channels: XLA also counts elementwise work, which is ~1 % here (more on narrow UNets).
  config = UNetConfig.from_diffusers_config({**TWO_LEVEL_SDXL, "block_out_channels": [128, 256]})
  abstract = nnx.eval_shape(lambda: random_unet(config, jnp.float32))
  graphdef, params = nnx.split(abstract)
  x, t, text, extra = unet_inputs(config, 2, 16, 16)
  forward = jax.jit(lambda params, x, t, text, extra: nnx.merge(graphdef, params)(x, t, text, **extra))
  xla = compiled_flops(forward.lower(params, x, t, text, extra).compile())
  assert xla == pytest.approx(analytic_unet_flops(config, 16, 16, batch=2, padded=False), rel=0.03)


# ---------------------------------------------------------------------------------- the simulated program

@pytest.mark.parametrize("patches", [2, 4])
def test_simulated_program_has_the_real_shards_output_shape(model, patches):
  graphdef, params = nnx.split(model)
  mesh, exact = make_mesh(1, 1, patches), Strategy.exact()
  real = simulate.device_step(graphdef, mesh, exact.steady_phase(axis_sizes(mesh)), exact.latent_spec())
  real_args = simulate.place(mesh, exact.latent_spec(), params, *simulate.model_inputs(model.config, 2, HEIGHT, WIDTH))
  real_out = jax.eval_shape(real, *real_args)[0]
  shard = jax.sharding.NamedSharding(mesh, exact.latent_spec()).shard_shape(real_out.shape)  # B, H/N, W, C
  assert shard[1] == HEIGHT // patches
  assert set(simulate.simulated_strategies()) >= {"exact", "displaced", "naive"}  # every row strategy, from the registry
  for name in simulate.simulated_strategies():
    step, args = simulate.simulated_program(model, HEIGHT, WIDTH, patches, Strategy.from_name(name))
    out = jax.eval_shape(step, *args)[0]
    assert (out.shape, out.dtype) == (shard, real_out.dtype)
    assert args[1].shape == shard  # its input rows are the real shard's too


@pytest.mark.parametrize("patches,groupnorm", [(2, "corrected_async"), (4, "stale"), (4, "separate")])
def test_simulated_exchanges_have_the_shapes_of_the_real_ones(model, patches, groupnorm):
  """The stale inputs and sent outputs of the simulated displaced step are, layer by layer, what
  the real displaced run carries from step to step: what PatchContext's collectives deliver."""
  strategy = Strategy.displaced(warmup_steps=1, groupnorm=groupnorm)
  step, args = simulate.simulated_program(model, HEIGHT, WIDTH, patches, strategy)
  stale, sent = args[-1], jax.eval_shape(step, *args)[1]

  _, _, text, extra = unet_inputs(model.config, 1, HEIGHT, WIDTH)
  noise = np.zeros((1, HEIGHT, WIDTH, 4), np.float32)
  cond = Conditioning(text, **extra)
  real = stale_buffer_shapes(model, noise, cond, uncond=cond, num_steps=4, mesh=make_mesh(1, 1, patches),
                             strategy=strategy)
  assert set(sent) == set(real) and len(real) > 0
  assert _shapes(sent) == _shapes(real) == _shapes(stale)
  kinds = {k: 0 for k in ("halo", "kv", "moments")}
  for key, value in real.items():  # classify each layer's buffer to compare with the analytic volume
    kind = "halo" if isinstance(value, tuple) else "kv" if value.ndim == 6 else "moments"  # kv: 2,B,n,T,N,D
    kinds[kind] += sum(v.size * v.dtype.itemsize for v in jax.tree.leaves(value))
  expected = analytic.stale_bytes(model.config, HEIGHT, WIDTH, patches, 2, 4, stale_moments=groupnorm != "separate")
  assert {k: v for k, v in kinds.items() if v} == {k: v for k, v in expected.items() if v}


def test_the_simulated_exact_step_carries_nothing(model):
  step, args = simulate.simulated_program(model, HEIGHT, WIDTH, 2, Strategy.exact())
  assert args[-1] is None and jax.eval_shape(step, *args)[1] == {}


ALL_KINDS = {"input_halo", "halo", "kv", "moments"}
# TWO_LEVEL_SDXL's collectives per step, counted by hand: 8 resnets (2 GroupNorms, 2 3×3 convs each),
# the down- and upsampling convs, 4 transformers (a GroupNorm each) with 8 self-attentions in all, the
# output GroupNorm and conv: 19 halo convs (2 permutes each), 8 K/V gathers, 21 moment gathers; and
# conv_in, whose halo of this step's latent rows (2 permutes) every strategy that exchanges waits for.
HAND_COUNTED_COLLECTIVES = {"input_halo": 2, "halo": 2 * 19, "kv": 8, "moments": 21}


@pytest.mark.parametrize("strategy,exchanged,synchronous", [
    (Strategy.exact(), ALL_KINDS, ALL_KINDS),                                  # used inside the step
    (Strategy.displaced(groupnorm="sync"), ALL_KINDS, {"input_halo", "moments"}),  # sync moments wait too
    (Strategy.displaced(groupnorm="corrected_async"), ALL_KINDS, {"input_halo"}),
    (Strategy.displaced(groupnorm="separate"), {"input_halo", "halo", "kv"}, {"input_halo"}),  # no moments
    (Strategy.naive(), set(), set()),
], ids=["exact", "displaced-sync", "displaced-corrected_async", "displaced-separate", "naive"])
def test_comm_bytes_split_into_what_the_step_waits_for_and_what_overlaps(model, strategy, exchanged,
                                                                          synchronous):
  volume = analytic.bytes_per_step(model.config, HEIGHT, HEIGHT, 4, 2, 4)  # one interior device, CFG batch 2
  sync, overlapped, collectives = simulate.comm_bytes(model.config, HEIGHT, 4, strategy, 4)
  assert sync == sum(volume[kind] for kind in synchronous)
  assert overlapped == sum(volume[kind] for kind in exchanged - synchronous)
  assert collectives == sum(HAND_COUNTED_COLLECTIVES[kind] for kind in exchanged)


def test_a_configuration_that_does_not_fit_is_skipped_with_a_note(model, monkeypatch, capsys):
  def out_of_memory(*args):
    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 99.0GiB.")

  monkeypatch.setattr(simulate, "simulated_program", out_of_memory)
  assert simulate._measure(model, 3840, 480, 2, Strategy.exact(), 1) is None
  assert "skipped: does not fit in device memory" in capsys.readouterr().out
  monkeypatch.setattr(simulate, "simulated_program", lambda *a: (_ for _ in ()).throw(jax.errors.JaxRuntimeError("INTERNAL: bug")))
  with pytest.raises(jax.errors.JaxRuntimeError):  # other runtime errors are not swallowed
    simulate._measure(model, 512, 64, 2, Strategy.exact(), 1)


def test_projection_adds_comm_for_exact_and_overlaps_it_for_displaced():
  # Worked by hand: 100 GB/s, a 50 ms step, 10 collectives; 3 GB take 30 ms over the link.
  link = simulate.Link("test link", 100e9, "")
  exact = simulate.SimRun(2048, 4, "exact", 1.0, 0.05, sync_bytes=int(3e9), collectives=10)
  displaced = simulate.SimRun(2048, 4, "displaced", 1.0, 0.05, async_bytes=int(3e9), collectives=10)
  mixed = simulate.SimRun(2048, 4, "mixed", 1.0, 0.05, sync_bytes=int(1e9), async_bytes=int(6e9),
                          collectives=10)
  assert exact.projected_s(link, 0.0) == pytest.approx(0.08)  # 50 ms compute, then 30 ms waiting
  assert exact.projected_s(link, 1e-3) == pytest.approx(0.09)  # + 10 × 1 ms latency
  assert displaced.projected_s(link, 0.0) == pytest.approx(0.05)  # 30 ms hidden under 50 ms compute
  assert displaced.projected_s(link, 1e-3) == pytest.approx(0.05)  # 40 ms still hidden
  assert displaced.projected_s(link, 3e-3) == pytest.approx(0.06)  # 60 ms: the link is the bound
  assert mixed.projected_s(link, 1e-3) == pytest.approx(0.08)  # 60 ms overlapped > 50, + 10 + 10 ms waited


# ---------------------------------------------------------------------------------- the commands

def test_a_table_is_rendered_from_its_rows():
  rows = [simulate.SimRun(512, 1, "single", 3.25, 0.4),
          simulate.SimRun(512, 2, "exact", 5.0, 0.25, hlo_bytes=3 * 2**20)]
  columns = (table.Column("N", "patch", width=2), table.Column("strategy", "strategy", width=9, align="<"),
             table.Column("ms", "step_s", ".1f", 6, 1e3, group="step"),
             table.Column("MiB", "hlo_bytes", ".1f", 4, 2**-20, group="step"),
             table.Column("x", lambda run: f"{0.4 / run.step_s:.2f}×"))
  assert table.render(columns, rows, indent="  ").splitlines() == [
      "               ─── step ──",  # the group title centred over its columns' 11 characters
      "   N strategy      ms  MiB x",
      "   1 single     400.0    — 1.00×",
      "   2 exact      250.0  3.0 1.60×",
  ]



@pytest.fixture
def config_file(tmp_path):
  path = tmp_path / "config.json"
  path.write_text(json.dumps(TWO_LEVEL_SDXL))
  return str(path)


def test_bench_unet_times_jax_and_diffusers(config_file, capsys, returned):
  timings = returned(unet, "run")
  code = commands.main(["bench", "unet", "--config", config_file, "--resolution", "64", "--iters", "1"])
  out = capsys.readouterr().out
  assert code == 0, out
  assert "×eager" in out and "XLA/anl" in out and f"on {device_name()}" in out and " thread" in out
  by_impl = {t.impl: t for t in timings[0]}
  assert set(by_impl) == {"dfjax (jax)", "diffusers eager"}
  jax_timing = by_impl["dfjax (jax)"]
  assert jax_timing.resolution == 64 and jax_timing.peak_bytes is None  # no peak memory on a CPU
  assert jax_timing.compile_s > 0 and by_impl["diffusers eager"].compile_s is None  # eager compiles nothing
  assert 0.9 < jax_timing.xla_flops / jax_timing.flops < 1.2  # XLA's FLOPs vs the analytic count
  assert jax_timing.flops == by_impl["diffusers eager"].flops  # one analytic count for every row


@pytest.mark.slow  # 25 s; the simulated programs' shapes stay in the default run
def test_bench_simulate_measures_and_projects(config_file, capsys, returned):
  runs = returned(simulate, "run")
  code = commands.main(["bench", "simulate", "--config", config_file, "--resolution", "128", "--patch", "2",
                        "--strategies", "displaced", "--iters", "1", "--hlo-comm"])
  out = capsys.readouterr().out
  assert code == 0, out
  assert "PROJECTIONS" in out and "A100 NVLink3" in out and "300 GB/s" in out and f"on {device_name()}" in out
  by_key = {(run.patch, run.strategy): run for run in runs[0]}
  assert set(by_key) == {(1, "single"), (2, "displaced")}
  displaced = by_key[(2, "displaced")]
  assert displaced.resolution == 128 and displaced.step_s > 0
  assert displaced.sync_bytes + displaced.async_bytes == displaced.hlo_bytes > 0  # analytic == compiled
  assert by_key[(1, "single")].hlo_bytes is None and by_key[(1, "single")].collectives == 0


def test_simulate_offers_the_row_strategies_not_the_reference(capsys):
  with pytest.raises(SystemExit) as exit_info:  # single is the reference row, not a choice
    commands.main(["bench", "simulate", "--strategy", "single"])
  assert exit_info.value.code == 2
  offered = (*simulate.simulated_strategies(), *simulate_stages.STAGE_STRATEGIES)  # the stage ones: FLOP-projected
  choices = ", ".join(repr(name) for name in offered)
  assert f"invalid choice: 'single' (choose from {choices})" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["bench", "unet", "--config", "no-such-preset", "--no-torch"], "preset"),
    (["bench", "simulate", "--config", "no-such-preset"], "preset"),
    (["bench", "unet", "--resolution", "100", "--no-torch"], "multiple of 8"),
    (["bench", "simulate", "--resolution", "100"], "multiple of 8"),
    (["bench", "unet", "--resolution", "72", "--no-torch"], "multiples of 32"),  # latent 9: not /4
    (["bench", "simulate", "--resolution", "256", "--patch", "3"], "3 row patches"),
    (["bench", "simulate", "--resolution", "256", "--patch", "0"], "patch counts"),
    (["bench", "simulate", "--groupnorm", "approx"], "GroupNorm mode"),
])
def test_bad_arguments_exit_with_a_clear_message(argv, message, capsys):
  assert commands.main(argv) == 2
  err = capsys.readouterr().err
  assert "error:" in err and message in err, err


# ---------------------------------------------------------------------------------- DiT / PixArt benches

def test_published_pixart_figures_sit_beside_the_matching_rows():
  pixart, unet_config = transformer_config("pixart-alpha-1024"), UNetConfig.from_diffusers_config(TWO_LEVEL_SDXL)
  ulysses, single = simulate.SimRun(1024, 8, "ulysses", 1.0, 0.1), simulate.SimRun(2048, 1, "single", 1.0, 1.0)
  assert simulate.published_speedup(pixart, ulysses) == pytest.approx(2.085 / 1.37)  # the table's seconds
  assert simulate.published_seconds(pixart, ulysses) == 1.37
  assert simulate.published_seconds(pixart, single) == 16.22  # one GPU
  assert simulate.published_speedup(pixart, simulate.SimRun(1024, 4, "ulysses", 1.0, 0.1)) is None  # 8 GPUs only
  assert simulate.published_speedup(unet_config, simulate.SimRun(1024, 8, "displaced", 1.0, 0.1)) == 2.8  # SDXL
  assert simulate.published_seconds(unet_config, ulysses) is None
  assert simulate.published_speedup(transformer_config("tiny-dit"), ulysses) is None  # no DiT table


def test_bench_strategies_skips_a_split_that_does_not_fit_and_refuses_a_count_none_fits(capsys):
  config = UNetConfig.from_diffusers_config(TWO_LEVEL_SDXL)  # self-attention heads 4
  chosen = [Strategy.ulysses(), Strategy.usp()]
  fitting = strategies.runs_that_fit(config, 32, [4, 8], 1, chosen)
  assert [(s.name, describe(mesh)) for s, mesh in fitting] == [
      ("ulysses", "cfg=1×patch=4"), ("usp", "cfg=1×patch=2×ulysses=2"), ("usp", "cfg=1×patch=4×ulysses=2"),
      ("usp", "cfg=1×patch=2×ulysses=4")]
  assert "ulysses on cfg=1×patch=8 skipped: ulysses splits" in capsys.readouterr().out
  with pytest.raises(ValueError, match=r"valid patch counts for height 12: \[1, 2, 3, 6\]"):  # 12 rows: not 8 patches
    strategies.runs_that_fit(config, 12, [8], 1, [Strategy.ring()])
  with pytest.raises(ValueError, match="'sdxl' is not a dit preset; valid: dit-xl-2-256"):
    model_config("dit", "sdxl")


def test_bench_strategies_on_a_stage_by_patch_mesh_runs_pipefusion_beside_the_row_strategies():
  """Which strategy runs on a mesh is asked of the strategy (its method's axis), not read off its axes:
  pipefusion, whose stages hold `patch` ranks, is the stage × patch hybrid; the row strategies and tensor get
  all four devices."""
  every = [Strategy.from_name(name) for name in strategy_names()
           if strategy_class(name).axes and strategy_class(name).supports(model_config("dit", None))]
  degrees = {"data": 1, "cfg": 1, "stage": 2, "patch": 2, "ulysses": 1, "tensor": 1}
  plans = strategies._hybrid_plans(every, degrees, model_config("dit", None), 16)
  assert [(s.name, describe(mesh)) for s, mesh in plans] == [
      *((name, "cfg=1×patch=4") for name in ("exact", "displaced", "naive", "ulysses", "ring")),
      ("tensor", "cfg=1×patch=1×tensor=4"), ("pipefusion", "cfg=1×stage=2×patch=2")]
  assert "pipefusion" not in simulate.simulated_strategies()  # projected from FLOPs (simulate_stages) instead


@pytest.mark.slow
def test_bench_strategies_on_a_dit_measures_every_sequence_strategy(capsys, returned):
  runs = returned(strategies, "run")
  assert commands.main(["bench", "strategies", "--model", "dit", "--resolution", "128", "--patch", "4",
                        "--num-steps", "3", "--warmup-steps", "1", "--iters", "1"]) == 0
  out = capsys.readouterr().out
  assert "tiny-dit" in out and "pipefusion on cfg=1×stage=4×patch=1 skipped: 2 blocks cannot fill 4 stages" in out
  by_name = {(run.strategy, run.mesh): run for run in runs[0]}
  four, usp = "cfg=1×patch=4", "cfg=1×patch=2×ulysses=2"
  sequence_and_patch = [("exact", four), ("displaced", four), ("naive", four), ("ulysses", four), ("ring", four),
                        ("usp", usp)]
  assert list(by_name) == [("single", "cfg=1×patch=1"), *sequence_and_patch]  # every DiT strategy that fits 4 devices
  for run in (by_name[key] for key in sequence_and_patch):  # bytes read from the compiled program == analytic
    assert run.comm_bytes == run.analytic_bytes and run.stale_bytes == run.analytic_stale_bytes and run.patch == 4
  assert by_name["displaced", four].stale_bytes > 0 and by_name["usp", usp].comm_bytes > 0


@pytest.mark.slow
def test_bench_simulate_on_pixart_projects_the_sequence_strategies(capsys, returned):
  runs = returned(simulate, "run")
  assert commands.main(["bench", "simulate", "--model", "pixart", "--resolution", "128", "--patch", "4",
                        "--strategies", "ulysses", "ring", "usp", "--iters", "1", "--hlo-comm"]) == 0
  out = capsys.readouterr().out
  assert "PixArt-α's measured 20-step" in out and "proj. 20 steps s" in out
  by_key = {(run.strategy, run.mesh): run for run in runs[0]}
  assert set(by_key) == {("single", ""), ("ulysses", "patch=4"), ("ring", "patch=4"), ("usp", "patch=2×ulysses=2")}
  for key, run in by_key.items():
    if key[0] != "single":  # the simulated program's analytic traffic == the compiled 4-device program's
      assert run.sync_bytes + run.async_bytes == run.hlo_bytes > 0
