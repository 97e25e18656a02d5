"""The experiments notebook runs headless on a finished run, so it cannot rot."""

from __future__ import annotations

import nbformat
from nbclient import NotebookClient

from tests.conftest import REPO


def test_notebook_executes_on_a_tiny_run(trained_store, monkeypatch):
    monkeypatch.setenv("XRAY_RUN_DIR", str(trained_store.parent / "artifacts" / "smoke-model"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    notebook = nbformat.read(REPO / "notebooks" / "experiments.ipynb", as_version=4)
    NotebookClient(notebook, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    text = "".join(output.get("text", "") for output in outputs)
    assert "run smoke-model" in text and "roc_auc" in text
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(images) >= 8, "sample images, balance, curves, four evaluation plots and Grad-CAM"


def test_notebook_is_stored_without_outputs():
    notebook = nbformat.read(REPO / "notebooks" / "experiments.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")
