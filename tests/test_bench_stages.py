"""`dfjax bench simulate` for AsyncDiff and PipeFusion: the FLOP-count projection on tiny models.

The expected values are worked out here from the cost model's per-segment FLOPs (models/build) and
the papers' schedules, not by the projection's own helpers: a brute-force balanced cut, the stage
blocks by hand, the patch traffic from the token counts.
"""

import itertools
import math

import pytest

from dfjax.bench import simulate_stages
from dfjax.bench.models import model_config
from dfjax.bench.simulate import Link
from dfjax.commands import main
from sharding.strategies.staged import segment_flops

FAST = Link("instant", 1e30, "no communication time")
SLOW = Link("slow", 1e6, "1 MB/s")
RATE = 1e12


def platform(link):
  return simulate_stages.Platform("test", RATE, link, {})


def best_cut(flops, parts):
  """The largest part of the most even split of `flops` into `parts` consecutive parts, by brute force."""
  return min(max(sum(flops[a:b]) for a, b in zip((0, *cuts), (*cuts, len(flops))))
             for cuts in itertools.combinations(range(1, len(flops)), parts - 1))


@pytest.mark.parametrize("components, stride", [(2, 1), (3, 2)])
def test_asyncdiff_compute_is_the_slowest_component_after_a_synchronous_warm_up(components, stride):
  config = model_config("unet", "tiny-sdxl")
  flops = [2 * f for f in segment_flops(config, 16, 16)]  # the CFG pair, 128² pixels
  steps, warm = 10, 3
  run = simulate_stages.asyncdiff_run(config, 128, components, stride, steps, warm, 2)
  assert run.devices == components + stride - 1
  assert run.unit_flops == pytest.approx(best_cut(flops, components))
  # warm-up: the whole model per step; then one component per device per iteration of `stride` steps
  iterations = math.ceil((steps - warm) / stride)
  expected = (warm * sum(flops) + iterations * best_cut(flops, components)) / RATE
  assert run.run_s(platform(FAST), 0) == pytest.approx(expected)
  assert run.step_s(platform(FAST), 0) == pytest.approx(best_cut(flops, components) / stride / RATE)
  # over a slow link the transfers dominate each iteration (overlapped: max, not a sum)
  assert run.unit_s(platform(SLOW), 0) == pytest.approx((run.unit_async_bytes + run.unit_sync_bytes) / 1e6)


def test_pipefusion_micro_steps_cost_the_slowest_stage_on_one_patch_plus_its_transfer():
  config = model_config("pixart", "tiny-pixart")  # 2 blocks: stage 0 = embed + block 0, stage 1 = block 1 + out
  embed, block0, block1, out = [2 * f for f in segment_flops(config, 16, 16, text_tokens=120)]  # PixArt-α's T5
  # once per run, not per call: the pair's 120 T5 states (32 wide) through the caption projection (32 → 48,
  # 48 → 48), and each block's cross-attention K and V projections of them (48 → 48 each)
  caption, text_kv = 2 * 2 * 120 * (32 + 48) * 48, 2 * 2 * 2 * 120 * 48 * 48
  first, second = embed + block0 - caption - text_kv, block1 + out - text_kv
  slowest = max(first, second)
  stages, patches, steps = 2, 4, 5
  run = simulate_stages.pipefusion_run(config, 128, stages, patches, steps, 2)
  assert run.unit_flops == pytest.approx(slowest / patches)
  # per micro-step: one patch's activation (16 of 64 tokens + 7 conditioning vectors, 48 wide, bf16) for the
  # CFG pair, and the ring's patch latent of the one image behind the pair (4 of 16 rows × 16 × 4 channels,
  # fp32) with its s32 slot
  assert run.unit_sync_bytes == 2 * (16 + 7) * 48 * 2 + 4 * 16 * 4 * 4 + 4
  # a synchronous step: the 64 tokens across the cut and the prediction broadcast (16 × 16 × 8), bf16, and
  # once per run, beside them, PixArt-α's 120 T5 text states (48 wide, bf16) with their int32 mask, for the pair
  assert run.warm_bytes == 2 * 2 * (64 * 48 + 16 * 16 * 8)
  assert run.once_bytes == 2 * 120 * (48 * 2 + 4)
  micro_steps = max(patches, stages)
  units = (steps - 1) * micro_steps + stages - 1  # one synchronous step; the drain at the end
  micro_s = slowest / patches / RATE + run.unit_sync_bytes / 1e6
  warm_s = (first + second) / RATE + run.warm_bytes / 1e6
  once_s = (caption + 2 * text_kv) / RATE + run.once_bytes / 1e6
  assert run.run_s(platform(SLOW), 0) == pytest.approx(once_s + warm_s + units * micro_s)
  assert run.step_s(platform(SLOW), 0) == pytest.approx(micro_steps * micro_s)


def test_a_patch_strategy_beside_them_computes_one_nth_of_the_model():
  config = model_config("pixart", "tiny-pixart")
  (run,) = simulate_stages.patch_runs(config, 128, 4, "displaced", 20, 2)
  assert run.unit_flops == pytest.approx(sum(2 * f for f in segment_flops(config, 16, 16, text_tokens=120)) / 4)
  assert run.warm == 5 and run.units == 15  # displaced's default: the first step and 4 warm-up steps exact


def test_cli_prints_asyncdiff_rows_beside_the_single_gpu_run(capsys):
  assert main(["bench", "simulate", "--model", "unet", "--config", "tiny-sdxl", "--resolution", "128",
               "--strategies", "asyncdiff", "--stages", "2", "3", "--tflops", "1"]) == 0
  out = capsys.readouterr().out
  assert "PROJECTIONS FROM FLOP COUNTS" in out
  rows = [line.split() for line in out.splitlines() if line.strip().startswith("128 ")]
  assert [row[2] for row in rows[1:]] == ["N2S1", "N3S1", "N2S2", "N3S2"]
  assert rows[0][1] == "single" and float(rows[0][8]) == 1.0  # × of the reference (its split cell is blank)


def test_cli_prints_pipefusion_beside_displaced_over_nvlink_and_pcie(capsys):
  assert main(["bench", "simulate", "--model", "pixart", "--config", "tiny-pixart", "--resolution", "128",
               "--strategies", "pipefusion", "displaced", "--patch", "2", "--patches-per-stage", "1", "2",
               "--tflops", "1"]) == 0
  out = capsys.readouterr().out
  assert "A100 NVLink3" in out and "A100 PCIe" in out and "L20 PCIe" in out
  labels = [line.split()[1:3] for line in out.splitlines() if line.strip().startswith("128 ")]
  assert labels == [["single", "1"], ["pipefusion", "N=2"], ["pipefusion", "N=2"], ["displaced", "N=2"]]


@pytest.mark.parametrize("options, message", [
    (dict(strategies=["asyncdiff"], stages=[1]), "valid stage sizes"),
    (dict(strategies=["asyncdiff"], strides=[3]), "stride is one of 1, 2"),
    (dict(strategies=["asyncdiff"], stages=[0]), "positive integers"),
])
def test_bad_asyncdiff_counts_are_refused_with_the_valid_ones(options, message):
  with pytest.raises(ValueError, match=message):
    simulate_stages.run("unet", "tiny-sdxl", [128], tflops=1, **options)


def test_bad_pipefusion_stages_are_refused_with_the_valid_ones():
  with pytest.raises(ValueError, match="at most 2"):  # tiny-pixart has 2 blocks
    simulate_stages.run("pixart", "tiny-pixart", [128], ["pipefusion"], stages=[4], tflops=1)
  with pytest.raises(ValueError, match="this model is a UNet"):
    simulate_stages.run("unet", "tiny-sdxl", [128], ["pipefusion"], tflops=1)


def test_an_uncalibrated_model_asks_for_tflops():
  with pytest.raises(ValueError, match="--tflops"):
    simulate_stages.run("unet", "tiny-sdxl", [128], ["asyncdiff"])
