"""The generator's scores: sample "a {colour} {shape}" prompts and measure the images.

    >>> evaluate_samples(generator)     # prompt accuracy, diversity, proxy FID, code usage of samples
    >>> pair_prompts(heldout=True)      # [("a red star", colour index, shape index), ...] of the 11 held-out pairs

`generator` is any object with the `TokenGenerator` interface (duck-typed, so evaluation never imports the generator
package): `generate(prompts=, num=, seed=, **sampling) -> codes (B, H, W, k)`, `decode(codes) -> images (B, 3, S, S)`,
`.tokenizer` (the frozen UniTok) and `.config.codebook_size`. The unified model (`unitok.mllm`) has it too. Prompt
accuracy is read by `unitok.evaluation.shape_classifier.ShapeClassifier`.
"""
from __future__ import annotations

import math
from typing import List, Optional

import numpy as np
import torch

from ..data.shapes_dataset import ShapesDataset
from .shape_classifier import load_shape_classifier, real_images


def pair_prompts(heldout: bool = False) -> List[tuple]:
    """[(prompt, colour index, shape index)] in the short form "a {colour} {shape}": the 53 seen pairs, or the
    11 held-out pairs."""
    held = set(ShapesDataset.heldout_pairs)
    out = []
    for ci, c in enumerate(ShapesDataset.COLOURS):
        for si, s in enumerate(ShapesDataset.SHAPES):
            if ((c, s) in held) == heldout:
                out.append((f"a {c} {s}", ci, si))
    return out


@torch.no_grad()
def sample_pairs(generator, prompts: List[tuple], num: int, batch_prompts: int = 16,
                 seed: int = 0, **sampling) -> tuple:
    """Generate `num` samples per (prompt, colour, shape) -> (codes (P*num, H, W, k), images, colour, shape)."""
    codes, images = [], []
    for start in range(0, len(prompts), batch_prompts):
        chunk = prompts[start:start + batch_prompts]
        c = generator.generate(prompts=[p for p, _, _ in chunk], num=num, seed=seed + start, **sampling)
        codes.append(c.cpu())
        images.append(generator.decode(c).cpu())
    colour = torch.tensor([ci for _, ci, _ in prompts]).repeat_interleave(num)
    shape = torch.tensor([si for _, _, si in prompts]).repeat_interleave(num)
    return torch.cat(codes), torch.cat(images), colour, shape


def _mean_pairwise_distance(images: torch.Tensor, groups: torch.Tensor) -> float:
    """Mean RMS pixel distance (in [0, 1] units) between two images of the same group, over all such pairs."""
    dists = []
    for gid in groups.unique():
        x = images[groups == gid].flatten(1).float() / 2       # [-1, 1] -> distances in [0, 1] units
        if len(x) < 2:
            continue
        d = torch.cdist(x, x) / math.sqrt(x.shape[1])
        dists.append(d[torch.triu(torch.ones_like(d, dtype=torch.bool), 1)])
    return float(torch.cat(dists).mean()) if dists else float("nan")


@torch.no_grad()
def evaluate_samples(generator, num: int = 8, temperature: float = 1.0, top_k: int = 0,
                     top_p: float = 1.0, cfg_scale: float = 3.0, seed: int = 0, classifier=None,
                     fid: bool = True, heldout: bool = True, prompts: Optional[List[tuple]] = None,
                     rerank: int = 1) -> dict:
    """Sample `num` images per "a {colour} {shape}" prompt and measure them.

    prompt_colour_acc / prompt_shape_acc / prompt_both_acc: how often the classifier reads the prompted colour /
    shape / both (seen pairs; `_heldout` for the 11 held-out pairs); distinct_fraction: share of distinct code
    grids; diversity: mean RMS pixel distance between two samples of the same prompt, next to the same for real
    images of the same pair (diversity_real); fid_proxy: EfficientNet-Lite0 FID of seen-pair samples against real
    single-object test images (a proxy, not comparable to published FIDs); code_usage / code_perplexity of samples
    vs real test codes. rerank > 1: each sample is the best of that many draws by the tokenizer's image-text match
    (`TokenGenerator.generate`), a different sampler from the plain one; the sampling record says which.
    """
    from .codebook_stats import codebook_stats

    classifier = classifier or load_shape_classifier(generator.tokenizer.config.image_size)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale, rerank=rerank)
    out = {"sampling": dict(sampling, num_per_prompt=num, seed=seed)}
    sets = [("", prompts or pair_prompts(False))] + ([("_heldout", pair_prompts(True))] if heldout else [])
    seen_images = seen_codes = None
    for suffix, plist in sets:
        codes, images, colour, shape = sample_pairs(generator, plist, num, seed=seed, **sampling)
        pred = classifier.predict(images)
        ok_c, ok_s = pred["colour"] == colour, pred["shape"] == shape
        out[f"prompt_colour_acc{suffix}"] = float(ok_c.float().mean())
        out[f"prompt_shape_acc{suffix}"] = float(ok_s.float().mean())
        out[f"prompt_both_acc{suffix}"] = float((ok_c & ok_s).float().mean())
        out[f"samples{suffix}"] = len(images)
        if not suffix:
            seen_images, seen_codes = images, codes
            groups = colour * 8 + shape
            out["distinct_fraction"] = len({c.numpy().tobytes() for c in codes}) / len(codes)
            out["diversity"] = _mean_pairwise_distance(images, groups)
    # real references: single-object test images of the same pairs
    tok = generator.tokenizer
    n_real = len(seen_images)
    real, labels = real_images("test", n_real, tok.config.image_size, seed=seed + 7)
    out["diversity_real"] = _mean_pairwise_distance(real, labels["colour"] * 8 + labels["shape"])
    real_codes = torch.cat([tok.encode(real[i:i + 256].to(tok.logit_scale.device)).cpu()
                            for i in range(0, n_real, 256)])
    K = generator.config.codebook_size
    gs, rs = codebook_stats(seen_codes.reshape(-1, seen_codes.shape[-1]), K), \
        codebook_stats(real_codes.reshape(-1, real_codes.shape[-1]), K)
    out["code_usage"] = float(np.mean(gs["codebook_usage"]))
    out["code_usage_real"] = float(np.mean(rs["codebook_usage"]))
    out["code_perplexity"] = float(np.mean(gs["perplexity"]))
    out["code_perplexity_real"] = float(np.mean(rs["perplexity"]))
    if fid:
        from .fid import EfficientNetLite0Features, fid as fid_fn

        res = fid_fn(real, seen_images, EfficientNetLite0Features(), batch_size=64)
        out["fid_proxy"] = res["fid"] if isinstance(res, dict) else float(res)
        out["fid_proxy_images"] = n_real
    return out
