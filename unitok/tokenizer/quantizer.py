"""Multi-codebook quantization (MCQ), UniTok's key idea.

A token's latent vector z (dim) is split into k chunks of dim // k. Chunk i is L2-normalised and replaced by the
nearest (cosine) code of *its own* codebook i, also L2-normalised. k small codebooks of K codes give K**k distinct
tokens without the instability of training one huge codebook.

    >>> q = MultiCodebookQuantizer(dim=64, num_codebooks=8, codebook_size=4096)
    >>> out = q(torch.randn(2, 256, 64))
    >>> out.z_q.shape, out.codes.shape, out.counts.shape
    (torch.Size([2, 256, 64]), torch.Size([2, 256, 8]), torch.Size([8, 4096]))
    >>> torch.equal(q.lookup(out.codes), out.z_q)   # decoding codes gives the same vectors
    True

Per chunk (docs/method.md, "Multi-codebook quantization"): z <- z/|z|, c_j <- c_j/|c_j|, code = argmax_j <z, c_j>, output z + sg(c - z) (straight
through), loss = beta * mse(sg(c), z) + mse(c, sg(z)), averaged over the k chunks. Always fp32, even under autocast.

Why it is fast: the nearest-code search is a (tokens x K) similarity with an inner dimension of only dim // k, so
it is limited by memory traffic, not arithmetic. We search all k codebooks at once (one batched matmul) over small
blocks of tokens whose similarity block fits in cache, and keep only the argmax. Extra memory is therefore bounded
by `search_block_elements` floats however many tokens come in, and nothing of the search is kept for backward.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .codes import check_codes, count_codes


@dataclass
class QuantizerOutput:
    z_q: torch.Tensor                  # (..., dim)  unit-norm chunks, straight-through gradient to z
    codes: torch.Tensor                # (..., k)    int64, codes[..., i] in [0, K)
    loss: torch.Tensor                 # ()          beta * commitment + codebook loss (+ entropy loss if enabled)
    counts: torch.Tensor               # (k, K)      int64 number of tokens that chose each code in this call
    entropy_loss: Optional[torch.Tensor] = None  # () only when entropy_weight > 0


def fp32_region(device: torch.device):
    """Disable autocast so the search and the loss run in fp32 (bf16 would flip near-tie argmaxes)."""
    if device.type in ("cuda", "cpu", "xpu", "mps"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


class MultiCodebookQuantizer(nn.Module):
    """k independent cosine codebooks over the k chunks of a vector; `num_codebooks=1` is a plain cosine VQ.

    Args:
        dim: size of the vectors to quantize (the latent), divisible by `num_codebooks`.
        num_codebooks: k, the number of chunks / sub-codebooks.
        codebook_size: K, codes per sub-codebook.
        beta: commitment weight (0.25 in the reference).
        entropy_weight: weight of the optional entropy loss (0 = off, as the reference trains).
        entropy_temperature: softmax temperature of that loss (0.01 in the reference).
        dead_code_restart_every: 0 = off. Otherwise, every N training calls, codes unused since the last restart
            are re-initialised to chunks of the current batch (an experiment knob; the reference has none).
        search_block_elements: size of the similarity block per search step, in floats (bounds extra memory).
    """

    def __init__(self, dim: int, num_codebooks: int, codebook_size: int, beta: float = 0.25,
                 entropy_weight: float = 0.0, entropy_temperature: float = 0.01,
                 dead_code_restart_every: int = 0, search_block_elements: int = 1 << 18):
        super().__init__()
        if dim % num_codebooks:
            raise ValueError(f"dim ({dim}) must be divisible by num_codebooks ({num_codebooks})")
        if codebook_size < 1:
            raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
        self.dim, self.num_codebooks, self.codebook_size = dim, num_codebooks, codebook_size
        self.code_dim = dim // num_codebooks
        self.beta = beta
        self.entropy_weight, self.entropy_temperature = entropy_weight, entropy_temperature
        self.dead_code_restart_every = dead_code_restart_every
        self.search_block_elements = search_block_elements
        # The reference's init: uniform(+-(d^-0.5)/36). Directions are what matter (codes are normalised).
        bound = self.code_dim ** -0.5 / 36
        self.codebooks = nn.Parameter(torch.empty(num_codebooks, codebook_size, self.code_dim).uniform_(-bound, bound))
        self.register_buffer("code_offsets", torch.arange(num_codebooks) * codebook_size, persistent=False)
        if dead_code_restart_every:
            self.register_buffer("usage_since_restart", torch.zeros(num_codebooks, codebook_size, dtype=torch.long))
            self.register_buffer("calls_since_restart", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_codebooks={self.num_codebooks}, codebook_size={self.codebook_size}, "
                f"code_dim={self.code_dim}, beta={self.beta}")

    # ------------------------------------------------------------------ public API
    def normalized_codebooks(self) -> torch.Tensor:
        """(k, K, d) unit-norm code vectors, fp32 (differentiable w.r.t. `codebooks`)."""
        return F.normalize(self.codebooks.float(), dim=-1)

    def codebook_vectors(self) -> torch.Tensor:
        """(k, K, d) the vector each sub-code stands for (a token's vector is their concatenation), as every
        quantizer of `unitok.tokenizer.quantizers` offers it: here the unit-norm codebooks."""
        return self.normalized_codebooks()

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """z: (..., dim) -> QuantizerOutput with z_q (..., dim), codes (..., k), loss (), counts (k, K)."""
        if z.shape[-1] != self.dim:
            raise ValueError(f"expected input of shape (..., {self.dim}), got {tuple(z.shape)}")
        lead = z.shape[:-1]
        with fp32_region(z.device):
            chunks = F.normalize(z.float().reshape(-1, self.num_codebooks, self.code_dim), dim=-1)  # (N, k, d)
            codebooks = self.normalized_codebooks()
            codes = self.nearest_codes(chunks, codebooks)                                       # (N, k)
            z_q = self._gather(codebooks, codes)                                                # (N, k, d)
            # beta * |sg(c) - z|^2 pulls the encoder to its codes; |c - sg(z)|^2 pulls codes to the encoder.
            loss = self.beta * F.mse_loss(chunks, z_q.detach()) + F.mse_loss(z_q, chunks.detach())
            entropy_loss = None
            if self.entropy_weight > 0:
                entropy_loss = self._entropy_loss(chunks, codebooks)
                loss = loss + self.entropy_weight * entropy_loss
            # Straight-through: the value is exactly the code (so lookup(codes) == z_q bit for bit), the gradient
            # is the identity to the normalised chunk.
            z_q = z_q.detach() + (chunks - chunks.detach())
            counts = self.count_codes(codes)
            if self.training and self.dead_code_restart_every:
                self._maybe_restart_dead_codes(chunks.detach(), counts)
        return QuantizerOutput(z_q=z_q.reshape(*lead, self.dim), codes=codes.reshape(*lead, self.num_codebooks),
                               loss=loss, counts=counts, entropy_loss=entropy_loss)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (..., k) int -> z_q (..., dim): the same vectors `forward` outputs for those codes."""
        self.check_codes(codes)
        with fp32_region(codes.device):
            z_q = self._gather(self.normalized_codebooks(), codes.reshape(-1, self.num_codebooks).long())
        return z_q.reshape(*codes.shape[:-1], self.dim)

    def check_codes(self, codes: torch.Tensor) -> None:
        """ValueError unless codes is an integer tensor (..., k) with values in [0, K) (see `unitok.tokenizer.codes`)."""
        check_codes(codes, self.codebook_size, self.num_codebooks, allow_empty=True)

    @torch.no_grad()
    def nearest_codes(self, chunks: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
        """chunks (N, k, d) unit-norm, codebooks (k, K, d) unit-norm -> (N, k) int64 argmax of cosine similarity.

        All k sub-codebooks are searched by one batched matmul per block of tokens; the block is sized so the
        (k, block, K) similarity stays around `search_block_elements` floats (cache-sized, memory-bounded).
        """
        n, k = chunks.shape[0], self.num_codebooks
        by_codebook = chunks.detach().transpose(0, 1).contiguous()     # (k, N, d): contiguous per-codebook rows
        codebooks_t = codebooks.detach().transpose(1, 2).contiguous()  # (k, d, K)
        codes = torch.empty(k, n, dtype=torch.long, device=chunks.device)
        block = max(1, self.search_block_elements // (k * self.codebook_size))
        for start in range(0, n, block):
            sim = torch.bmm(by_codebook[:, start:start + block], codebooks_t)  # (k, b, K)
            codes[:, start:start + block] = sim.argmax(dim=-1)
        return codes.t()

    def count_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (N, k) -> (k, K) int64 counts, without a host sync (see `unitok.tokenizer.codes.count_codes`)."""
        return count_codes(codes, self.codebook_size)

    # ------------------------------------------------------------------ internals
    def _gather(self, codebooks: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """codebooks (k, K, d), codes (N, k) -> (N, k, d); differentiable w.r.t. codebooks."""
        flat = codes + self.code_offsets.to(codes.device)                       # index into the (k*K, d) table
        return F.embedding(flat, codebooks.reshape(-1, self.code_dim))

    def _entropy_loss(self, chunks: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
        """Mean per-token entropy minus entropy of the mean assignment (encourages confident, diverse codes)."""
        logits = torch.einsum("nkd,kcd->knc", chunks, codebooks) / self.entropy_temperature  # (k, N, K)
        probs, log_probs = logits.softmax(-1), logits.log_softmax(-1)
        per_token = -(probs * log_probs).sum(-1).mean()
        mean_probs = probs.mean(1)                                                           # (k, K)
        of_mean = -(mean_probs * torch.log(mean_probs.clamp_min(1e-12))).sum(-1).mean()
        return per_token - of_mean

    @torch.no_grad()
    def _maybe_restart_dead_codes(self, chunks: torch.Tensor, counts: torch.Tensor) -> None:
        self.usage_since_restart += counts
        self.calls_since_restart += 1
        if int(self.calls_since_restart) < self.dead_code_restart_every:
            return
        usage = self.usage_since_restart.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(usage)  # every rank decides on the same dead set
        generator = torch.Generator(device="cpu").manual_seed(int(usage.sum()) % (2 ** 31))
        for i in range(self.num_codebooks):
            dead = (usage[i] == 0).nonzero().squeeze(1)
            if len(dead):
                pick = torch.randint(0, chunks.shape[0], (len(dead),), generator=generator).to(chunks.device)
                self.codebooks.data[i, dead] = chunks[pick, i].to(self.codebooks.dtype) * self.codebooks.data[i].norm(
                    dim=-1).mean()
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(self.codebooks.data, src=0)  # replacements came from rank-local batches
        self.usage_since_restart.zero_()
        self.calls_since_restart.zero_()
