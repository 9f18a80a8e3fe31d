"""The run-time tables say what was measured: every notebook's classroom row and the README's teacher table carry
the time recorded in docs/notebooks/classroom_times.json by `make lab-times` (scaled to 192 GFLOP/s)."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

from unitok_widgets import lab_times

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _classroom_time(name: str) -> str:
    nb = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            match = lab_times.CLASSROOM_ROW.search("".join(cell["source"]))
            if match:
                return match["time"].strip()
    raise AssertionError(f"{name} has no '| classroom | default | ... |' row in its run-time table")


def test_every_notebook_has_a_measured_classroom_time_and_its_tables_say_it():
    record = lab_times.read_record(ROOT)
    assert sorted(record["notebooks"]) == NOTEBOOKS, "run `make lab-times` for the notebooks without a record"
    readme = {m["name"]: m["time"].strip() for m in lab_times.README_ROW.finditer((ROOT / "README.md").read_text())}
    assert sorted(readme) == NOTEBOOKS, "the README's teacher table must list every notebook"
    for name, entry in record["notebooks"].items():
        expected = entry["seconds"] * (entry["matmul_gflops_before"] + entry["matmul_gflops_after"]) / 2 / 192
        assert abs(entry["scaled_seconds"] - expected) < 0.2, (name, entry)
        assert _classroom_time(name) == lab_times.budget_text(entry), name
        assert readme[name] == lab_times.budget_text(entry), name
    total = sum(e["scaled_seconds"] for e in record["notebooks"].values())
    assert abs(record["total_scaled_seconds"] - total) < 1.0


def test_update_tables_rewrites_a_stale_time(tmp_path):
    """A hand-edited (stale) time is put back from the record, in the notebook and in the README."""
    for part in ("notebooks", "docs/notebooks"):
        (tmp_path / part).mkdir(parents=True)
    name = NOTEBOOKS[0]
    shutil.copy(ROOT / "notebooks" / f"{name}.ipynb", tmp_path / "notebooks")
    readme = (ROOT / "README.md").read_text()
    (tmp_path / "README.md").write_text(readme)
    record = {"notebooks": {name: {"seconds": 100.0, "matmul_gflops_before": 96.0, "matmul_gflops_after": 96.0,
                                   "scaled_seconds": 50.0}}}
    changed = lab_times.update_tables(copy.deepcopy(record), tmp_path)
    assert {p.name for p in changed} == {f"{name}.ipynb", "README.md"}
    nb = json.loads((tmp_path / "notebooks" / f"{name}.ipynb").read_text())
    rows = [lab_times.CLASSROOM_ROW.search("".join(c["source"])) for c in nb["cells"] if c["cell_type"] == "markdown"]
    assert [m["time"].strip() for m in rows if m] == ["50 s (measured)"]
    shown = {m["name"]: m["time"].strip() for m in lab_times.README_ROW.finditer((tmp_path / "README.md").read_text())}
    assert shown[name] == "50 s (measured)"
    assert lab_times.update_tables(record, tmp_path) == []          # nothing left to change
