"""The analysis notebooks execute (nbclient) on results made by the test session (a CPU sweep, a layer run)."""
from __future__ import annotations

from pathlib import Path

import pytest

from nanovllm_lab.lab.testing import CONF_DIR, cpu_results

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
NOTEBOOKS = sorted((CONF_DIR.parent / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="session")
def results_root(tmp_path_factory) -> Path:
    return cpu_results(tmp_path_factory.getbasetemp())  # shared with test_lab_cli.py when both run


def test_there_are_notebooks():
    assert {p.stem for p in NOTEBOOKS} >= {"compare_strategies", "layer_overlap"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, results_root, monkeypatch):
    monkeypatch.setenv("NANOVLLM_LAB_RESULTS", str(results_root))
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.get("outputs") for c in code), f"{path.name}: commit it without outputs"
    client = nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError on any failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert str(results_root) in text, "the notebook did not read NANOVLLM_LAB_RESULTS"
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    if path.stem == "compare_strategies":
        assert len(images) >= 3, "the comparison figures were not drawn"
    if path.stem == "layer_overlap" and (results_root / "layer" / "layer.parquet").exists():
        assert images, "the layer figure was not drawn"
