"""notebooks/quickstart.ipynb runs top to bottom on the CPU (8 virtual devices), every cell."""

from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_runs_every_cell(tmp_path):
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  # The kernel inherits this process's environment (conftest's CPU platform and XLA flags).
  client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
  outputs = "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                    for out in cell.get("outputs", []))
  assert "the patch meshes use 8 cpu devices" in outputs
  assert "DIFFUSERS_CHECKPOINT is not set: skipped" in outputs
  assert "displaced: patch=2:" in outputs and "naive: patch=2:" in outputs
  images = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
            if "image/png" in out.get("data", {})]
  assert len(images) == 2  # the comparison sheet and the PSNR plot
