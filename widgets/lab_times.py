"""Measured classroom budgets: run every notebook top to bottom in classroom mode, record how long it took and how
fast the machine was, and write those numbers into the notebooks' and the README's run-time tables.

    python -m unitok_widgets.lab_times                       # all notebooks; then the tables are rewritten
    python -m unitok_widgets.lab_times 02_codebook_utilization 07_generation      # just these (others kept)
    make lab-times

A time on a 2-core machine moves with everybody else's load, so each record keeps the machine's fp32 2048^3 matmul
speed measured just before and just after the run, and the tables show the time *scaled to a 192 GFLOP/s laptop*:
seconds x (measured GFLOP/s / 192). What else was using the CPU when the run started is recorded too (a run made
beside other work is flagged, not silently averaged in). `tests/notebooks/test_lab_times.py` checks that every
table says what the record says.

Nothing here imports Jupyter at import time (nbclient is imported when a notebook is run).
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Iterable, Optional

from unitok.checkpoint import atomic_write
from unitok.cpu_share import cpu_usage
from unitok.training.machine import REFERENCE_GFLOPS, matmul_peak

from .lab import execute_in_mode, repo_root

RECORD_NAME = "docs/notebooks/classroom_times.json"
CLASSROOM_ROW = re.compile(r"^\| classroom \| default \|(?P<what>[^|]*)\|(?P<time>[^|]*)\|\s*$", re.M)
README_ROW = re.compile(r"^\| `(?P<name>\d\d_\w+)` \|(?P<teaches>[^|]*)\|(?P<time>[^|]*)\|(?P<copy>[^|]*)\|\s*$", re.M)


def budget_text(entry: dict) -> str:
    """How a record reads in a table: the scaled time, rounded for a reader ("40 s", "2.5 min")."""
    seconds = entry["scaled_seconds"]
    shown = f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"
    return f"{shown} (measured)"


def read_record(root: Optional[Path] = None) -> dict:
    path = (root or repo_root()) / RECORD_NAME
    return json.loads(path.read_text()) if path.is_file() else {"reference_gflops": REFERENCE_GFLOPS, "notebooks": {}}


def time_notebook(path: Path, timeout: int = 3600) -> dict:
    """Run one notebook in classroom mode in a fresh kernel (outputs discarded). -> its record."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    usage = cpu_usage()
    before = matmul_peak()
    start = time.perf_counter()
    execute_in_mode(nb, path, "classroom", timeout)
    seconds = time.perf_counter() - start
    after = matmul_peak()
    gflops = (before + after) / 2
    return {"seconds": round(seconds, 1), "matmul_gflops_before": round(before, 1),
            "matmul_gflops_after": round(after, 1), "scaled_seconds": round(seconds * gflops / REFERENCE_GFLOPS, 1),
            "other_cores_at_start": None if usage is None else usage.other_cores,
            "date": time.strftime("%Y-%m-%d")}


def update_tables(record: dict, root: Optional[Path] = None) -> list:
    """Write each recorded time into its notebook's classroom row and the README's teacher table. -> changed files."""
    root = root or repo_root()
    changed = []
    for name, entry in record["notebooks"].items():
        path = root / "notebooks" / f"{name}.ipynb"
        nb = json.loads(path.read_text())
        text = budget_text(entry)
        for cell in nb["cells"]:
            if cell["cell_type"] != "markdown":
                continue
            source = "".join(cell["source"])
            new = CLASSROOM_ROW.sub(lambda m: f"| classroom | default |{m['what']}| {text} |", source, count=1)
            if new != source:
                cell["source"] = new.splitlines(keepends=True)
                break
        out = json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
        if out != path.read_text():
            atomic_write(path, lambda tmp: Path(tmp).write_text(out))
            changed.append(path)
    readme = root / "README.md"
    source = readme.read_text()

    def row(m):
        entry = record["notebooks"].get(m["name"])
        time_cell = f" {budget_text(entry)} " if entry else m["time"]
        return f"| `{m['name']}` |{m['teaches']}|{time_cell}|{m['copy']}|"

    new = README_ROW.sub(row, source)
    if new != source:
        atomic_write(readme, lambda tmp: Path(tmp).write_text(new))
        changed.append(readme)
    return changed


def main(argv: Optional[Iterable[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unitok_widgets.lab_times",
                                     description="Run notebooks in classroom mode, record their times, update the "
                                                 "tables in the notebooks and the README.")
    parser.add_argument("names", nargs="*", help="notebook names (default: all), e.g. 02_codebook_utilization")
    parser.add_argument("--tables-only", action="store_true", help="only rewrite the tables from the record")
    args = parser.parse_args(list(argv) if argv is not None else None)
    root = repo_root()
    record = read_record(root)
    available = sorted(p.stem for p in (root / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    names = args.names or available
    unknown = [n for n in names if n not in available]
    if unknown:
        raise SystemExit(f"no such notebook: {', '.join(unknown)}; expected one of {', '.join(available)}")
    if not args.tables_only:
        for name in names:
            print(f"running {name} in classroom mode ...", flush=True)
            entry = time_notebook(root / "notebooks" / f"{name}.ipynb")
            record["notebooks"][name] = entry
            record["notebooks"] = dict(sorted(record["notebooks"].items()))
            record["total_scaled_seconds"] = round(sum(e["scaled_seconds"] for e in record["notebooks"].values()), 1)
            out = json.dumps(record, indent=1) + "\n"
            (root / RECORD_NAME).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(root / RECORD_NAME, lambda tmp: Path(tmp).write_text(out))   # kept after each notebook
            print(f"  {entry['seconds']:.0f} s at {entry['matmul_gflops_before']:.0f}-{entry['matmul_gflops_after']:.0f}"
                  f" GFLOP/s -> {entry['scaled_seconds']:.0f} s at {REFERENCE_GFLOPS:.0f} GFLOP/s"
                  f" (other processes used {entry['other_cores_at_start']} cores at the start)", flush=True)
    for path in update_tables(record, root):
        print(f"updated {path.relative_to(root)}")


if __name__ == "__main__":
    main()
