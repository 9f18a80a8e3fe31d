"""The lab-manual notebooks: stored clean, and every one runs top to bottom headless in smoke mode.

Each notebook reads `UNITOK_SMOKE=1` (fewer steps and images, the same code paths) and ends with `assert` cells on
its key values, so a notebook that raises anywhere fails its test here. The kernel is the `python3` kernel of the
interpreter running pytest (the project's virtual environment).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
EXPECTED = ["00_quickstart", "01_train_step_by_step", "02_codebook_utilization", "03_reconstructions",
            "04_token_embeddings", "05_zero_shot_understanding", "06_bring_your_own_data"]


def test_every_notebook_is_there():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_clean(path):
    """No outputs, no execution counts (diffs stay readable); opens with a markdown cell saying what you will see;
    has the smoke switch; ends with checks."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.cells and nb.cells[0].cell_type == "markdown", f"{path.name} must open with a markdown cell"
    assert nb.cells[0].source.lstrip().startswith("#"), f"{path.name}: the first cell should start with a title"
    code = [c for c in nb.cells if c.cell_type == "code"]
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{path.name}: cells {dirty} have outputs or execution counts; clear them before committing"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    assert any('os.environ.get("UNITOK_SMOKE") == "1"' in c.source for c in code[:2]), \
        f"{path.name}: the SMOKE switch belongs near the top"
    assert "assert " in code[-1].source, f"{path.name}: the last code cell should assert the notebook's key values"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_smoke_mode(path, monkeypatch):
    monkeypatch.setenv("UNITOK_SMOKE", "1")
    # The kernel inherits this environment. One intra-op thread: the test machines are small and shared, and an
    # oversubscribed OpenMP pool is several times slower than one thread.
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    monkeypatch.delenv("UNITOK_CHECKPOINT", raising=False)     # always the bundled checkpoint
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    start = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as error:
        pytest.fail(f"{path.name} failed in smoke mode:\n{error}", pytrace=False)
    seconds = time.perf_counter() - start
    print(f"{path.name}: {seconds:.1f} s in smoke mode")
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "all checks passed" in outputs, f"{path.name}: the final checks did not report success"
