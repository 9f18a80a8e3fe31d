"""Evaluation of a UniTok model, and what a finished run writes next to its weights.

    >>> results = evaluate_model(model, {"recon": test_set, "zero_shot": test_set}, fid="proxy")
    >>> results["psnr"], results["codebook_usage"], results["zero_shot_top1"], results["fid"]

`evaluate_model` makes one pass over each evaluation set:
- "recon": PSNR and SSIM of the reconstructions, codebook statistics over all its tokens (the window is the
  whole set: `codebook_window_tokens`), image<->text retrieval recall with the set's captions, and FID when
  asked for ("proxy" = EfficientNet-Lite0 features, or a path to Inception-v3 weights for true rFID);
- "zero_shot" / "zero_shot_heldout": zero-shot top-1 / top-5 for every task the dataset lists
  (`dataset.zero_shot_tasks()`: class names x prompt templates);
- "probe_train" (with "zero_shot"): a linear probe per task (`unitok.evaluation.linear_probe`): logistic regression on the
  frozen mean-pooled quantized tokens, fitted on "probe_train" and tested on "zero_shot" (and on
  "zero_shot_heldout" for the headline task): `linear_probe_top1`, `linear_probe_<task>_top1`.
The result names are the same as in the training log (`codebook_usage`, `dead_codes`, `perplexity`, ...).

`make_summary` and `write_run_outputs` turn results into a run folder's summary.json, reconstructions.png and
codebook_usage.png. The trainer (`unitok.training.tokenizer_trainer`) and the CLI's `unitok eval` both use this module.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Optional

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data._utils.collate import default_collate
from tqdm.auto import tqdm

from ..checkpoint import atomic_write
from .codebook_stats import codebook_stats
from ..tokenizer.config import ModelConfig
from ..data.images import make_grid_image
from .fid import EfficientNetLite0Features, FIDAccumulator, InceptionFeatures
from .image_metrics import psnr, ssim
from .linear_probe import linear_probe, pooled_token_features
from ..tokenizer.model import UniTok
from ..training.machine import eval_mode, model_device
from .zero_shot import retrieval_recall, zero_shot_accuracy, zero_shot_classifier

__all__ = ["evaluate_model", "make_summary", "write_run_outputs", "CODEBOOK_METRICS"]

# The codebook statistics an evaluation reports, under the names `codebook_stats` gives them.
CODEBOOK_METRICS = ("codebook_usage", "dead_codes", "perplexity", "normalized_entropy", "batch_usage",
                    "joint_unique_fraction", "mean_pairwise_mi", "mean_pairwise_mi_shuffled")


def _take(dataset: Dataset, n: int) -> Dataset:
    """The first n items of a map-style dataset (an IterableDataset is returned whole)."""
    if isinstance(dataset, IterableDataset) or len(dataset) <= n:
        return dataset
    return torch.utils.data.Subset(dataset, range(n))


def _unwrap(ds):
    return ds.dataset if isinstance(ds, torch.utils.data.Subset) else ds


def _loader(ds, batch_size, bar=None):
    """The set's batches in order; each one advances the progress bar (a tqdm, or None) by its images."""
    for batch in DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=default_collate):
        yield batch
        if bar is not None:
            bar.update(len(batch["image"]))


def _size(ds) -> Optional[int]:
    return None if isinstance(ds, IterableDataset) else len(ds)


@torch.no_grad()
def evaluate_model(model: UniTok, eval_data: Dict[str, Dataset], batch_size: int = 64, device=None,
                   fid: Optional[str] = None, max_images: Optional[int] = None, progress: bool = False) -> dict:
    """One evaluation pass; see the module docstring for what is measured.

    Args:
        model: a UniTok (its training flag is restored afterwards; see `unitok.training.machine.eval_mode`).
        eval_data: {"recon": ds, "zero_shot": ds, "zero_shot_heldout": ds}, any of them may be missing; items as
            in `unitok.data.datasets`.
        batch_size: images per forward pass.
        device: default the model's device.
        fid: None / "none" (no FID), "proxy", or a path to torch-fidelity's Inception-v3 weights.
        max_images: use only the first N items of each set.
        progress: show a tqdm bar over the images of every pass (the probe's training set counts too).
    Returns:
        a flat dict of JSON-serialisable values (floats, ints, lists per sub-codebook, strings).

    Under DDP every rank evaluates the full sets (simple and exact; evaluation is small next to training).
    """
    device = device or model_device(model)
    n = max_images or 10 ** 9
    recon, test, heldout = eval_data.get("recon"), eval_data.get("zero_shot"), eval_data.get("zero_shot_heldout")
    zero_shot_sets = [(ds, suffix) for ds, suffix in ((test, ""), (heldout, "_heldout"))
                      if ds is not None and hasattr(_unwrap(ds), "zero_shot_tasks")]
    probe_train = eval_data.get("probe_train") if zero_shot_sets and zero_shot_sets[0][1] == "" else None
    passes = ([_take(recon, n)] if recon is not None else []) + [_take(ds, n) for ds, _ in zero_shot_sets]
    if probe_train is not None:
        passes.append(_take(probe_train, 2 * n))   # the probe's test features come from the zero-shot passes
    sizes = [_size(ds) for ds in passes]
    results: dict = {}
    with eval_mode(model), tqdm(total=None if None in sizes else sum(sizes), desc="evaluating", unit="img",
                                disable=not progress, leave=False) as bar:
        if recon is not None:
            results.update(_reconstruction_metrics(model, _take(recon, n), batch_size, device, fid, bar))
        pooled = {}   # suffix -> the pooled tokens of that zero-shot set and its labels, for the linear probe
        for ds, suffix in zero_shot_sets:
            metrics, pooled[suffix] = _zero_shot_metrics(model, _take(ds, n), batch_size, device, suffix, bar)
            results.update(metrics)
        if probe_train is not None:
            results.update(_linear_probe_metrics(model, _take(probe_train, 2 * n), _unwrap(test).zero_shot_tasks(),
                                                 pooled[""], pooled.get("_heldout"), batch_size, device, bar))
    return results


def _fid_extractor(fid: str):
    if fid == "proxy":
        return EfficientNetLite0Features()
    if os.path.isfile(fid):
        return InceptionFeatures(fid)
    raise ValueError(f"fid must be 'none', 'proxy' or a path to Inception-v3 weights, got {fid!r}")


def _reconstruction_metrics(model, ds, batch_size, device, fid, bar=None) -> dict:
    k, K = model.config.num_codebooks, model.config.codebook_size
    psnrs, ssims, codes_all, img_feats, txt_feats, captions = [], [], [], [], [], []
    # every rank evaluates the whole set, so the statistics must not be summed over ranks
    fid_acc = (FIDAccumulator(_fid_extractor(fid), device=device, reduce_over_ranks=False)
               if fid and fid != "none" else None)
    for batch in _loader(ds, batch_size, bar):
        images = batch["image"].to(device)
        q = model.quantize(images)
        tokens = model.code_tokens(q.codes)                                         # (B, N, width)
        recon = model.decoder(tokens).float().clamp(-1, 1)                          # (B, 3, S, S)
        psnrs.append(psnr(recon, images, reduction="none").cpu())
        ssims.append(ssim(recon, images, reduction="none").cpu())
        codes_all.append(q.codes.reshape(-1, k).cpu())
        img_feats.append(model.image_head(tokens).float().cpu())
        txt_feats.append(model.encode_text(list(batch["caption"])).float().cpu())
        captions.extend(batch["caption"])
        if fid_acc is not None:
            fid_acc.update(real=images, fake=recon)
    stats = codebook_stats(torch.cat(codes_all), K)
    out = {"psnr": float(torch.cat(psnrs).mean()), "ssim": float(torch.cat(ssims).mean()),
           "eval_images": int(sum(len(p) for p in psnrs)),
           **{name: stats[name] for name in CODEBOOK_METRICS},
           "codebook_window_tokens": stats["window_tokens"]}
    out.update({f"retrieval_{k_}": v for k_, v in
                retrieval_recall(torch.cat(img_feats), torch.cat(txt_feats), captions=captions).items()})
    if fid_acc is not None:
        f = fid_acc.compute()
        out.update({"fid": f["fid"], "fid_extractor": f["extractor"], "fid_images": f["num_images"]})
    return out


def _zero_shot_metrics(model, ds, batch_size, device, suffix, bar=None):
    """-> (zero-shot accuracies, (pooled tokens (M, width), {label key: (M,)}) for the linear probe): one pass
    gives both, since the CLIP feature and the probe's input start from the same up-projected tokens."""
    tasks = _unwrap(ds).zero_shot_tasks()
    feats, pooled, labels = [], [], {key: [] for _, _, key in tasks.values()}
    for batch in _loader(ds, batch_size, bar):
        images = model.check_images(batch["image"].to(device))
        tokens = model.code_tokens(model.quantize(images).codes)                    # (B, N, width)
        feats.append(model.image_head(tokens).float())             # = encode_image(images)
        pooled.append(model.pool_tokens(tokens).float().cpu())     # = pooled_token_features(model, images)
        for key in labels:
            labels[key].append(batch["labels"][key])
    feats, labels = torch.cat(feats), {key: torch.cat(v) for key, v in labels.items()}
    out = {}
    for name, (classnames, templates, key) in tasks.items():
        classifier = zero_shot_classifier(model, classnames, templates, device=device)
        acc = zero_shot_accuracy(feats, labels[key].to(device), classifier)
        for k_, v in acc.items():
            if k_.startswith("top"):
                out[f"zero_shot_{name}_{k_}{suffix}"] = v
    # The headline figure: the most specific task (the first one a dataset lists).
    headline = next(iter(tasks))
    out[f"zero_shot_top1{suffix}"] = out[f"zero_shot_{headline}_top1{suffix}"]
    out[f"zero_shot_task{suffix}"] = headline
    return out, (torch.cat(pooled), labels)


def _pooled_features(model, ds, batch_size, device, label_keys, bar=None):
    feats, labels = [], {key: [] for key in label_keys}
    for batch in _loader(ds, batch_size, bar):
        feats.append(pooled_token_features(model, batch["image"].to(device)).float().cpu())
        for key in label_keys:
            labels[key].append(batch["labels"][key])
    return torch.cat(feats), {key: torch.cat(v) for key, v in labels.items()}


def _linear_probe_metrics(model, train_ds, tasks, test, heldout, batch_size, device, bar=None) -> dict:
    """Per zero-shot task: a logistic regression on the frozen pooled tokens of train_ds, scored on the test set's
    (`test` = (features, labels) from its zero-shot pass; `heldout` the same for the held-out pairs, or None)."""
    keys = sorted({key for _, _, key in tasks.values()})
    train_x, train_y = _pooled_features(model, train_ds, batch_size, device, keys, bar)
    test_x, test_y = test
    out: dict = {"linear_probe_train_images": len(train_x), "linear_probe_test_images": len(test_x)}
    for name, (_, _, key) in tasks.items():
        out[f"linear_probe_{name}_top1"] = linear_probe(train_x, train_y[key], test_x, test_y[key])["top1"]
    headline = next(iter(tasks))
    out["linear_probe_top1"] = out[f"linear_probe_{headline}_top1"]
    if heldout is not None:  # the headline classes on colour x shape pairs never seen in training
        key = tasks[headline][2]
        held_x, held_y = heldout
        out["linear_probe_top1_heldout"] = linear_probe(train_x, train_y[key], held_x, held_y[key])["top1"]
    return out


# ---------------------------------------------------------------------------------------------------------------
# run outputs
# ---------------------------------------------------------------------------------------------------------------
def make_summary(results: dict, steps: int, times: dict, model_config: ModelConfig, data: dict) -> dict:
    """The run's summary.json: steps, times (`unitok.training.clock.RunClock.summary`), data spec, model size,
    then every evaluation result."""
    summary = {"steps": steps, **times, "data": data,
               "model": {"image_size": model_config.image_size, "tokens": model_config.num_tokens,
                         "num_codebooks": model_config.num_codebooks, "codebook_size": model_config.codebook_size}}
    summary.update(results)
    return summary


def write_run_outputs(out_dir: Path, summary: dict, model: UniTok, eval_data: dict, device) -> None:
    """summary.json, reconstructions.png (originals over reconstructions) and codebook_usage.png."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    atomic_write(out_dir / "summary.json", lambda p: Path(p).write_text(json.dumps(summary, indent=2)))
    recon_ds = eval_data.get("recon")
    if recon_ds is not None:
        batch = default_collate([recon_ds[i] for i in range(min(16, len(recon_ds)))])
        images = batch["image"].to(device)
        with eval_mode(model):
            recon = model.reconstruct(images).clamp(-1, 1)
        grid = make_grid_image(torch.cat([images, recon]).cpu(), nrow=len(images))
        plt.imsave(out_dir / "reconstructions.png", grid)
    usage = summary.get("codebook_usage")
    if usage:
        fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(usage) + 2), 3))
        ax.bar(range(len(usage)), [100 * u for u in usage], color="#4c72b0")
        ax.set_xlabel("sub-codebook")
        ax.set_ylabel("codes used (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"codebook usage over {summary.get('codebook_window_tokens', '?')} eval tokens")
        fig.tight_layout()
        fig.savefig(out_dir / "codebook_usage.png", dpi=100)
        plt.close(fig)
