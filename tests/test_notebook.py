"""notebooks/quickstart.ipynb runs top to bottom on the CPU (8 virtual devices), every cell."""

import os
from pathlib import Path

import pytest
from conftest import TEST_XLA_FLAGS

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


# The quickstart's kernel runs its programs at XLA:CPU's backend level 1, not conftest's 0: its 10-step runs of
# the embedded 64×64 models cost more at level 0 than the compiles save there. The 8-patch naive run alone
# takes 25 s of CPU at level 0 and 3 s at level 1: XLA's simplifier turns a 3×3 convolution of a 1×8-pixel
# input into a loop that level 0 leaves unoptimised. The whole test: 158 s of CPU at level 0, 128 s at 1.
QUICKSTART_XLA_FLAGS = os.environ["XLA_FLAGS"].replace(TEST_XLA_FLAGS, "--xla_backend_optimization_level=1")


def test_quickstart_runs_every_cell(tmp_path, monkeypatch):
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  # The kernel inherits this process's environment (conftest's CPU platform), the XLA flags as above.
  monkeypatch.setenv("XLA_FLAGS", QUICKSTART_XLA_FLAGS)
  client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
  outputs = "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                    for out in cell.get("outputs", []))
  assert "the patch meshes use 8 cpu devices" in outputs
  assert "DIFFUSERS_CHECKPOINT is not set: skipped" in outputs
  assert "displaced: patch=2:" in outputs and "naive: patch=2:" in outputs
  assert "DiT   ulysses on patch=8:" in outputs and "DiT      ring on patch=8:" in outputs
  images = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
            if "image/png" in out.get("data", {})]
  assert len(images) == 3  # the comparison sheet, the PSNR plot and the DiT's sheet


TEXT_TO_IMAGE = NOTEBOOK.parent / "text_to_image.ipynb"


@pytest.mark.slow
def test_text_to_image_runs_every_cell(tmp_path):
  """The tiny random SDXL pipeline: built, converted, generated with single, displaced and the split VAE decode."""
  notebook = nbformat.read(TEXT_TO_IMAGE, as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  outputs = "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                    for out in cell.get("outputs", []))
  assert "text_encoder_2  CLIPTextModelWithProjection" in outputs
  assert "pipeline: StableDiffusionXLPipeline, tokenizers: tokenizer, tokenizer_2" in outputs
  assert "displaced, patch 4" in outputs and "decode" in outputs
  exact = [line for line in outputs.splitlines() if line.startswith("single + VAE decode over 4") and "max" in line]
  assert exact and float(exact[0].rsplit("= ", 1)[1]) < 1e-5  # the patch-parallel decode is exact
  images = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
            if "image/png" in out.get("data", {})]
  assert len(images) == 1
