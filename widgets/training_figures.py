"""The training dashboard's pictures: the live plotly figure's layout and the static matplotlib copy of it.

`unitok_widgets.training.TrainingDashboard` wires buttons, threads and the trainer's callbacks; this file only knows
how the panels look, so either side can be read (and changed) without the other:

    loss terms (log)               | PSNR (batch, and eval points)
    understanding at each eval, lr   | dead codes per sub-codebook
    codes used per sub-codebook (a heatmap: sub-codebook x logged step)

`build_training_figure` returns the empty FigureWidget and its traces by role (the dashboard fills them in one
`batch_update()` per redraw); `static_training_figure` draws the same panels from arrays, for notebooks rendered
without a kernel; `thin` picks the rows a long curve is drawn with.
"""
from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ._common import FIG_WIDTH, LOSS_COLOURS, codebook_colour, figure_layout, new_figure

LOSS_TERMS = ("loss", "l1", "l2", "vq", "clip")       # "loss" is the weighted total the optimiser sees
LOSS_LABELS = {"loss": "total", "l1": "L1", "l2": "L2 (MSE)", "vq": "VQ", "clip": "CLIP"}
# evaluation results drawn over training in the understanding panel: (result name, colour, line dash)
UNDERSTANDING_TRACES = (("zero_shot_top1", "#4e79a7", "solid"), ("zero_shot_top1_heldout", "#4e79a7", "dot"),
                        ("linear_probe_top1", "#f28e2b", "solid"))
UNDERSTANDING_LABELS = {"zero_shot_top1": "zero-shot", "zero_shot_top1_heldout": "zero-shot, held-out pairs",
                        "linear_probe_top1": "linear probe"}


def thin(n: int, max_points: int) -> np.ndarray:
    """Indices of at most ~max_points evenly spaced rows out of n, always keeping the last one."""
    if n <= max_points:
        return np.arange(n)
    idx = np.arange(0, n, math.ceil(n / max_points))
    return idx if idx[-1] == n - 1 else np.append(idx, n - 1)


def build_training_figure(num_codebooks: int, usage_title: str) -> tuple[go.FigureWidget, dict]:
    """The dashboard's empty plotly figure (3 x 2 panels, see the module docstring) and its traces by role.

    Returns (figure, traces) with traces = {"loss_traces": {term: Scatter}, "psnr_trace", "eval_trace", "lr_trace",
    "dead_traces": [Scatter per sub-codebook], "usage_heatmap": Heatmap (num_codebooks rows),
    "understanding_traces": {result name: Scatter}, "marked": the curves that drop their markers once long}.
    `usage_title` is the heatmap panel's title (annotation 4, which the dashboard rewrites as statistics arrive).
    """
    fig = make_subplots(
        rows=3, cols=2, specs=[[{}, {}], [{}, {}], [{"colspan": 2}, None]],
        subplot_titles=("loss terms (log)", "PSNR (dB)", "understanding at each eval · lr",
                        "dead codes per sub-codebook",
                        usage_title),
        vertical_spacing=0.11, horizontal_spacing=0.09, row_heights=[0.37, 0.33, 0.30])
    for name in LOSS_TERMS:
        fig.add_trace(go.Scatter(x=[], y=[], mode="lines+markers", name=LOSS_LABELS[name], marker=dict(size=5),
                                 line=dict(color=LOSS_COLOURS[name], width=2 if name == "loss" else 1.3)),
                      row=1, col=1)
    fig.add_trace(go.Scatter(x=[], y=[], mode="lines+markers", name="batch PSNR", marker=dict(size=5),
                             line=dict(color="#b07aa1", width=1), legendgroup="psnr"), row=1, col=2)
    fig.add_trace(go.Scatter(x=[], y=[], mode="markers+lines", name="eval PSNR",
                             marker=dict(color="#e15759", size=8, symbol="diamond"),
                             line=dict(color="#e15759", dash="dot")), row=1, col=2)
    # the lr as a share of its peak shares the 0-100 % axis (a second axis's labels ran into the next panel)
    fig.add_trace(go.Scatter(x=[], y=[], mode="lines+markers", name="lr (% of peak)",
                             line=dict(color="#9c755f", width=1), marker=dict(size=5), opacity=0.6), row=2, col=1)
    for i in range(num_codebooks):
        fig.add_trace(go.Scatter(x=[], y=[], mode="lines+markers", name=str(i), legend="legend2",
                                 marker=dict(size=5),
                                 line=dict(color=codebook_colour(i), width=1.3),
                                 hovertemplate=f"sub-codebook {i}<br>step %{{x}}<br>dead %{{y}}<extra></extra>"),
                      row=2, col=2)
    fig.add_trace(go.Heatmap(
        x=[], y=list(range(num_codebooks)), z=[[None]] * num_codebooks, zmin=0, zmax=1,
        colorscale="Viridis", colorbar=dict(title=dict(text="used", side="right"), len=0.28, y=0.13,
                                            tickformat=".0%"),
        hovertemplate="step %{x}<br>sub-codebook %{y}<br>used %{z:.1%}<extra></extra>"), row=3, col=1)
    # Understanding over training, one point per evaluation (added last so the traces above keep their index).
    for name, colour, dash in UNDERSTANDING_TRACES:
        fig.add_trace(go.Scatter(x=[], y=[], mode="markers+lines", name=UNDERSTANDING_LABELS[name],
                                 marker=dict(color=colour, size=7), line=dict(color=colour, dash=dash)),
                      row=2, col=1)
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_yaxes(range=[0, 105], title_text="%", row=2, col=1)
    fig.update_yaxes(title_text="sub-codebook", dtick=1, autorange="reversed", row=3, col=1)
    fig.update_xaxes(title_text="step", row=3, col=1)
    # one legend row above the grid (inside, it would hide the top of the loss curves)
    fig.update_layout(**figure_layout(width=FIG_WIDTH, height=800, margin=dict(l=60, r=95, t=80, b=45),
                                      legend=dict(orientation="h", yanchor="bottom", y=1.045, x=0,
                                                  xanchor="left", font=dict(size=11)),
                                      # the dead-code lines get their own legend, beside their panel
                                      legend2=dict(title=dict(text="sub-<br>codebook"), x=1.01, xanchor="left",
                                                   y=0.52, yanchor="middle", font=dict(size=11))))
    fw = go.FigureWidget(fig)
    k = num_codebooks
    traces = {
        "loss_traces": {name: fw.data[i] for i, name in enumerate(LOSS_TERMS)},
        "psnr_trace": fw.data[5], "eval_trace": fw.data[6], "lr_trace": fw.data[7],
        "dead_traces": list(fw.data[8:8 + k]),
        "usage_heatmap": fw.data[8 + k],
        "understanding_traces": {name: fw.data[9 + k + i] for i, (name, _, _) in enumerate(UNDERSTANDING_TRACES)},
    }
    # Curves start with markers (a single point drawn as a line is invisible); long curves drop them.
    traces["marked"] = [*traces["loss_traces"].values(), traces["psnr_trace"], traces["lr_trace"],
                        *traces["dead_traces"]]
    return fw, traces


def static_training_figure(c: dict, log_steps: np.ndarray, usage: np.ndarray, dead: np.ndarray, evals: list,
                           understanding: dict, *, num_codebooks: int, codebook_size: int,
                           window_tokens: int | None, step_count: int):
    """The dashboard's panels as a matplotlib Figure (for notebooks rendered without a kernel).

    c: {"step", "lr", "psnr_batch", *LOSS_TERMS: (n,) float arrays}, one row per training step; log_steps: (L,) steps
    with codebook statistics; usage, dead: (num_codebooks, L) share of codes used and dead-code counts; evals:
    [(step, eval PSNR)]; understanding: {result name: [(step, percent)]} for UNDERSTANDING_TRACES.
    """
    fig = new_figure(11, 8.5)
    grid = fig.add_gridspec(3, 2, height_ratios=[1.1, 1, 0.9], hspace=0.55, wspace=0.22)
    ax = fig.add_subplot(grid[0, 0])
    for name in LOSS_TERMS:
        if len(c["step"]) and np.isfinite(c[name]).any():
            ax.plot(c["step"], c[name], label=LOSS_LABELS[name], color=LOSS_COLOURS[name],
                    lw=1.8 if name == "loss" else 1.1, marker="o" if len(c["step"]) <= 60 else None, ms=3)
    ax.set_yscale("log")
    ax.set_title("loss terms", fontsize=10)
    ax.legend(fontsize=8, ncol=3)
    ax = fig.add_subplot(grid[0, 1])
    ax.plot(c["step"], c["psnr_batch"], color="#b07aa1", lw=1, label="batch",
            marker="o" if len(c["step"]) <= 60 else None, ms=3)
    if evals:
        ax.plot(*zip(*evals), "D:", color="#e15759", label="eval")
    ax.set_title("PSNR (dB)", fontsize=10)
    ax.legend(fontsize=8)
    ax = fig.add_subplot(grid[1, 0])
    for name, colour, dash in UNDERSTANDING_TRACES:
        if understanding[name]:
            ax.plot(*zip(*understanding[name]), "o" + (":" if dash == "dot" else "-"), color=colour,
                    label=UNDERSTANDING_LABELS[name])
    if len(c["lr"]):
        ax.plot(c["step"], 100 * np.asarray(c["lr"]) / max(np.nanmax(c["lr"]), 1e-30), color="#9c755f", lw=1,
                alpha=0.6, label="lr (% of peak)")
    ax.set_ylim(0, 105)
    ax.set_ylabel("%", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("understanding at each eval · lr", fontsize=10)
    ax = fig.add_subplot(grid[1, 1])
    for i in range(len(dead)):
        ax.plot(log_steps, dead[i], color=codebook_colour(i), lw=1.1, label=str(i))
    ax.set_title("dead codes per sub-codebook", fontsize=10)
    if len(dead):
        ax.legend(fontsize=7, title="sub-\ncodebook", title_fontsize=7, loc="upper left",
                  bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax = fig.add_subplot(grid[2, :])
    if usage.size:
        # one cell per logged step, its edges half-way to the neighbouring logged steps
        x = log_steps.astype(np.float64)
        mids = (x[1:] + x[:-1]) / 2
        gap = (x[1] - x[0]) / 2 if len(x) > 1 else 0.5
        edges = np.concatenate([[x[0] - gap], mids, [x[-1] + gap]])
        mesh = ax.pcolormesh(edges, np.arange(num_codebooks + 1) - 0.5, usage, vmin=0, vmax=1,
                             cmap="viridis", shading="flat")
        ax.set_ylim(num_codebooks - 0.5, -0.5)
        fig.colorbar(mesh, ax=ax, label="share of codes used", pad=0.01)
    ax.set_xlabel("step")
    ax.set_ylabel("sub-codebook")
    window = f" over the last {window_tokens:,} training tokens" if window_tokens else ""
    ax.set_title(f"codes used per sub-codebook (K = {codebook_size}){window}", fontsize=10)
    for a in fig.axes[:4]:
        a.set_xlabel("step", fontsize=9)
        a.tick_params(labelsize=8)
    fig.suptitle(f"Training — step {step_count}", fontsize=12)
    return fig


def read_eval_history(folder) -> list:
    """The evaluations a model folder recorded over its training (`eval_history.jsonl`, one JSON per line), or []."""
    import json
    from pathlib import Path

    path = Path(folder) / "eval_history.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def heading_figure(live: list, recorded: list, metrics: dict, *, chance: float | None = None,
                   live_label: str = "this run", recorded_label: str = "the bundled model's run"):
    """Where a short live run is heading: its evaluations beside a full run's recorded ones, on a log step axis.

    live, recorded: [{"step": int, metric: value in [0, 1], ...}]; metrics: {metric: panel title}. -> Figure.
    """
    fig = new_figure(4.2 * len(metrics) + 0.6, 3.2)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, (metric, title) in zip(axes, metrics.items()):
        for rows, style, label in ((recorded, dict(color="#999999", ls="--", marker="o"), recorded_label),
                                   (live, dict(color="#4e79a7", ls="-", marker="D", ms=7), live_label)):
            points = [(r["step"], 100 * r[metric]) for r in rows if r.get(metric) is not None]
            if points:
                ax.plot(*zip(*points), label=label, **style)
        if chance is not None:
            ax.axhline(100 * chance, color="#e15759", lw=1, ls=":", label=f"chance ({100 * chance:.1f} %)")
        ax.set_xscale("log")
        ax.set_ylim(0, 100)
        ax.set_xlabel("training step (log scale)")
        ax.set_ylabel("%")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
    return fig
