"""Sampling codes (and text) from logits: guidance, filtering, seeded draws, and best-of-n re-ranking.

Shared by the generator and the unified model, so both draw the same way:

    guided_logits    classifier-free guidance, u + s (c - u)
    filter_logits    temperature, top-k and nucleus (top-p) filtering -> log-probabilities
    draw             an inverse-CDF draw from a uniform number: deterministic for a seed, so a KV-cached and a
                     recomputing decode (whose logits differ by float noise) pick the same codes
    sample_position  the k sub-codes of one grid position, drawn one after another from a head's logits
    check_sampling / check_rerank   the settings' checks, with messages naming what was expected
    keep_best_aligned               best of n samples by the tokenizer's own image-text alignment

The uniform numbers come from the caller, taken up front from one seeded generator (`seeded_uniforms`), never from
torch's global random state.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch


@dataclass
class PositionStep:
    """What one sampling step drew: position t (row-major), codes (B, k), the probability of each drawn sub-code
    (B, k) and the entropy of each sub-code's distribution in bits (B, k), after temperature/top-k/top-p/CFG."""
    position: int
    codes: torch.Tensor
    probs: torch.Tensor
    entropy: torch.Tensor


def seeded_uniforms(shape, seed: int, device) -> torch.Tensor:
    """The uniform numbers (shape) behind every draw of one sampling call, from a generator seeded with `seed` on
    the CPU (so a seed draws the same on every device), then moved to `device`."""
    return torch.rand(*shape, generator=torch.Generator().manual_seed(int(seed))).to(device)


def check_sampling(temperature, top_k, top_p, cfg_scale) -> None:
    """ValueError naming what was expected unless temperature > 0, top_k an int >= 0, top_p in (0, 1] and
    cfg_scale >= 0."""
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if not (isinstance(top_k, int) and 0 <= top_k):
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p!r}")
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale must be >= 0 (1 = no guidance), got {cfg_scale!r}")


def guided_logits(cond_logits: torch.Tensor, uncond_logits: Optional[torch.Tensor], cfg_scale: float):
    """Classifier-free guidance: u + s (c - u); exactly the conditional logits at s = 1 (no mixing done)."""
    if uncond_logits is None or cfg_scale == 1.0:
        return cond_logits
    return uncond_logits + cfg_scale * (cond_logits - uncond_logits)


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0):
    """(M, K) logits -> log-probabilities after temperature, top-k and nucleus (top-p) filtering."""
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum - sorted_logits.softmax(-1) >= top_p     # keep the smallest set reaching top_p
        remove[:, 0] = False
        logits = logits.masked_fill(remove.scatter(1, order, remove), -math.inf)
    return logits.log_softmax(-1)


def draw(logp: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: logp (M, K), u (M,) in [0, 1) -> (M,) indices. Robust to tiny float differences."""
    cdf = logp.exp().cumsum(-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1).contiguous()).squeeze(-1)
    return idx.clamp_(max=logp.shape[-1] - 1)


def sample_position(next_logits: Callable[[int, torch.Tensor], torch.Tensor], u: torch.Tensor,
                    guided: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    cfg_scale: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw the k sub-codes of one position, one after another.

    next_logits(i, drawn): the logits (B or 2B, K) of sub-code i given `drawn` (B, i), the sub-codes drawn so far;
        with `guided`, rows B..2B-1 are the unconditional branch of classifier-free guidance (see
        `unitok.transformer.depth_head.depth_head_steps` for the depth head's).
    u (B, k): each draw's uniform number. Sub-code i is drawn from `filter_logits(guided_logits(...))`.
    Returns codes (B, k) int64, the probability of each drawn sub-code (B, k) and each sub-code distribution's
    entropy in bits (B, k).
    """
    B, k = u.shape
    codes = torch.zeros(B, k, dtype=torch.long, device=u.device)
    probs = torch.zeros(B, k, device=u.device)
    ent = torch.zeros(B, k, device=u.device)
    for i in range(k):
        logits = next_logits(i, codes[:, :i])
        c, un = (logits[:B], logits[B:]) if guided else (logits, None)
        logp = filter_logits(guided_logits(c, un, cfg_scale), temperature, top_k, top_p)
        idx = draw(logp, u[:, i])
        p = logp.exp()
        codes[:, i] = idx
        probs[:, i] = p.gather(1, idx[:, None])[:, 0]
        ent[:, i] = -(p * logp.clamp(min=-1e30)).nan_to_num(0.0).sum(-1) / math.log(2)
    return codes, probs, ent


# ---------------------------------------------------------------------------------------------------------------
# best of n: the tokenizer reads what was drawn
# ---------------------------------------------------------------------------------------------------------------
def check_rerank(rerank) -> int:
    """rerank (candidates per sample, 1 = off) -> int, or a ValueError naming what was expected."""
    if not isinstance(rerank, int) or isinstance(rerank, bool) or rerank < 1:
        raise ValueError(f"rerank must be an int >= 1 (candidates per sample; 1 = off), got {rerank!r}")
    return rerank


@torch.no_grad()
def keep_best_aligned(tokenizer, candidates: torch.Tensor, prompts: Sequence[str], num: int) -> torch.Tensor:
    """Best-of-n by the tokenizer's own image-text alignment (CLIP-style re-ranking of samples).

    candidates (P * num * n, H, W, k): n draws for each of the `num` samples of each of the P prompts, item-major
    (prompt, then sample, then draw) -> (P * num, H, W, k): for each sample, the draw whose tokenizer image feature
    (`UniTok.code_features`, read straight from the codes) has the highest cosine with its prompt's text feature.
    The tokenizer is the model's own understanding side, not the classifier that scores the samples.
    """
    P = len(prompts)
    n = candidates.shape[0] // max(P * num, 1)
    if n < 1 or candidates.shape[0] != P * num * n:
        raise ValueError(f"expected P * num * n candidates for P = {P} prompts and num = {num}, got "
                         f"{candidates.shape[0]}")
    device = tokenizer.logit_scale.device
    image = torch.cat([tokenizer.code_features(c.to(device)) for c in candidates.split(256)])   # (P*num*n, E)
    text = tokenizer.encode_text(list(prompts))                                                   # (P, E)
    score = (image.view(P, num * n, -1) * text[:, None]).sum(-1).view(P * num, n)
    best = score.argmax(1).to(candidates.device)
    return candidates.view(P * num, n, *candidates.shape[1:])[torch.arange(P * num, device=candidates.device), best]
