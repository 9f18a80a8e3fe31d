"""What the studies compare: the metrics (`METRICS`, in the order tables and plots list them), the headline numbers
drawn from one evaluation (`headline_metrics`), and which of them a table or a figure shows.

    >>> headline_metrics(evaluate_model(model, eval_data))   # {"psnr": 23.5, "effective_bits": 41.2, ...}
    >>> metrics, settings, get = plot_data(rows, "codebooks")  # the panels of a study's figure

Every metric has one key everywhere: in a record's "metrics", in `unitok.studies.report`'s rows, tables and figures.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List

__all__ = ["Metric", "METRICS", "METRIC_BY_KEY", "headline_metrics", "TABLE_METRICS", "PLOT_METRICS", "plot_data"]


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    higher_is_better: bool = True


# What the report tabulates and plots, in this order; a metric no record has is left out (e.g. the generator's in a
# tokenizer study, or the linear probe before the evaluation offers one).
METRICS = (
    Metric("psnr", "PSNR (dB)"),
    Metric("ssim", "SSIM"),
    Metric("fid_proxy", "proxy FID (EfficientNet-Lite0)", False),
    Metric("zero_shot_top1", "zero-shot shape top-1, seen pairs"),
    Metric("zero_shot_top1_heldout", "zero-shot shape top-1, held-out pairs"),
    Metric("linear_probe_top1", "linear probe shape top-1, seen pairs"),
    Metric("linear_probe_top1_heldout", "linear probe shape top-1, held-out pairs"),
    Metric("codebook_usage", "codebook usage (mean over sub-codebooks)"),
    Metric("perplexity", "perplexity per sub-codebook (mean)"),
    Metric("effective_bits", "effective bits per token (sum of log2 perplexity)"),
    Metric("normalized_entropy", "normalised entropy per sub-codebook (mean)"),
    Metric("dead_codes", "dead codes per sub-codebook (mean)", False),
    Metric("joint_unique_fraction", "distinct code tuples / tokens"),
    # lower: sub-codes that carry separate information (the plug-in estimate minus its value for shuffled codes)
    Metric("pairwise_mi_bits", "mutual information between sub-codes above chance (bits, mean pair)", False),
    Metric("clip_zero_shot_top1", "zero-shot of the pre-trained continuous CLIP"),
    Metric("gen_nll_bits", "generator held-out NLL (bits per position)", False),
    Metric("gen_nll_bits_heldout", "generator NLL, held-out pairs (bits per position)", False),
    Metric("gen_prompt_accuracy", "samples showing the prompt's colour and shape"),
    Metric("gen_prompt_accuracy_heldout", "samples showing a held-out prompt"),
    Metric("gen_fid_proxy", "proxy FID of samples", False),
    Metric("mllm_vqa_acc", "unified model VQA accuracy, seen pairs"),
    Metric("mllm_vqa_acc_heldout", "unified model VQA accuracy, held-out pairs"),
    Metric("mllm_caption_acc", "unified model caption attributes, seen pairs"),
    Metric("mllm_caption_acc_heldout", "unified model caption attributes, held-out pairs"),
    Metric("pretrain_seconds", "CLIP pre-training seconds", False),
    Metric("generator_train_seconds", "generator train seconds", False),
    Metric("mllm_train_seconds", "unified model train seconds", False),
    Metric("train_seconds", "train seconds", False),
)
METRIC_BY_KEY = {m.key: m for m in METRICS}


def _mean(values) -> float:
    values = list(values)
    return float(sum(values) / len(values))


def headline_metrics(results: dict) -> dict:
    """The scalar metrics of one evaluation (`unitok.evaluation.tokenizer.evaluate_model`'s dict) that the studies compare.

    Per-sub-codebook lists become means; `effective_bits` = sum over sub-codebooks of log2(perplexity): the entropy
    of a token's code tuple if sub-codebooks were independent, comparable across k (k = 1 with 2048 codes can carry
    at most 11 bits, k = 8 with 256 codes each up to 64). FID is reported only when the offline proxy extractor
    made it (`fid_proxy`); a linear probe's top-1 is passed through under `linear_probe_top1` when the evaluation
    reports one.
    """
    out = {}
    for key in ("psnr", "ssim", "zero_shot_top1", "zero_shot_top1_heldout"):
        if isinstance(results.get(key), (int, float)):
            out[key] = float(results[key])
    for key in ("codebook_usage", "perplexity", "normalized_entropy", "dead_codes"):
        value = results.get(key)
        if isinstance(value, (list, tuple)) and value:
            out[key] = _mean(value)
    if isinstance(results.get("joint_unique_fraction"), (int, float)):
        out["joint_unique_fraction"] = float(results["joint_unique_fraction"])
    if isinstance(results.get("mean_pairwise_mi"), (int, float)) and isinstance(
            results.get("mean_pairwise_mi_shuffled"), (int, float)):   # nats -> bits, above the estimator's chance
        out["pairwise_mi_bits"] = (results["mean_pairwise_mi"] - results["mean_pairwise_mi_shuffled"]) / math.log(2)
    if isinstance(results.get("perplexity"), (list, tuple)):
        out["effective_bits"] = float(sum(math.log2(max(p, 1.0)) for p in results["perplexity"]))
    if isinstance(results.get("fid"), (int, float)):
        if "proxy" in str(results.get("fid_extractor", "")):
            out["fid_proxy"] = float(results["fid"])
        else:
            out["fid"] = float(results["fid"])
    for key in ("linear_probe_top1", "linear_probe_top1_heldout"):   # the evaluation's probe on pooled tokens
        if isinstance(results.get(key), (int, float)):
            out[key] = float(results[key])
    return out


# The columns of `unitok.studies.report.format_table` and the panels of its figures, where a study has them.
TABLE_METRICS = ("psnr", "fid_proxy", "zero_shot_top1", "zero_shot_top1_heldout", "linear_probe_top1",
                 "linear_probe_top1_heldout", "codebook_usage", "effective_bits", "dead_codes", "pairwise_mi_bits",
                 "clip_zero_shot_top1", "gen_nll_bits", "gen_prompt_accuracy", "gen_prompt_accuracy_heldout", "gen_fid_proxy", "mllm_vqa_acc", "mllm_vqa_acc_heldout",
                 "mllm_caption_acc", "mllm_caption_acc_heldout", "train_seconds", "pretrain_seconds")

PLOT_METRICS = ("psnr", "fid_proxy", "zero_shot_top1", "zero_shot_top1_heldout", "linear_probe_top1",
                "codebook_usage", "effective_bits", "pairwise_mi_bits", "gen_nll_bits", "gen_prompt_accuracy",
                "gen_prompt_accuracy_heldout", "gen_fid_proxy", "mllm_vqa_acc", "mllm_vqa_acc_heldout", "mllm_caption_acc",
                "mllm_caption_acc_heldout")


def plot_data(rows: List[dict], study: str):
    """What a study's figure shows, from `unitok.studies.report.summarize` rows: (the PLOT_METRICS the study has, its
    settings in row order, {(setting, metric): summary row})."""
    srows = [r for r in rows if r["study"] == study]
    metrics = [m for m in PLOT_METRICS if any(r["metric"] == m for r in srows)]
    settings = list(dict.fromkeys(r["setting"] for r in srows))
    get = {(r["setting"], r["metric"]): r for r in srows}
    return metrics, settings, get

