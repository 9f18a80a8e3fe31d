"""What a study's numbers allow one to say: a verdict per comparison, and whether one metric predicts another.

    >>> rows = summarize(load_results("runs/ablate-quantizers"))
    >>> print(format_verdicts(rows, "quantizers"))       # per metric: the winner, separated by >= 2 sigma or not
    >>> corr = correlations(load_results(...), "quantizers", "codebook_usage", "psnr")  # r with its 95 % interval

A **verdict** compares the best setting of a metric (by mean over seeds) with every other setting. Its separation
is the difference of the two means in units of the standard error of that difference,
    z = |mean_a - mean_b| / sqrt(s_a^2 / n_a + s_b^2 / n_b),
with s the sample standard deviation over seeds. z >= 2 reads "separated by >= 2 sigma"; anything less "not
resolved at this scale" (more seeds, or a longer run, might separate them; the metric may also truly tie). With
3 seeds this is a rough screen, not a significance test.

A **correlation** pairs two metrics over every (setting, seed) of a study, whichever record holds each (a
tokenizer's usage with the generator trained on its codes): Pearson's r with its 95 % interval from Fisher's z
transform (tanh(atanh r +- 1.96 / sqrt(n - 3))), and Spearman's rank correlation beside it. An interval that
contains 0 says the study cannot tell whether the first metric predicts the second.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence

from .metrics import METRIC_BY_KEY

__all__ = ["SEPARATED_SIGMA", "separation", "verdicts", "format_verdicts", "joined_cells", "correlations",
           "format_correlations", "PREDICTORS", "DOWNSTREAM"]

SEPARATED_SIGMA = 2.0
# the codebook statistics asked about, and the metrics they might predict (where a study has them)
PREDICTORS = ("codebook_usage", "perplexity", "effective_bits", "pairwise_mi_bits")
DOWNSTREAM = ("psnr", "fid_proxy", "zero_shot_top1", "zero_shot_top1_heldout", "linear_probe_top1",
              "gen_nll_bits", "gen_prompt_accuracy", "mllm_vqa_acc", "mllm_caption_acc")


def separation(a: dict, b: dict) -> float:
    """|mean_a - mean_b| in standard errors of the difference, for two `summarize` rows; nan without a spread
    (a single seed), inf when both spreads are 0 and the means differ."""
    if a["n"] < 2 or b["n"] < 2 or math.isnan(a["std"]) or math.isnan(b["std"]):
        return math.nan
    diff = abs(a["mean"] - b["mean"])
    se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
    if se == 0:
        return math.inf if diff > 0 else 0.0
    return diff / se


def verdicts(rows: List[dict], study: str, metrics: Optional[Sequence[str]] = None) -> List[dict]:
    """Per metric of `study` (`summarize` rows): {metric, winner, mean, comparisons: [{setting, mean, sigma,
    separated}]}, the winner being the best mean by the metric's direction."""
    srows = [r for r in rows if r["study"] == study]
    keys = metrics or list(dict.fromkeys(r["metric"] for r in srows))
    out = []
    for metric in keys:
        mrows = [r for r in srows if r["metric"] == metric]
        if len(mrows) < 2 or metric.endswith("seconds"):
            continue
        higher = METRIC_BY_KEY[metric].higher_is_better if metric in METRIC_BY_KEY else True
        best = max(mrows, key=lambda r: r["mean"] if higher else -r["mean"])
        comparisons = []
        for r in mrows:
            if r is best:
                continue
            sigma = separation(best, r)
            comparisons.append({"setting": r["setting"], "mean": r["mean"], "sigma": sigma,
                                "separated": bool(sigma >= SEPARATED_SIGMA)})
        out.append({"metric": metric, "winner": best["setting"], "mean": best["mean"], "n": best["n"],
                    "comparisons": comparisons})
    return out


def _sigma_text(c: dict) -> str:
    if math.isnan(c["sigma"]):
        return f"{c['setting']}: one seed, no spread"
    # rounded down, so that "1.9 σ" is never printed for a separation just short of 2
    z = "∞" if math.isinf(c["sigma"]) else f"{math.floor(c['sigma'] * 10) / 10:.1f}"
    return (f"{c['setting']} separated by {z} σ" if c["separated"]
            else f"{c['setting']} not resolved at this scale ({z} σ)")


def format_verdicts(rows: List[dict], study: str, metrics: Optional[Sequence[str]] = None) -> str:
    """A markdown list: per metric, the winner and, against each other setting, its separation or "not resolved"."""
    lines = [f"Verdicts (best mean against each other setting; separated when ≥ {SEPARATED_SIGMA:g} standard errors "
             "of the difference):", ""]
    for v in verdicts(rows, study, metrics):
        label = METRIC_BY_KEY[v["metric"]].label if v["metric"] in METRIC_BY_KEY else v["metric"]
        lines.append(f"- **{label}**: {v['winner']} ({v['mean']:.4g}); " + "; ".join(map(_sigma_text,
                                                                                      v["comparisons"])))
    return "\n".join(lines) + "\n"


def joined_cells(records: Iterable[dict], study: str) -> Dict[tuple, dict]:
    """(setting, seed) -> every metric of that cell, from all its records (tokenizer, generator, unified model)."""
    cells: Dict[tuple, dict] = {}
    for r in records:
        if r["study"] == study:
            cells.setdefault((r["setting"], r["seed"]), {}).update(r["metrics"])
    return cells


def _ranks(values: Sequence[float]) -> List[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for t in range(i, j + 1):   # ties share their mean rank
            ranks[order[t]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _pearson(x: Sequence[float], y: Sequence[float]) -> float:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def correlations(records: Iterable[dict], study: str, x_metric: str, y_metric: str) -> dict:
    """Pearson r (with its 95 % Fisher interval) and Spearman rho between two metrics over the (setting, seed) cells
    of `study` that have both: {x, y, n, r, low, high, spearman}."""
    cells = [m for m in joined_cells(records, study).values()
             if isinstance(m.get(x_metric), (int, float)) and isinstance(m.get(y_metric), (int, float))]
    x = [float(m[x_metric]) for m in cells]
    y = [float(m[y_metric]) for m in cells]
    n = len(cells)
    r = _pearson(x, y) if n >= 3 else math.nan
    low = high = math.nan
    if n > 3 and not math.isnan(r):
        z, half = math.atanh(max(-0.999999, min(0.999999, r))), 1.96 / math.sqrt(n - 3)
        low, high = math.tanh(z - half), math.tanh(z + half)
    return {"x": x_metric, "y": y_metric, "n": n, "r": r, "low": low, "high": high,
            "spearman": _pearson(_ranks(x), _ranks(y)) if n >= 3 else math.nan}


def format_correlations(records: List[dict], study: str, predictors: Sequence[str] = PREDICTORS,
                        downstream: Sequence[str] = DOWNSTREAM) -> str:
    """A markdown table: does each codebook statistic predict each downstream metric across the study's cells?"""
    rows = [correlations(records, study, x, y) for x in predictors for y in downstream]
    rows = [c for c in rows if c["n"] >= 4 and not math.isnan(c["r"])]
    if not rows:
        return ""
    lines = ["Does a codebook statistic predict what the tokens are good for? Pearson r over every (setting, seed) "
             "cell with its 95 % interval, and Spearman's rho; an interval containing 0 is \"not resolved\".", "",
             "| statistic | metric | n | r [95 % interval] | Spearman | reading |", "|---|---|---|---|---|---|"]
    for c in rows:
        reading = ("not resolved" if c["low"] <= 0 <= c["high"] else
                   "predicts (higher with higher)" if c["r"] > 0 else "predicts (lower with higher)")
        label = METRIC_BY_KEY[c["y"]].label if c["y"] in METRIC_BY_KEY else c["y"]
        lines.append(f"| {c['x']} | {label} | {c['n']} | {c['r']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}] | "
                     f"{c['spearman']:+.2f} | {reading} |")
    return "\n".join(lines) + "\n"
