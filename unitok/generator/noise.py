"""Input noise and scheduled sampling for the generator's training: what the spatial transformer reads in place
of the true codes (the targets stay the true codes), so that it learns not to trust its own imperfect draws.

    >>> neighbours = code_neighbours(tokenizer.quantizer.codebook_vectors(), 8)   # (k, K, 8)
    >>> seen = corrupt_codes(codes, neighbours, 0.1)        # GeneratorTrainConfig.code_noise
    >>> seen = mix_own_draws(logits, codes, self_feed_share(step, train_config))   # GeneratorTrainConfig.self_feed

Every draw comes from the global torch RNG on the CPU, whose state a checkpoint carries: a resumed run corrupts
exactly as the uninterrupted one, on any device.
"""
from __future__ import annotations

import math

import torch


def code_neighbours(codebooks: torch.Tensor, n: int) -> torch.Tensor:
    """codebooks (k, K, d) unit-norm code vectors -> (k, K, n) indices of each code's n nearest other codes (by
    cosine) in its own sub-codebook."""
    if not 1 <= n < codebooks.shape[1]:
        raise ValueError(f"code_noise_neighbours must lie in [1, {codebooks.shape[1] - 1}], got {n}")
    sim = codebooks.float() @ codebooks.float().transpose(1, 2)          # (k, K, K)
    sim.diagonal(dim1=1, dim2=2).fill_(-math.inf)                          # never "replace" a code by itself
    return sim.topk(n, dim=-1).indices


def corrupt_codes(codes: torch.Tensor, neighbours: torch.Tensor, p: float) -> torch.Tensor:
    """Replace each sub-code of codes (B, H, W, k) with probability p by a random one of its nearest codes
    (neighbours (k, K, n) from `code_neighbours`) -> a new tensor. Draws from the global torch RNG, whose state a
    checkpoint carries, so a resumed run corrupts exactly as the uninterrupted one."""
    k, n = neighbours.shape[0], neighbours.shape[-1]
    device = codes.device
    hit = (torch.rand(codes.shape) < p).to(device)          # drawn on the CPU: the same numbers on any device
    pick = torch.randint(n, codes.shape).to(device)
    book = torch.arange(k, device=device).expand(codes.shape)
    return torch.where(hit, neighbours.to(device)[book, codes, pick], codes)


def self_feed_share(step: int, config) -> float:
    """The share of positions fed the model's own draws at this step: a linear ramp from 0 to
    config.self_feed over the first config.self_feed_ramp of the steps (the early model's draws are noise).
    `config`: a `unitok.generator.trainer.GeneratorTrainConfig`."""
    ramp = config.self_feed_ramp * config.steps
    return config.self_feed * (1.0 if ramp <= 0 else min(1.0, step / ramp))


@torch.no_grad()
def mix_own_draws(logits: torch.Tensor, codes: torch.Tensor, p: float) -> torch.Tensor:
    """Scheduled sampling. logits (B, N, k, K) of a teacher-forced pass, codes (B, H, W, k) -> a copy of codes in
    which each position, with probability p, holds all k sub-codes drawn (temperature 1) from those logits. Draws
    from the global torch RNG on the CPU (the checkpoint carries it: exact resume, the same on any device)."""
    B, N, k, K = logits.shape
    hit = (torch.rand(B, N, 1) < p).to(codes.device)
    u = torch.rand(B, N, k, 1).to(logits.device)
    cdf = logits.float().softmax(-1).cumsum(-1)
    drawn = torch.searchsorted(cdf, (u * cdf[..., -1:]).contiguous()).squeeze(-1).clamp_(max=K - 1)
    flat = codes.reshape(B, N, k)
    return torch.where(hit, drawn.to(codes.device), flat).view(codes.shape)
