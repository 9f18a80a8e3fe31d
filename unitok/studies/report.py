"""Reading a study back: mean ± sample std over seeds per (study, setting, metric), markdown tables and bar charts
with error bars (matplotlib PNGs; the interactive plotly versions are `unitok_widgets.studies`).

    unitok ablate report runs/ablate          # report.md, ablation_<study>.png (and roadmap.png) in runs/ablate

    >>> rows = summarize(load_results("runs/ablate"))   # {study, setting, metric, mean, std, n, values} per row
    >>> print(format_table(rows))                        # one markdown table per study
    >>> fig = plot_study(rows, "codebooks")              # one panel per metric, every seed a dot
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

from ..training.machine import REFERENCE_GFLOPS
from .metrics import METRIC_BY_KEY, METRICS, TABLE_METRICS, plot_data
from .plan import ORDER, STUDIES
from .roadmap import plot_roadmap
from .runner import load_results
from .verdicts import format_correlations, format_verdicts

__all__ = ["summarize", "format_mean_std", "format_table", "plot_study", "plot_predictor", "plot_learning_curves",
           "report"]


def summarize(records: Iterable[dict]) -> List[dict]:
    """Rows {study, setting, metric, mean, std, n, values}: sample standard deviation (ddof = 1; nan for n = 1)
    over the seeds of each (study, setting), in study order, then the study's setting order, then METRICS order."""
    groups: Dict[tuple, List[dict]] = {}
    for r in records:
        groups.setdefault((r["study"], r["setting"]), []).append(r)

    def order(key):
        study, setting = key
        s = STUDIES.get(study)
        names = [x.name for x in s.settings] if s else []
        return (ORDER.index(study) if study in ORDER else len(ORDER), study,
                names.index(setting) if setting in names else len(names), setting)

    rows = []
    for key in sorted(groups, key=order):
        recs = groups[key]
        present = {k for r in recs for k in r["metrics"]}
        keys = [m.key for m in METRICS if m.key in present] + sorted(present - set(METRIC_BY_KEY))
        for metric in keys:
            values = [float(r["metrics"][metric]) for r in recs if isinstance(r["metrics"].get(metric), (int, float))]
            if not values:
                continue
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else math.nan
            rows.append({"study": key[0], "setting": key[1], "metric": metric, "mean": mean, "std": std,
                         "n": len(values), "values": values})
    return rows


def format_mean_std(mean: float, std: float, n: int) -> str:
    """One table cell: "22.00 ± 2.00 (3)", with 1-3 decimals by magnitude; "–" for the spread of a single seed."""
    digits = 1 if abs(mean) >= 100 else 2 if abs(mean) >= 10 else 3
    spread = "–" if math.isnan(std) else f"{std:.{digits}f}"
    return f"{mean:.{digits}f} ± {spread} ({n})"


def format_table(rows: List[dict], metrics: Sequence[str] = TABLE_METRICS) -> str:
    """A markdown table per study: one line per setting, `mean ± std (n)` per metric that any of its settings has."""
    out = []
    for study in dict.fromkeys(r["study"] for r in rows):
        srows = [r for r in rows if r["study"] == study]
        cols = [m for m in metrics if any(r["metric"] == m for r in srows)]
        settings = list(dict.fromkeys(r["setting"] for r in srows))
        cell = {(r["setting"], r["metric"]): format_mean_std(r["mean"], r["std"], r["n"]) for r in srows}
        out.append(f"### {study}\n")
        if study in STUDIES:
            out.append(f"{STUDIES[study].question}  \nPaper: {STUDIES[study].paper}.\n")
        out.append("| setting | " + " | ".join(METRIC_BY_KEY[m].label if m in METRIC_BY_KEY else m for m in cols)
                   + " |")
        out.append("|---|" + "---|" * len(cols))
        for s in settings:
            out.append(f"| {s} | " + " | ".join(cell.get((s, m), "–") for m in cols) + " |")
        out.append("")
    return "\n".join(out)


def plot_study(rows: List[dict], study: str, png: Optional[Union[str, Path]] = None):
    """Bar charts with ±1 std error bars and every seed as a dot, one panel per metric (`summarize` rows).

    Returns the matplotlib figure, and writes it as a PNG to `png` when given. The same panels as an interactive
    plotly figure: `unitok_widgets.studies.plotly_study`.
    """
    import matplotlib
    if png is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    metrics, settings, get = plot_data(rows, study)
    if not metrics:
        raise ValueError(f"no plottable metrics for study {study!r}")
    cols = min(4, len(metrics))
    nrows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.8 * nrows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        xs = [i for i, s in enumerate(settings) if (s, metric) in get]
        means = [get[(settings[i], metric)]["mean"] for i in xs]
        stds = [0.0 if math.isnan(get[(settings[i], metric)]["std"]) else get[(settings[i], metric)]["std"]
                for i in xs]
        ax.bar(xs, means, yerr=stds, capsize=4, color="#4c72b0", alpha=0.75)
        for i in xs:
            vals = get[(settings[i], metric)]["values"]
            ax.scatter([i] * len(vals), vals, color="black", s=8, zorder=3)
        ax.set_xticks(range(len(settings)))
        ax.set_xticklabels(settings, rotation=20)
        label = METRIC_BY_KEY[metric].label if metric in METRIC_BY_KEY else metric
        arrow = "" if metric not in METRIC_BY_KEY else (" ↑" if METRIC_BY_KEY[metric].higher_is_better else " ↓")
        ax.set_title(label + arrow, fontsize=8)
        lo = min(v for i in xs for v in get[(settings[i], metric)]["values"])
        hi = max(m + s for m, s in zip(means, stds))
        if lo > 0 and metric not in ("zero_shot_top1", "zero_shot_top1_heldout", "linear_probe_top1"):
            ax.set_ylim(max(0, lo - 0.5 * (hi - lo) - 1e-9), hi + 0.1 * (hi - lo) + 1e-9)  # differences visible
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle(f"{study}: mean ± std over seeds (dots: single seeds)", fontsize=10)
    fig.tight_layout()
    if png is not None:
        fig.savefig(png, dpi=110)
    return fig


def plot_predictor(records: List[dict], study: str, x_metric: str = "codebook_usage",
                   y_metrics: Sequence[str] = ("psnr", "zero_shot_top1", "gen_nll_bits", "mllm_vqa_acc"),
                   png: Optional[Union[str, Path]] = None):
    """Scatter plots of one codebook statistic (x) against downstream metrics, one dot per (setting, seed) cell,
    coloured by setting, with Pearson r and its 95 % interval in each title (`unitok.studies.verdicts`). Returns
    the matplotlib figure (and writes `png` when given)."""
    import matplotlib
    if png is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from .verdicts import correlations, joined_cells

    cells = joined_cells(records, study)
    y_metrics = [y for y in y_metrics if any(y in m and x_metric in m for m in cells.values())]
    if not y_metrics:
        raise ValueError(f"no cell of study {study!r} has both {x_metric} and one of the metrics to plot")
    settings = list(dict.fromkeys(s for s, _ in cells))
    colours = plt.get_cmap("tab10")
    cols = min(3, len(y_metrics))            # rows of three: readable at a notebook's width
    fig, axes = plt.subplots(math.ceil(len(y_metrics) / cols), cols, figsize=(3.6 * cols, 3.1 * math.ceil(
        len(y_metrics) / cols)), squeeze=False)
    for ax in list(axes.flat)[len(y_metrics):]:
        ax.axis("off")
    for ax, y in zip(axes.flat, y_metrics):
        for i, setting in enumerate(settings):
            pts = [(m[x_metric], m[y]) for (s, _), m in cells.items() if s == setting and x_metric in m and y in m]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=colours(i % 10), label=setting, s=22)
        c = correlations(records, study, x_metric, y)
        interval = "" if math.isnan(c["low"]) else f" [{c['low']:+.2f}, {c['high']:+.2f}]"
        ax.set_title(f"{METRIC_BY_KEY[y].label if y in METRIC_BY_KEY else y}\nr = {c['r']:+.2f}{interval}, "
                     f"n = {c['n']}", fontsize=8)
        ax.set_xlabel(METRIC_BY_KEY[x_metric].label if x_metric in METRIC_BY_KEY else x_metric, fontsize=7)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    if png is not None:
        fig.savefig(png, dpi=110)
    return fig


# The training curve drawn for each kind of run (a key of its metrics.jsonl lines) and how it is labelled.
CURVES = {"tokenizer": ("psnr_batch", "tokenizer: batch PSNR (dB)"),
          "generator": ("bits_per_subcode", "generator: bits per sub-code (train)"),
          "mllm": ("text_loss", "unified model: text loss (nats, train)")}


def plot_learning_curves(path: Union[str, Path], study: str, png: Optional[Union[str, Path]] = None,
                         smooth: int = 10):
    """The training curves of a study's runs (their OUT/runs/<key>/metrics.jsonl), one panel per kind of run, one
    line per setting: the mean over seeds of a `smooth`-step running mean, the band its seeds' range. This is what
    says whether a study's step count is long enough for its ranking to settle. Returns the figure (and writes `png`).
    ValueError when no run folder of the study is there (a bundled results file has no run folders)."""
    import json

    import matplotlib
    if png is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    path = Path(path)
    out = path if path.is_dir() else path.parent
    curves: Dict[tuple, list] = {}
    for r in load_results(path):
        kind = r.get("kind", "tokenizer")
        log = out / r["run"] / "metrics.jsonl"
        if r["study"] != study or kind not in CURVES or not log.is_file():
            continue
        key = CURVES[kind][0]
        values = [line[key] for line in map(json.loads, log.read_text().splitlines()) if key in line]
        if values:
            running = np.convolve(values, np.ones(smooth) / smooth, mode="valid") if len(values) >= smooth \
                else np.asarray(values)
            curves.setdefault((kind, r["setting"]), []).append(running)
    if not curves:
        raise ValueError(f"no run folder of study {study!r} with a metrics.jsonl under {out / 'runs'}")
    kinds = [k for k in CURVES if any(kind == k for kind, _ in curves)]
    settings = list(dict.fromkeys(setting for _, setting in curves))
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for i, setting in enumerate(settings):
            runs = curves.get((kind, setting))
            if not runs:
                continue
            n = min(len(c) for c in runs)
            stacked = np.stack([c[:n] for c in runs])
            steps = np.arange(n) + min(smooth, n)
            ax.plot(steps, stacked.mean(0), color=colours(i % 10), label=f"{setting} ({len(runs)})", lw=1.2)
            ax.fill_between(steps, stacked.min(0), stacked.max(0), color=colours(i % 10), alpha=0.15)
        ax.set_title(CURVES[kind][1], fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{study}: training curves ({smooth}-step running mean over seeds; band: the seeds' range)",
                 fontsize=9)
    fig.tight_layout()
    if png is not None:
        fig.savefig(png, dpi=110)
    return fig


def report(path: Union[str, Path], out_dir: Optional[Union[str, Path]] = None, plots: bool = True) -> str:
    """Read DIR/results.jsonl (or a results file); write report.md and, per study, ablation_<study>.png (and for
    the roadmap roadmap.png) into `out_dir` (default: the results file's folder). Returns the markdown tables.
    The interactive HTML versions: `unitok_widgets.studies.write_study_html`."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from ..training.runs import atomic_write_text

    path = Path(path)
    records = load_results(path)
    if not records:
        raise ValueError(f"{path} holds no results yet; run `unitok ablate STUDY --out {path}` first")
    out_dir = Path(out_dir) if out_dir is not None else (path if path.is_dir() else path.parent)
    rows = summarize(records)
    text = format_table(rows)
    for study in dict.fromkeys(r["study"] for r in rows):   # what the numbers allow one to say, study by study
        if max(r["n"] for r in rows if r["study"] == study) > 1:
            text += f"\n#### {study}: verdicts\n\n" + format_verdicts(rows, study)
        if STUDIES.get(study) is not None and STUDIES[study].consumers:
            text += "\n" + format_correlations(records, study)
    peaks = [r["matmul_peak_gflops"] for r in records if "matmul_peak_gflops" in r]
    train = sum(r.get("train_seconds", 0) for r in _distinct_runs(records))
    scaled = sum(r.get("peak_scaled_train_seconds", 0) for r in _distinct_runs(records))
    footer = (f"{len(records)} records, {len(_distinct_runs(records))} distinct runs; training time {train / 60:.1f} "
              f"min" + (f" (measured fp32 matmul peak {min(peaks):.0f}-{max(peaks):.0f} GFLOP/s; "
                        f"{scaled / 60:.1f} min scaled to {REFERENCE_GFLOPS:.0f} GFLOP/s)" if peaks else "")
              + ". Mean ± sample standard deviation over seeds (n).")
    text = text + "\n" + footer + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "report.md", text)
    if plots:
        for study in dict.fromkeys(r["study"] for r in rows):
            try:
                fig = plot_study(rows, study, png=out_dir / f"ablation_{study}.png")
            except ValueError:
                continue
            plt.close(fig)
            if STUDIES.get(study) is not None and STUDIES[study].consumers:
                for draw, name in ((lambda: plot_predictor(records, study, png=out_dir / f"{study}_usage.png"),
                                    "usage"),
                                   (lambda: plot_learning_curves(path, study, png=out_dir / f"{study}_curves.png"),
                                    "curves")):
                    try:
                        plt.close(draw())
                    except ValueError:   # nothing to draw: no such metrics, or no run folders (a bundled copy)
                        pass
        if any(r["study"] == "roadmap" for r in rows):   # and the paper-style figure: ours against the paper's
            plt.close(plot_roadmap(rows, png=out_dir / "roadmap.png"))
    return text


def _distinct_runs(records: List[dict]) -> List[dict]:
    seen, out = set(), []
    for r in records:
        if r.get("run") not in seen:
            seen.add(r.get("run"))
            out.append(r)
    return out
