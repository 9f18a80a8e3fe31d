"""Interactive figures of a study's results (plotly): the panels of `unitok.studies.report.plot_study`, with every
seed's value on hover, for notebooks and as stand-alone HTML pages.

    >>> from unitok.studies.report import summarize
    >>> from unitok.studies.runner import load_results
    >>> rows = summarize(load_results("docs/ablations"))
    >>> plotly_study(rows, "codebooks").show()                 # in a notebook
    >>> write_html_report("docs/ablations")                     # ablation_<study>.html next to the PNGs

The library (`unitok ablate report`) writes matplotlib PNGs only; these HTML pages are the interactive companions.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional, Union

from unitok.studies.metrics import METRIC_BY_KEY, plot_data
from unitok.studies.report import summarize
from unitok.studies.runner import load_results
from unitok.training.runs import atomic_write_text

__all__ = ["plotly_study", "write_study_html", "write_html_report"]


def plotly_study(rows: List[dict], study: str):
    """The same panels as `plot_study` as one interactive plotly figure (hover: mean, std, n, every seed)."""
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    metrics, settings, get = plot_data(rows, study)
    cols = min(4, len(metrics))
    nrows = math.ceil(len(metrics) / cols)
    titles = [METRIC_BY_KEY[m].label if m in METRIC_BY_KEY else m for m in metrics]
    fig = make_subplots(rows=nrows, cols=cols, subplot_titles=titles)
    for j, metric in enumerate(metrics):
        present = [s for s in settings if (s, metric) in get]
        rs = [get[(s, metric)] for s in present]
        fig.add_trace(go.Bar(x=present, y=[r["mean"] for r in rs],
                             error_y=dict(type="data", array=[0 if math.isnan(r["std"]) else r["std"] for r in rs]),
                             name=metric, showlegend=False, marker_color="#4c72b0",
                             customdata=[[r["std"], r["n"], ", ".join(f"{v:.4g}" for v in r["values"])] for r in rs],
                             hovertemplate="%{x}: %{y:.4g} ± %{customdata[0]:.3g} (n=%{customdata[1]})"
                                           "<br>seeds: %{customdata[2]}<extra></extra>"),
                      row=j // cols + 1, col=j % cols + 1)
    fig.update_layout(title=f"{study}: mean ± std over seeds", height=300 * nrows, width=320 * cols + 80)
    return fig


def write_study_html(rows: List[dict], study: str, path: Union[str, Path]) -> Path:
    """`plotly_study(rows, study)` as a stand-alone HTML page (plotly.js from its CDN), written atomically."""
    if not plot_data(rows, study)[0]:
        raise ValueError(f"no plottable metrics for study {study!r}")
    atomic_write_text(path, plotly_study(rows, study).to_html(include_plotlyjs="cdn", full_html=True))
    return Path(path)


def write_html_report(path: Union[str, Path], out_dir: Optional[Union[str, Path]] = None) -> List[Path]:
    """ablation_<study>.html for every study of DIR/results.jsonl (or a results file) with plottable metrics, into
    `out_dir` (default: the results file's folder, where `unitok ablate report` puts its PNGs). Returns the paths."""
    path = Path(path)
    rows = summarize(load_results(path))
    out_dir = Path(out_dir) if out_dir is not None else (path if path.is_dir() else path.parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for study in dict.fromkeys(r["study"] for r in rows):
        if plot_data(rows, study)[0]:
            written.append(write_study_html(rows, study, out_dir / f"ablation_{study}.html"))
    return written
