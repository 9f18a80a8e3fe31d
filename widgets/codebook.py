"""CodebookUsage: how each sub-codebook is used over a stated window of tokens.

    >>> CodebookUsage(model, dataset, num_images=256)      # encode the dataset's first images, then inspect
    >>> CodebookUsage(codes, codebook_size=256)            # codes (..., k) you already have
    >>> CodebookUsage(metrics.codebook_stats(codes, K))    # just the statistics (no frequency curves)
    >>> CodebookUsage(trainer)                             # the trainer's window of recent training tokens

Shows, per sub-codebook: sorted code frequencies (log y; where the curve stops, the remaining codes are dead), a
table of usage / dead codes / perplexity / normalised entropy with the window (N tokens) stated, and the k x k
mutual-information heatmap (are the chunks really independent?). All statistics come from
`unitok.evaluation.codebook_stats.codebook_stats`, the project's one definition.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

import ipywidgets as W
import plotly.graph_objects as go

from unitok.evaluation import codebook_stats as M

from ._common import (FIG_WIDTH, HALF_WIDTH, code_counts, codebook_colour, encode_images, figure_layout,
                      html_table, json_safe, new_figure, take_images, title_html, View)


class CodebookUsage(View):
    """Per-sub-codebook usage statistics with frequency plots, a table and a mutual-information heatmap.

    Args:
        model: a UniTok model (with `data`); or, in the same place, codes (..., k) int (with `codebook_size`), a
            stats dict from `unitok.evaluation.codebook_stats.codebook_stats`, or a Trainer (its window of recent training tokens).
        data: for a model: images (B, 3, S, S) in [-1, 1], a dataset, or a list of items.
        num_images: how many of the data's first images to encode when `window` is None.
        window: number of tokens to use (the first `window` tokens); None = everything given.
        codebook_size: K, needed when `model` is a codes tensor.

    Drivable: `codebook` (Dropdown, the detail plot's sub-codebook). Read: `stats` (the codebook_stats dict),
    `counts` ((k, K) numpy, None for a stats dict), `window_tokens`, `table` (HTML), `overview_figure`,
    `detail_figure`, `mi_figure` (FigureWidgets).
    """

    def __init__(self, model, data=None, *, num_images: int = 512, window: Optional[int] = None,
                 codebook_size: Optional[int] = None, batch_size: int = 128):
        self.codes, self.stats, self.source_text = self._resolve(model, data, window, codebook_size,
                                                                 num_images, batch_size)
        self.num_codebooks = int(self.stats.get("num_codebooks", len(self.stats["codebook_usage"])))
        self.codebook_size = self._codebook_size(self.stats, codebook_size)
        self.window_tokens = int(self.stats["window_tokens"])
        self.counts = code_counts(self.codes, self.codebook_size) if self.codes is not None else None
        self._build_widgets()

    # ------------------------------------------------------------------ inputs
    @staticmethod
    def _resolve(source, images, window, codebook_size, max_images, batch_size):
        """-> (codes (N, k) or None, stats dict, a sentence saying where the tokens came from)."""
        if isinstance(source, dict):
            if "codebook_usage" not in source or "window_tokens" not in source:
                raise ValueError("expected a stats dict from unitok.evaluation.codebook_stats.codebook_stats (keys 'codebook_usage', "
                                 f"'window_tokens', ...), got keys {sorted(source)[:8]}")
            return None, dict(source), f"statistics given over {source['window_tokens']:,} tokens"
        if isinstance(source, (torch.Tensor, np.ndarray)):
            if codebook_size is None:
                raise ValueError("CodebookUsage(codes) needs codebook_size=K: dead codes cannot be inferred from "
                                 "the codes themselves")
            codes = torch.as_tensor(source)
            codes = codes.reshape(-1, codes.shape[-1]) if codes.ndim >= 2 else codes
            what = "given codes"
        elif hasattr(source, "encode") and hasattr(source, "config"):          # a UniTok model
            if images is None:
                raise ValueError("CodebookUsage(model) needs data: a (B, 3, S, S) tensor or a dataset to encode")
            cfg = source.config
            per_image = cfg.grid_size ** 2
            n = max_images if window is None else math.ceil(window / per_image)
            batch = take_images(images, n)
            codes = encode_images(source, batch, batch_size).reshape(-1, cfg.num_codebooks)
            codebook_size = cfg.codebook_size
            what = f"{len(batch)} images × {per_image} tokens, encoded by the model"
        elif hasattr(source, "tracker") and hasattr(source, "model_config"):   # a Trainer
            codes = source.tracker.window_codes().cpu()
            codebook_size = source.model_config.codebook_size
            what = f"the trainer's last {len(codes):,} training tokens (step {source.step_count})"
        else:
            raise ValueError("expected a UniTok model (+ images), codes (..., k) with codebook_size, a stats dict "
                             f"or a Trainer, got {type(source).__name__}")
        if window is not None:
            if window < 1:
                raise ValueError(f"window must be a positive number of tokens, got {window}")
            codes = codes[:window]
        codes = codes.long().cpu()
        return codes, M.codebook_stats(codes, codebook_size), what

    @staticmethod
    def _codebook_size(stats: dict, given: Optional[int]) -> int:
        if stats.get("codebook_size"):
            return int(stats["codebook_size"])
        if given:
            return int(given)
        # stats_from_counts has no "codebook_size": K = dead / (1 - usage) for any partly used sub-codebook
        for dead, usage in zip(stats["dead_codes"], stats["codebook_usage"]):
            if usage < 1:
                return int(round(dead / (1 - usage)))
        raise ValueError("cannot tell the codebook size from these statistics; pass codebook_size=K")

    # ------------------------------------------------------------------ widgets
    def _build_widgets(self) -> None:
        k, K, N = self.num_codebooks, self.codebook_size, self.window_tokens
        self.codebook = W.Dropdown(options=[(f"sub-codebook {i}", i) for i in range(k)], value=0,
                                   description="detail", layout=W.Layout(width="240px"))
        self.table = W.HTML(self._table_html())
        self.overview_figure = go.FigureWidget(self._overview_data(),
                                               layout=figure_layout(self._overview_title(), HALF_WIDTH + 60, 380))
        if self.counts is not None:
            self.overview_figure.update_yaxes(type="log", title_text="frequency", exponentformat="power")
            self.overview_figure.update_xaxes(title_text="rank (codes sorted by frequency)")
            self.overview_figure.update_layout(legend=dict(title=dict(text="sub-codebook")))
        else:
            self.overview_figure.update_xaxes(title_text="sub-codebook", dtick=1)
            self.overview_figure.update_yaxes(range=[0, 1.05])
        self.mi_figure = go.FigureWidget(layout=figure_layout(self._mi_title(), HALF_WIDTH - 40, 380))
        self._fill_mi()
        self.detail_figure = go.FigureWidget(layout=figure_layout("", FIG_WIDTH, 330, margin=dict(l=60, r=20, t=60, b=45)))
        self.codebook.observe(lambda _: self._draw_detail(), names="value")
        self._draw_detail()
        header = W.HTML(title_html("Codebook usage",
                                   f"window: N = {N:,} tokens ({self.source_text}); k = {k} sub-codebooks of "
                                   f"K = {K} codes"))
        self.figure = self.overview_figure          # the main figure, under the name every view uses
        self.widget = self._root([header, self.table,
                                  W.HBox([self.overview_figure, self.mi_figure], layout=W.Layout(flex_flow="row wrap")),
                                  self.codebook, self.detail_figure])

    def _table_html(self) -> str:
        s, K = self.stats, self.codebook_size
        rows = []
        for i in range(self.num_codebooks):
            used = K - int(s["dead_codes"][i])
            rows.append([f"<span style='color:{codebook_colour(i)}'>■</span> {i}", f"{100 * s['codebook_usage'][i]:.1f} %",
                         f"{used} / {K}", int(s["dead_codes"][i]), f"{s['perplexity'][i]:.1f}",
                         f"{s['normalized_entropy'][i]:.3f}", f"{100 * s['batch_usage'][i]:.1f} %"])
        caption = (f"Window: N = {self.window_tokens:,} tokens. Usage = share of the K codes chosen at least once; "
                   f"perplexity = exp(H); normalised entropy = H / ln K; reference usage = share of codes with "
                   f"frequency > 0.01/K.")
        if "joint_unique_fraction" in s:
            caption += (f" Joint: {s['joint_unique']:,} distinct k-tuples ({100 * s['joint_unique_fraction']:.1f} % "
                        f"of tokens); mean pairwise MI {s['mean_pairwise_mi']:.3f} nats (shuffled baseline "
                        f"{s['mean_pairwise_mi_shuffled']:.3f}).")
        return html_table(["sub-codebook", "usage", "used", "dead", "perplexity", "norm. entropy", "ref. usage"],
                          rows, caption)

    def _overview_title(self) -> str:
        if self.counts is None:
            return "usage per sub-codebook (frequencies need codes)"
        return "sorted code frequency per sub-codebook (log)"

    def _overview_data(self) -> list:
        k, K = self.num_codebooks, self.codebook_size
        if self.counts is None:      # statistics only: bars of usage and normalised entropy
            x = list(range(k))
            return [go.Bar(x=x, y=self.stats["codebook_usage"], name="usage", marker_color=[codebook_colour(i) for i in x]),
                    go.Scatter(x=x, y=self.stats["normalized_entropy"], name="norm. entropy", mode="markers",
                               marker=dict(color="#222", size=9, symbol="diamond"))]
        traces = []
        for i in range(k):
            freq = np.sort(self.counts[i])[::-1] / self.window_tokens
            used = int((freq > 0).sum())
            traces.append(go.Scatter(x=np.arange(1, used + 1), y=freq[:used], mode="lines", name=f"{i}",
                                     line=dict(color=codebook_colour(i), width=1.5),
                                     hovertemplate=f"sub-codebook {i}<br>rank %{{x}}<br>frequency %{{y:.2e}}"
                                                   "<extra></extra>"))
        traces.append(go.Scatter(x=[1, K], y=[1 / K, 1 / K], mode="lines", name="uniform 1/K",
                                 line=dict(color="#999", dash="dash", width=1), hoverinfo="skip"))
        return traces

    def _mi_title(self) -> str:
        return "pairwise mutual information (nats)"

    def _fill_mi(self) -> None:
        fig, s = self.mi_figure, self.stats
        k = self.num_codebooks
        if "mutual_information" not in s:
            fig.layout.title.text = "mutual information needs codes"
            return
        mi = np.asarray(s["mutual_information"], dtype=np.float64)
        shown = mi.copy()
        np.fill_diagonal(shown, np.nan)      # the diagonal is each entropy (in the table); hiding it keeps the
        fig.add_heatmap(z=json_safe(shown), x=list(range(k)), y=list(range(k)), colorscale="Blues", zmin=0,  # scale useful
                        colorbar=dict(title=dict(text="nats", side="right")),
                        hovertemplate="I(%{y}; %{x}) = %{z:.4f} nats<extra></extra>")
        fig.update_xaxes(title_text="sub-codebook", dtick=1)
        fig.update_yaxes(title_text="sub-codebook", dtick=1, autorange="reversed", scaleanchor="x")
        fig.layout.title.text = (f"pairwise mutual information (nats)<br><sup>shuffled baseline "
                                 f"{s.get('mean_pairwise_mi_shuffled', 0):.3f}; diagonal (entropy) hidden</sup>")

    def _draw_detail(self) -> None:
        i, K, fig = self.codebook.value, self.codebook_size, self.detail_figure
        s = self.stats
        with fig.batch_update():
            fig.data = []
            if self.counts is None:
                fig.add_bar(x=list(range(self.num_codebooks)), y=s["codebook_usage"],
                            marker_color=["#d62728" if j == i else "#bbb" for j in range(self.num_codebooks)],
                            hovertemplate="sub-codebook %{x}<br>usage %{y:.1%}<extra></extra>")
                fig.update_yaxes(type="linear", title_text="usage", tickformat=".0%")
                fig.update_xaxes(title_text="sub-codebook", dtick=1)
            else:
                counts = self.counts[i]
                order = np.argsort(-counts, kind="stable")
                freq = counts[order] / self.window_tokens
                used = int((counts > 0).sum())
                fig.add_bar(x=np.arange(1, used + 1), y=freq[:used], customdata=np.stack([order[:used],
                                                                                          counts[order][:used]], 1),
                            marker_color=codebook_colour(i), marker_line_width=0,
                            hovertemplate="code %{customdata[0]}<br>%{customdata[1]} tokens<br>"
                                          "frequency %{y:.2e}<extra></extra>")
                fig.add_scatter(x=[0.5, K + 0.5], y=[1 / K, 1 / K], mode="lines", name="uniform 1/K",
                                line=dict(color="#999", dash="dash", width=1), hoverinfo="skip")
                fig.update_yaxes(type="log", title_text="frequency", exponentformat="power")
                fig.update_xaxes(title_text="rank (codes sorted by frequency)", range=[0.5, K + 0.5])
            fig.layout.showlegend = False
            fig.layout.title.text = (f"sub-codebook {i}: {K - int(s['dead_codes'][i])} of {K} codes used, "
                                     f"{int(s['dead_codes'][i])} dead,<br>perplexity {s['perplexity'][i]:.1f}, "
                                     f"normalised entropy {s['normalized_entropy'][i]:.3f} "
                                     f"(N = {self.window_tokens:,} tokens)")
        # the overview highlights the selected sub-codebook
        if self.counts is not None:
            with self.overview_figure.batch_update():
                for j, trace in enumerate(self.overview_figure.data[:self.num_codebooks]):
                    trace.line.width = 3.5 if j == i else 1.2
                    trace.opacity = 1.0 if j == i else 0.55

    # ------------------------------------------------------------------ static picture
    def static_figure(self):
        s, k, K = self.stats, self.num_codebooks, self.codebook_size
        fig = new_figure(11, 4.2)
        grid = fig.add_gridspec(1, 3, width_ratios=[1.3, 1.0, 0.9], wspace=0.35)
        ax = fig.add_subplot(grid[0, 0])
        if self.counts is not None:
            for i in range(k):
                freq = np.sort(self.counts[i])[::-1] / self.window_tokens
                used = int((freq > 0).sum())
                ax.plot(np.arange(1, used + 1), freq[:used], color=codebook_colour(i), lw=1.3, label=str(i))
            ax.axhline(1 / K, color="#999", ls="--", lw=1)
            ax.set_yscale("log")
            ax.set_xlabel("rank")
            ax.set_ylabel("frequency")
            ax.set_title("sorted code frequency", fontsize=10)
            ax.legend(fontsize=7, ncol=2, title="sub-codebook", title_fontsize=7)
        else:
            ax.bar(range(k), s["codebook_usage"], color=[codebook_colour(i) for i in range(k)])
            ax.set_title("usage per sub-codebook", fontsize=10)
        ax = fig.add_subplot(grid[0, 1])
        x = np.arange(k)
        ax.bar(x - 0.2, s["codebook_usage"], 0.4, label="usage", color="#4e79a7")
        ax.bar(x + 0.2, s["normalized_entropy"], 0.4, label="norm. entropy", color="#f28e2b")
        ax.set_ylim(0, 1.05)
        ax.set_xticks(x)
        ax.set_xlabel("sub-codebook")
        ax.set_title(f"usage / entropy (dead: {', '.join(str(int(d)) for d in s['dead_codes'])})", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        ax = fig.add_subplot(grid[0, 2])
        if "mutual_information" in s:
            mi = np.asarray(s["mutual_information"], dtype=np.float64)
            np.fill_diagonal(mi, np.nan)
            image = ax.imshow(mi, cmap="Blues", vmin=0)
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="nats")
            ax.set_xticks(x)
            ax.set_yticks(x)
        ax.set_title("pairwise MI (diagonal hidden)", fontsize=10)
        fig.suptitle(f"Codebook usage over N = {self.window_tokens:,} tokens (K = {K})", fontsize=12)
        fig.subplots_adjust(top=0.82, bottom=0.14, left=0.06, right=0.97)
        return fig
