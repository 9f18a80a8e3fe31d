"""Codes in, the Liquid way: a token's k sub-codes -> the tokenizer's own code vectors -> a projector into a model.

Both the generator (`image_input="codebook"`) and the unified model (`"codebook"`, `"continuous"`) hand their
transformer the tokenizer's geometry of the codes instead of k tables of random rows: codes -> a frozen copy of the
tokenizer's unit-norm codebooks (`code_vectors`) -> a causal copy of its `post_quant_proj` (built by the models
themselves, `unitok.tokenizer.projection.build_projection(..., causal=True)`) -> `image_projector`.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def image_projector(in_dim: int, width: int) -> nn.Sequential:
    """Liquid's projector from the tokenizer's up-projected tokens into a model: LayerNorm -> Linear -> GELU ->
    Linear, (..., in_dim) -> (..., width). Shared by the generator's and the unified model's codebook input."""
    return nn.Sequential(nn.LayerNorm(in_dim, eps=1e-6), nn.Linear(in_dim, width), nn.GELU(), nn.Linear(width, width))


def code_vectors(codebooks: torch.Tensor, codes: torch.Tensor, latent_dim: int) -> torch.Tensor:
    """codebooks (k, K, d) (the tokenizer's `quantizer.codebook_vectors()`), codes (..., k) -> the quantized latent
    (..., latent_dim), as the tokenizer's `quantizer.lookup` gives it, from a copy of its codebooks: the k vectors
    side by side when k * d = latent_dim (MCQ, FSQ, LFQ, SimVQ), their sum when d = latent_dim (residual VQ)."""
    k, d = codebooks.shape[0], codebooks.shape[-1]
    vectors = codebooks[torch.arange(k, device=codes.device), codes.long()]          # (..., k, d)
    return vectors.flatten(-2) if k * d == latent_dim else vectors.sum(-2)


@torch.no_grad()
def embed_codebooks(table: nn.Embedding, books: torch.Tensor, std: float = 0.02, noise: float = 0.005) -> None:
    """Start the sub-code embedding tables in `table` ((n * K, width): n tables of K rows, stacked) from the
    tokenizer's codebooks `books` (n, K, d), unit-norm.

    Row j of sub-codebook i's table becomes c_ij @ R_i + noise, with c_ij the unit-norm code vector (d,) and R_i a
    random (d, width) map with N(0, std^2) entries: the same scale as a random table, but codes that the
    tokenizer placed near each other start near each other, so the model does not have to discover from
    co-occurrence alone which of the K codes mean similar patches. The sum over the k sub-codes of a position
    is then a random linear map of the token's whole quantized latent: still exactly "one embedding per
    sub-codebook, summed". Draws from torch's global random state.
    """
    n, K, d = books.shape
    width = table.weight.shape[1]
    rows = torch.einsum("ikd,idw->ikw", books, torch.randn(n, d, width) * std)
    rows = rows.reshape(-1, width) + torch.randn(n * K, width) * noise
    table.weight.copy_(rows.to(table.weight))
