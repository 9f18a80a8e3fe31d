"""The paper's roadmap figure in miniature: the same unified model trained on six tokenizer variants.

    unitok ablate roadmap --seeds 3 --model-steps 800   # 5 tokenizers (200 steps) + 6 unified models per seed
    unitok ablate report runs/ablate                    # mean +- std per step, error bars, roadmap.png

The bundled study and what it shows: docs/ablations/roadmap and docs/mllm.md.

The paper's order (average VQA of its MLLM on each variant):

| step | tokenizer | unified model reads | paper |
| --- | --- | --- | --- |
| `clip` | contrastive only (no pixel loss), 8 codebooks, attention projection | the encoder's full-width continuous tokens | 65.9 |
| `+factorization` | the same model | its low-dimensional pre-quantization latent (through the causal up-projection) | 59.8 |
| `+discretization` | contrastive only, **one** codebook (same number of code vectors) | codes via the codebook | 57.6 |
| `+reconstruction` | one codebook, contrastive + reconstruction | codes via the codebook | 57.5 |
| `+multi-codebook` | 8 codebooks, linear projection | codes via the codebook | 62.6 |
| `+attention projection` | 8 codebooks, attention projection (the default) | codes via the codebook | 64.8 |

Every arm trains understanding only (captions and questions, `t2i_weight=0`), so the VQA comparison gives every
arm the same budget; the continuous arms could not draw anyway. Tokenizer runs are ordinary `unitok ablate` runs
(shared with the other studies when their settings coincide); a unified-model run reads its tokenizer's `best/`
weights. A record's metrics: `mllm_vqa_acc`, `mllm_caption_acc` (mean caption-attribute accuracy) and their
`_heldout` versions on the held-out colour x shape pairs, and `train_seconds`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable, Optional

from ..training.machine import REFERENCE_GFLOPS, git_revision, machine_info, matmul_peak
from .metrics import plot_data
from .spec import Setting, Study, spec_hash, tokenizer_spec, trained_tokenizer

__all__ = ["ROADMAP", "ROADMAP_STUDY", "mllm_spec", "run_mllm_task", "plot_roadmap"]

CONTRASTIVE_ONLY = {"l1_weight": 0.0, "l2_weight": 0.0}


def _one_codebook(m):  # equal total code vectors: k x K constant
    return m.num_codebooks * m.codebook_size


# name -> (tokenizer overrides, unified-model overrides, the paper's average VQA)
ROADMAP = {
    "clip": (dict(CONTRASTIVE_ONLY), {"image_input": "continuous", "continuous_source": "encoder"}, 65.9),
    "+factorization": (dict(CONTRASTIVE_ONLY), {"image_input": "continuous", "continuous_source": "latent"}, 59.8),
    "+discretization": ({**CONTRASTIVE_ONLY, "num_codebooks": 1, "codebook_size": _one_codebook},
                        {"image_input": "codebook"}, 57.6),
    "+reconstruction": ({"num_codebooks": 1, "codebook_size": _one_codebook}, {"image_input": "codebook"}, 57.5),
    "+multi-codebook": ({"projection": "linear"}, {"image_input": "codebook"}, 62.6),
    "+attention projection": ({}, {"image_input": "codebook"}, 64.8),
}


# The study `unitok ablate roadmap` runs (by name only: it is not part of "all", being 5 tokenizers + 6 models a seed)
ROADMAP_STUDY = Study(
    "roadmap", "Which tokenizer design choices help a unified model read pictures (the paper's roadmap)?",
    tuple(Setting(name, tok) for name, (tok, _, _) in ROADMAP.items()),
    "average VQA: CLIP 65.9 -> factorization 59.8 -> discretization 57.6 -> reconstruction 57.5 -> "
    "multi-codebook 62.6 -> attention projection 64.8", kind="mllm")


def mllm_spec(scale, setting, seed: int, model_overrides: Optional[dict] = None) -> dict:
    """Everything that determines one unified-model run: its tokenizer's spec (and key), the model overrides (the
    roadmap step's, unless given)."""
    tok = tokenizer_spec(scale, setting, seed)
    steps = scale.generator_steps or scale.steps
    return {"kind": "mllm", "tokenizer": tok, "tokenizer_key": spec_hash(tok), "steps": steps, "seed": seed,
            "mllm": dict(ROADMAP[setting.name][1] if model_overrides is None else model_overrides),
            "train_images": min(6000, max(2048, 32 * steps)),
            "eval_images": min(scale.eval_images, 256)}


def run_mllm_task(task, out: Path, run_dir: Path, log: Callable) -> dict:
    """Train and measure the unified model of one roadmap cell on its (already trained) tokenizer."""
    from ..mllm.trainer import MLLMTrainer
    from ..training.runs import atomic_write_text

    spec = task.spec
    start = time.perf_counter()
    tok_dir, device, tokenizer = trained_tokenizer(out, spec)
    peak = matmul_peak(device=device)
    overrides = ["cpu_bf16=off", f"steps={spec['steps']}", f"seed={spec['seed']}", "eval_every=0", "t2i_weight=0",
                 f"checkpoint_every={max(10, spec['steps'] // 3)}", f"train_images={spec['train_images']}",
                 f"eval_images={spec['eval_images']}", f"device={spec['tokenizer']['train']['device']}",
                 *[f"{k}={v}" for k, v in spec["mllm"].items()]]
    trainer = MLLMTrainer.from_tokenizer(tokenizer, tok_dir, overrides=overrides, out_dir=run_dir, resume=True,
                                         progress=False)
    try:
        trainer.run(progress=False)
        trainer.save_checkpoint()
        results = trainer.evaluate()
        trainer.write_summary(results)
    finally:
        trainer.close()
    metrics = {"train_seconds": round(trainer.clock.train_seconds, 2)}
    for split, suffix in (("test", ""), ("heldout", "_heldout")):
        if f"vqa_acc_{split}" in results:
            metrics[f"mllm_vqa_acc{suffix}"] = results[f"vqa_acc_{split}"]
            metrics[f"mllm_caption_acc{suffix}"] = results[f"caption_mean_acc_{split}"]
    log(f"{task.study} {task.setting} seed {task.seed}: unified model VQA {metrics.get('mllm_vqa_acc', float('nan')):.3f}")
    record = {"kind": "mllm", "key": task.key, "metrics": metrics, "eval": results,
              "train_seconds": round(trainer.clock.train_seconds, 2), "wall_seconds": round(time.perf_counter() - start, 2),
              "matmul_peak_gflops": round(peak, 1),
              "peak_scaled_train_seconds": round(trainer.clock.train_seconds * peak / REFERENCE_GFLOPS, 2),
              "config": {**spec, "mllm_config": dataclasses.asdict(trainer.model_config),
                         "mllm_train": dataclasses.asdict(trainer.config)},
              **({"paper_vqa": ROADMAP[task.setting][2]} if task.study == "roadmap" else {}),
              "git": git_revision(), "machine": machine_info(device), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_text(run_dir / "result.json", json.dumps(record, indent=2, default=float))
    (run_dir / "checkpoint.pt").unlink(missing_ok=True)
    return record


def plot_roadmap(rows, png=None):
    """The roadmap figure: this toolkit's unified-model scores per step (mean ± std over seeds, dots: single seeds)
    on the left axis, the paper's average VQA on the right, in the paper's order. rows: `report.summarize` rows.
    Returns the matplotlib figure (and writes `png` when given)."""
    import matplotlib
    if png is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    steps = list(ROADMAP)
    _, _, get = plot_data(rows, "roadmap")      # (setting, metric) -> summary row
    if not any((s, "mllm_vqa_acc") in get for s in steps):
        raise ValueError("no roadmap results (metric mllm_vqa_acc) among the rows")
    fig, ax = plt.subplots(figsize=(8.5, 3.6))
    x = list(range(len(steps)))
    for metric, label, colour, dx in (("mllm_vqa_acc", "VQA, test pictures", "#4c72b0", -0.08),
                                      ("mllm_vqa_acc_heldout", "VQA, held-out pairs", "#8fb0e0", 0.0),
                                      ("mllm_caption_acc", "caption attributes, test pictures", "#55a868", 0.08)):
        xs = [i for i, s in enumerate(steps) if (s, metric) in get]
        if not xs:
            continue
        means = [get[(steps[i], metric)]["mean"] for i in xs]
        stds = [0.0 if math.isnan(get[(steps[i], metric)]["std"]) else get[(steps[i], metric)]["std"] for i in xs]
        ax.errorbar([i + dx for i in xs], means, yerr=stds, marker="o", capsize=4, color=colour, label=label)
        for i in xs:
            vals = get[(steps[i], metric)]["values"]
            ax.scatter([i + dx] * len(vals), vals, color=colour, s=10, alpha=0.6, zorder=3)
    ax.set_xticks(x)
    ax.set_xticklabels(steps, rotation=15, fontsize=8)
    ax.set_ylabel("accuracy here (shapes, CPU scale)")
    paper = ax.twinx()
    paper.plot(x, [ROADMAP[s][2] for s in steps], ls="--", marker="s", color="grey", label="paper: average VQA")
    paper.set_ylabel("paper: average VQA", color="grey")
    handles = ax.get_legend_handles_labels()[0] + paper.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="lower right")
    n = max((get[(s, "mllm_vqa_acc")]["n"] for s in steps if (s, "mllm_vqa_acc") in get), default=0)
    ax.set_title(f"the roadmap in miniature: the same unified model on six tokenizers ({n} seeds)", fontsize=10)
    fig.tight_layout()
    if png is not None:
        fig.savefig(png, dpi=110)
    return fig
