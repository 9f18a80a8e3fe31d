"""Codes out: the classifier that turns head states into logits over each sub-codebook's K codes.

Shared by the generator's output head (depth or parallel) and the unified model's `DepthHead`. `CODE_LOGITS` names
its two kinds, as the configs spell them: "linear" (a free classifier, zero-initialised: the reference's) and
"codebook" (the same plus a term that knows the tokenizer's code vectors; see `CodeClassifier`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

CODE_LOGITS = ("codebook", "linear")


class CodeClassifier(nn.Linear):
    """Logits over the K codes of each sub-codebook, from head states.

    A plain `nn.Linear(in_dim, outputs * K)` (outputs = 1: one classifier shared by the k sub-codes, the depth head;
    outputs = k: k independent heads, the parallel baseline), plus, with `geometry=True`, a term that knows the
    tokenizer's codebooks: logit_jc += <x W_j, e_jc>, with W_j (in_dim, d) learned per sub-codebook j and e_jc its
    unit-norm code vectors (a frozen copy, filled by `set_codebooks`). The tokenizer quantizes each chunk by cosine
    to the nearest code, so a flat patch of a slightly different colour lands on a *neighbouring* code; with the
    geometric term one query direction covers a whole neighbourhood (a von Mises-Fisher-like bump whose sharpness is
    the query's norm), where the free classifier must raise each of the K logits on its own. Both parts start at
    zero, so an untrained head still gives exactly log2 K bits per sub-code.

    forward(x (M, k, in_dim)) -> (M, k, K) for the shared head (x's j-th row predicts sub-code j), or
    forward(x (M, in_dim), index=j) -> (M, K); the parallel head takes x (M, in_dim) -> (M, k, K).
    """

    def __init__(self, in_dim: int, num_codebooks: int, codebook_size: int, code_dim: int, shared: bool,
                 geometry: bool):
        super().__init__(in_dim, codebook_size * (1 if shared else num_codebooks))
        self.k, self.K, self.shared = num_codebooks, codebook_size, shared
        self.geometry = geometry
        if geometry:
            self.query = nn.Parameter(torch.zeros(num_codebooks, in_dim, code_dim))
            self.register_buffer("code_vectors", torch.zeros(num_codebooks, codebook_size, code_dim))

    def reset_parameters(self) -> None:   # zero-initialised (the reference's classifier): uniform logits at start
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)

    @torch.no_grad()
    def set_codebooks(self, codebooks: torch.Tensor) -> None:
        """codebooks (k, K, d): the tokenizer's unit-norm code vectors."""
        if self.geometry:
            self.code_vectors.copy_(codebooks.to(self.code_vectors))

    def forward(self, x: torch.Tensor, index: Optional[int] = None) -> torch.Tensor:
        logits = super().forward(x)
        if not self.shared:
            logits = logits.view(*x.shape[:-1], self.k, self.K)
        if not self.geometry:
            return logits
        if index is not None:              # one sub-codebook: x (M, in_dim)
            q = x @ self.query[index].to(x.dtype)
            return logits + q @ self.code_vectors[index].to(x.dtype).T
        if self.shared:                    # x (M, k, in_dim): row j against sub-codebook j
            q = torch.einsum("mji,jid->mjd", x, self.query.to(x.dtype))
        else:                              # x (M, in_dim): every sub-codebook from the same state
            q = torch.einsum("mi,jid->mjd", x, self.query.to(x.dtype))
        return logits + torch.einsum("mjd,jcd->mjc", q, self.code_vectors.to(x.dtype))
