"""`dfjax bench fidelity`'s pipeline table: AsyncDiff and PipeFusion rows run on their `stage` meshes, against
`single` on the same noise, and the grid points the model or the devices do not allow are skipped with the
reason. A random tiny DiT stands in for the embedded one (the rows' quality columns: tests/test_quality.py)."""

import json

import numpy as np
import pytest

from dfjax.bench import fidelity
from test_generate import tiny_dit_source


def _run(monkeypatch, tmp_path, tables=("pipeline",), **grid):
  monkeypatch.setattr(fidelity, "embedded_source", lambda count, name: tiny_dit_source(count))
  config = fidelity.FidelityConfig(seeds=2, steps=2, tables=tables, model="dit", **grid)
  return fidelity.run(config, json_out=str(tmp_path / "f.json")), json.loads((tmp_path / "f.json").read_text())


def test_pipeline_rows_run_on_their_stage_meshes_and_misfits_are_skipped(monkeypatch, tmp_path, capsys):
  """Fully warmed up, AsyncDiff (N2S1) and PipeFusion (N = 2, M = 4) equal single; AsyncDiff in 8 components
  (the DiT has 4 segments) and PipeFusion on 8 stages (it has 2 blocks) are skipped, saying why."""
  rows, saved = _run(monkeypatch, tmp_path, asyncdiff_components=(2, 8), asyncdiff_strides=(1,),
                     asyncdiff_warmup=(2,), pipefusion_stages=(2, 8), pipefusion_patches_per_stage=(2,),
                     pipefusion_warmup=(1,))
  out = capsys.readouterr().out
  assert [(r.strategy, r.mesh) for r in rows] == [
      ("single", ""), ("asyncdiff", "cfg=1×stage=2×patch=1"), ("pipefusion", "cfg=1×stage=2×patch=1")]
  assert rows[1].options == "stride 1, warm-up 2" and rows[2].options == "4 patches, warm-up 1"
  for row in rows[1:]:
    assert np.all(row.psnr_db > 50) and np.all(row.ssim > 0.9999), row.strategy
  assert "skipped asyncdiff (stride 1, warm-up 2) on stage=8: asyncdiff with stride 1 runs N components" in out
  assert "skipped pipefusion (16 patches, warm-up 1) on stage=8: 2 blocks cannot fill 8 stages" in out
  assert "Pipeline methods vs single" in out and "cfg=1×stage=2×patch=1, 4 patches, warm-up 1" in out
  assert len(saved["skipped"]) == 2 and saved["rows"][2]["options"] == "4 patches, warm-up 1"


def test_a_model_without_groupnorm_gets_one_displaced_row_per_patch_count(monkeypatch, tmp_path, capsys):
  """A DiT has no GroupNorm, so the modes would sample one image several times: the first runs, the others
  are reported as skipped, saying why."""
  rows, saved = _run(monkeypatch, tmp_path, tables=("main",), patch=(2,), groupnorm=("sync", "stale"))
  assert [(r.strategy, r.groupnorm, r.patch) for r in rows] == [
      ("single", None, 1), ("displaced", "sync", 2), ("naive", None, 2)]
  assert "skipped displaced with GroupNorm stale: the model has no GroupNorm" in capsys.readouterr().out
  assert len(saved["skipped"]) == 1


@pytest.mark.slow
def test_pipeline_rows_after_warm_up_differ_from_single_but_stay_close(monkeypatch, tmp_path):
  """After warm-up both methods really run on stale state (AsyncDiff: the previous step's activations, stride 2
  too; PipeFusion: stale K/V of later patches): not single's image, but near it."""
  rows, _ = _run(monkeypatch, tmp_path, asyncdiff_components=(2,), asyncdiff_strides=(1, 2), asyncdiff_warmup=(1,),
                 pipefusion_stages=(2,), pipefusion_patches_per_stage=(1,), pipefusion_warmup=(0,))
  assert [r.options for r in rows[1:]] == ["stride 1, warm-up 1", "stride 2, warm-up 1", "2 patches, warm-up 0"]
  for row in rows[1:]:
    assert np.all(np.isfinite(row.psnr_db)) and np.mean(row.psnr_db) > 10, (row.options, row.psnr_db)


def test_bad_grids_and_tables_are_refused_before_anything_runs(monkeypatch):
  monkeypatch.setattr(fidelity, "embedded_source", lambda *a: pytest.fail("the model was loaded"))
  with pytest.raises(ValueError, match="name one or more of main, warmup, pipeline"):
    fidelity.FidelityConfig(tables=("stage",))
  with pytest.raises(ValueError, match="warmup_steps=0 must be an integer ≥ 1"):
    fidelity.measure(fidelity.FidelityConfig(asyncdiff_warmup=(0,)), progress=False)
  with pytest.raises(ValueError, match="AsyncDiff's stride is one of 1, 2"):
    fidelity.measure(fidelity.FidelityConfig(asyncdiff_strides=(3,)), progress=False)
