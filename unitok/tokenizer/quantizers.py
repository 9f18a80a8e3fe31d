"""The other quantizers a researcher would pick instead of MCQ, in the toolkit's token format.

    >>> q = build_quantizer(get_preset("tiny").model)        # the config's `quantizer`: mcq, rvq, fsq, lfq, simvq
    >>> out = q(torch.randn(2, 64, 32))
    >>> out.z_q.shape, out.codes.shape, out.counts.shape     # (2, 64, 32), (2, 64, 8), (8, 256): as MCQ's
    >>> torch.allclose(q.lookup(out.codes), out.z_q)         # codes decode to the same vectors
    True

Every contender speaks MCQ's language (`unitok.tokenizer.quantizer`): `forward(z)` -> `QuantizerOutput` with k
integer sub-codes per token and per-sub-code counts, `lookup(codes)`, `check_codes`, and `codebook_vectors()`, the
(k, K, d) vector each sub-code stands for. So the codebook statistics, the widgets, the generator and the unified
model work on any of them unchanged. At equal bits per token, k x log2 K (the tiny preset: 8 x 8 = 64 bits):

| quantizer | what a token's k sub-codes are | d per sub-code | library class |
|---|---|---|---|
| `mcq`   | k chunks of the latent, each nearest (cosine) in its own learned codebook of K | latent / k | (ours) |
| `rvq`   | k residual levels over the whole latent, each a learned codebook of K; the token is their **sum** | latent | `ResidualVQ` |
| `fsq`   | k chunks, each rounded per dimension to fixed levels whose product is K (e.g. 4 x 4 x 4 x 4) | latent / k | `FSQ` |
| `lfq`   | k groups of log2 K latent dimensions, each dimension's sign one bit (needs latent = k log2 K) | log2 K | `LFQ` |
| `simvq` | k chunks, each nearest (L2) in a frozen random codebook times a learned linear map | latent / k | `SimVQ` |

The library classes (vector-quantize-pytorch) are used as they come, with their own defaults and losses; only the
boundary is adapted (shapes, fp32 under autocast, our counts). What each needs or does differently from its paper
at this scale: docs/quantizers.md.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn as nn

from .codes import check_codes, count_codes
from .quantizer import MultiCodebookQuantizer, QuantizerOutput, fp32_region

__all__ = ["QUANTIZERS", "SUMMED_QUANTIZERS", "build_quantizer", "fsq_levels", "quantizer_problems", "sub_code_dim",
           "bits_per_token", "ResidualQuantizer", "ScalarQuantizer", "LookupFreeQuantizer", "SimQuantizer"]

QUANTIZERS = ("mcq", "rvq", "fsq", "lfq", "simvq")
SUMMED_QUANTIZERS = ("rvq",)   # a token is the sum of its sub-codes' vectors; for the others, their concatenation


def sub_code_dim(quantizer: str, latent_dim: int, num_codebooks: int) -> int:
    """d of `codebook_vectors()`: the whole latent for a residual quantizer, its k-th part otherwise."""
    return latent_dim if quantizer in SUMMED_QUANTIZERS else latent_dim // num_codebooks


def bits_per_token(num_codebooks: int, codebook_size: int) -> float:
    """k x log2 K: what a token can carry, the quantity the quantizer study holds equal."""
    return num_codebooks * math.log2(codebook_size)


def fsq_levels(cfg) -> Tuple[int, ...]:
    """FSQ's levels per dimension of a sub-code: the config's `fsq_levels`, or latent/k levels >= 2 whose product is
    K, as even as possible (256 codes over 4 dimensions: 4 x 4 x 4 x 4; 64 over 4: 4 x 4 x 2 x 2). ValueError when K
    has too few prime factors to give every dimension at least 2 levels."""
    d = cfg.latent_dim // cfg.num_codebooks
    if cfg.fsq_levels:
        return tuple(cfg.fsq_levels)
    factors, rest, p = [], cfg.codebook_size, 2
    while rest > 1:                       # prime factors of K, largest first
        while rest % p == 0:
            factors.append(p)
            rest //= p
        p += 1
    levels = [1] * d
    for f in sorted(factors, reverse=True):
        levels[levels.index(min(levels))] *= f
    if min(levels) < 2:
        raise ValueError(f"fsq: codebook_size {cfg.codebook_size} cannot be spread over latent_dim / num_codebooks = "
                         f"{d} dimensions with at least 2 levels each; set fsq_levels ({d} levels whose product is "
                         f"{cfg.codebook_size}) or another codebook_size")
    return tuple(sorted(levels, reverse=True))


def quantizer_problems(cfg) -> list:
    """What is wrong with the quantizer part of a ModelConfig, one phrase per problem (empty when nothing)."""
    if cfg.quantizer not in QUANTIZERS:
        return [f"quantizer must be one of {', '.join(QUANTIZERS)}, got {cfg.quantizer!r}"]
    problems, k, K = [], cfg.num_codebooks, cfg.codebook_size
    if cfg.quantizer != "mcq":
        for name in ("entropy_weight", "dead_code_restart_every"):
            if getattr(cfg, name):
                problems.append(f"{name} applies to quantizer='mcq' only (got {cfg.quantizer!r})")
        if cfg.projection == "attn_reference":
            problems.append("the released layout (projection='attn_reference') has an mcq quantizer")
    if cfg.fsq_levels and cfg.quantizer != "fsq":
        problems.append(f"fsq_levels is for quantizer='fsq' (got {cfg.quantizer!r})")
    if cfg.quantizer == "fsq":
        levels = tuple(cfg.fsq_levels)
        if levels and (len(levels) != cfg.latent_dim // k or math.prod(levels) != K or min(levels) < 2):
            codes = math.prod(levels)
            problems.append(f"fsq_levels {levels} give {codes} codes ({math.log2(max(1, codes)):.2f} bits) over "
                            f"{len(levels)} dimensions; expected {cfg.latent_dim // k} levels >= 2 whose product is "
                            f"codebook_size {K} ({math.log2(K):.2f} bits)")
        elif not levels:
            try:
                fsq_levels(cfg)
            except ValueError as e:
                problems.append(str(e))
    if cfg.quantizer == "lfq":
        bits = math.log2(K)
        if not bits.is_integer():
            problems.append(f"lfq needs codebook_size to be a power of 2 (one bit per dimension), got {K}")
        elif cfg.latent_dim != k * int(bits):
            problems.append(f"lfq needs latent_dim = num_codebooks x log2(codebook_size) = {k * int(bits)} (one bit "
                            f"per latent dimension), got {cfg.latent_dim}")
    return problems


def build_quantizer(cfg) -> nn.Module:
    """The quantizer a ModelConfig asks for (`cfg.quantizer`), at its k (num_codebooks) and K (codebook_size)."""
    problems = quantizer_problems(cfg)
    if problems:
        raise ValueError("invalid quantizer settings: " + "; ".join(problems))
    if cfg.quantizer == "mcq":
        return MultiCodebookQuantizer(cfg.latent_dim, cfg.num_codebooks, cfg.codebook_size, beta=cfg.beta,
                                      entropy_weight=cfg.entropy_weight, entropy_temperature=cfg.entropy_temperature,
                                      dead_code_restart_every=cfg.dead_code_restart_every)
    kinds = {"rvq": ResidualQuantizer, "fsq": ScalarQuantizer, "lfq": LookupFreeQuantizer, "simvq": SimQuantizer}
    return kinds[cfg.quantizer](cfg)


class LibraryQuantizer(nn.Module):
    """The boundary shared by the library-backed quantizers: shapes in and out, fp32, codes checked and counted.

    A subclass sets `inner` and implements `_quantize(z (1, N, dim) fp32) -> (z_q (1, N, dim), codes (1, N, k),
    loss ())` and `_lookup(codes (1, N, k)) -> (1, N, dim)`, calling the library for both.
    """
    kind = ""

    def __init__(self, cfg):
        super().__init__()
        self.dim, self.num_codebooks, self.codebook_size = cfg.latent_dim, cfg.num_codebooks, cfg.codebook_size
        self.code_dim = sub_code_dim(self.kind, cfg.latent_dim, cfg.num_codebooks)

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, dim={self.dim}, num_codebooks={self.num_codebooks}, "
                f"codebook_size={self.codebook_size}")

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """z: (..., dim) -> QuantizerOutput with z_q (..., dim), codes (..., k) int64, loss (), counts (k, K)."""
        if z.shape[-1] != self.dim:
            raise ValueError(f"expected input of shape (..., {self.dim}), got {tuple(z.shape)}")
        lead = z.shape[:-1]
        with fp32_region(z.device):
            z_q, codes, loss = self._quantize(z.float().reshape(1, -1, self.dim))
            codes = codes.long().reshape(-1, self.num_codebooks)
        return QuantizerOutput(z_q=z_q.reshape(*lead, self.dim), codes=codes.reshape(*lead, self.num_codebooks),
                               loss=loss.reshape(()), counts=count_codes(codes, self.codebook_size))

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (..., k) int -> z_q (..., dim): the vectors `forward` outputs for those codes."""
        self.check_codes(codes)
        if codes.numel() == 0:
            return torch.zeros(*codes.shape[:-1], self.dim, device=codes.device)
        with fp32_region(codes.device):
            z_q = self._lookup(codes.reshape(1, -1, self.num_codebooks).long())
        return z_q.float().reshape(*codes.shape[:-1], self.dim)

    def check_codes(self, codes: torch.Tensor) -> None:
        check_codes(codes, self.codebook_size, self.num_codebooks, allow_empty=True)

    def count_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return count_codes(codes, self.codebook_size)


class ResidualQuantizer(LibraryQuantizer):
    """Residual VQ (SoundStream; VILA-U's tokenizer): level i quantizes what levels < i left, over the whole latent.

    The library's `ResidualVQ` with its defaults (Euclidean codebooks updated by an EMA of their assignments, decay
    0.8, commitment weight 1), plus k-means initialisation of each level from the first batch and the replacement of
    codes used less than twice (`threshold_ema_dead_code=2`), the settings its README recommends against dead codes.
    """
    kind = "rvq"

    def __init__(self, cfg):
        super().__init__(cfg)
        from vector_quantize_pytorch import ResidualVQ

        self.inner = ResidualVQ(dim=cfg.latent_dim, num_quantizers=cfg.num_codebooks, codebook_size=cfg.codebook_size,
                                kmeans_init=True, threshold_ema_dead_code=2)

    def codebook_vectors(self) -> torch.Tensor:
        """(k, K, dim): level i's codebook; a token's vector is the sum over levels."""
        return self.inner.codebooks.float()

    def _quantize(self, z):
        z_q, codes, losses = self.inner(z)
        return z_q, codes, losses.sum()

    def _lookup(self, codes):
        return self.inner.get_output_from_indices(codes)


class ScalarQuantizer(LibraryQuantizer):
    """Finite scalar quantization (Mentzer et al. 2023): each dimension of a sub-code's chunk is bounded and rounded
    to one of L levels; no codebook is learned, so there is no codebook loss and no dead code by construction.

    The library's `FSQ` with `num_codebooks = k` and the levels of `fsq_levels` (their product is K)."""
    kind = "fsq"

    def __init__(self, cfg):
        super().__init__(cfg)
        from vector_quantize_pytorch import FSQ

        levels = list(fsq_levels(cfg))
        self.levels = tuple(levels)
        with torch.device("cpu"):   # it reads its levels back at construction (not possible on the meta device)
            self.inner = FSQ(levels=levels, dim=cfg.latent_dim, num_codebooks=cfg.num_codebooks,
                             preserve_symmetry=2 in levels)   # the library refuses level 2 otherwise

    def extra_repr(self) -> str:
        return super().extra_repr() + f", levels={self.levels}"

    def codebook_vectors(self) -> torch.Tensor:
        """(k, K, d): the same implicit grid of K points for every sub-code."""
        grid = self.inner.implicit_codebook.float()
        return grid.unsqueeze(0).expand(self.num_codebooks, *grid.shape)

    def _quantize(self, z):
        z_q, codes = self.inner(z)
        return z_q, codes, z.new_zeros(())

    def _lookup(self, codes):
        return self.inner.indices_to_codes(codes)


class LookupFreeQuantizer(LibraryQuantizer):
    """Lookup-free quantization (MAGVIT-v2): each latent dimension's sign is one bit, log2 K bits make a sub-code.

    The library's `LFQ` with its defaults: an entropy loss of weight 0.1 (confident per token, diverse over the
    batch), no commitment loss, values +-1."""
    kind = "lfq"

    def __init__(self, cfg):
        super().__init__(cfg)
        from vector_quantize_pytorch import LFQ

        with torch.device("cpu"):   # it builds its table of codes at construction (not possible on the meta device)
            self.inner = LFQ(dim=cfg.latent_dim, codebook_size=cfg.codebook_size, num_codebooks=cfg.num_codebooks)

    def codebook_vectors(self) -> torch.Tensor:
        """(k, K, log2 K): the +-1 corners of the hypercube, the same for every sub-code."""
        corners = self.inner.codebook.float()
        return corners.unsqueeze(0).expand(self.num_codebooks, *corners.shape)

    def _quantize(self, z):
        z_q, codes, loss = self.inner(z)
        return z_q, codes, loss

    def _lookup(self, codes):
        return self.inner.indices_to_codes(codes)


class SimQuantizer(LibraryQuantizer):
    """SimVQ (Zhu et al. 2024) per chunk: k of the library's `SimVQ`, one per chunk of latent / k dimensions, each a
    frozen Gaussian codebook of K times a learned linear map (the whole codebook moves together, so no code is left
    behind), with its defaults: the rotation trick for gradients, commitment weights 1 and 0.25."""
    kind = "simvq"

    def __init__(self, cfg):
        super().__init__(cfg)
        from vector_quantize_pytorch import SimVQ

        self.inner = nn.ModuleList(SimVQ(dim=self.code_dim, codebook_size=cfg.codebook_size)
                                   for _ in range(cfg.num_codebooks))

    def codebook_vectors(self) -> torch.Tensor:
        """(k, K, d): each chunk's implicit codebook (the frozen codes through its learned map)."""
        return torch.stack([q.codebook for q in self.inner]).float()

    def _quantize(self, z):
        chunks = z.chunk(self.num_codebooks, dim=-1)
        parts = [q(chunk) for q, chunk in zip(self.inner, chunks)]
        z_q = torch.cat([p[0] for p in parts], dim=-1)
        codes = torch.stack([p[1] for p in parts], dim=-1)
        return z_q, codes, torch.stack([p[2] for p in parts]).mean()

    def _lookup(self, codes):
        return torch.cat([q.indices_to_codes(codes[..., i]) for i, q in enumerate(self.inner)], dim=-1)
