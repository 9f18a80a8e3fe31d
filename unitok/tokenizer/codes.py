"""The token-code format, checked and counted in one place.

A token is a k-tuple of integer codes, one per sub-codebook: tensors of codes have shape (..., k), last axis =
sub-codebook, values in [0, K). `UniTok.encode` gives (B, H, W, k); the quantizer gives (B, L, k). Everything that
accepts codes (the quantizer's `lookup`, `UniTok.decode`, the codebook statistics and tracker) validates them with
`check_codes`, and everything that counts them uses `count_codes`.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["check_codes", "count_codes"]


def check_codes(codes, codebook_size: int, num_codebooks: Optional[int] = None, check_range: bool = True,
                allow_empty: bool = False) -> None:
    """Raise ValueError unless `codes` is a non-empty integer tensor (..., k) with values in [0, codebook_size).

    Args:
        codes: the tensor to check.
        codebook_size: K, codes per sub-codebook.
        num_codebooks: k when it is known (the last axis must equal it); None accepts any k >= 1.
        check_range: False skips the value range, which needs a host-device synchronisation (reading min and
            max). The training hot path skips it on accelerators: the quantizer's argmax cannot leave [0, K).
            Meta tensors have no values and are never range-checked.
        allow_empty: accept a tensor with no tokens (decoding an empty batch); statistics need at least one.
    """
    want = f"(..., {num_codebooks})" if num_codebooks is not None else "(..., k)"
    if not isinstance(codes, torch.Tensor) or codes.dtype.is_floating_point or codes.dtype.is_complex \
            or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor of shape {want} (last axis = sub-codebook), got "
                         f"{type(codes).__name__} {getattr(codes, 'dtype', '')}")
    if codebook_size < 1:
        raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
    if codes.ndim == 0 or (num_codebooks is not None and codes.shape[-1] != num_codebooks):
        raise ValueError(f"codes must have shape {want} (one code per sub-codebook), got {tuple(codes.shape)}")
    if codes.numel() == 0 and not allow_empty:
        raise ValueError(f"codes is empty (shape {tuple(codes.shape)}); expected at least one token")
    if check_range and codes.numel() and codes.device.type != "meta":
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= codebook_size:
            raise ValueError(f"codes must lie in [0, {codebook_size}), got values in [{lo}, {hi}]")


def count_codes(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """codes (..., k) int -> (k, K) int64: how many tokens chose each code of each sub-codebook.

    One `index_add_` over offset ids (code c of sub-codebook i is id i * K + c), on the codes' device. Not
    `bincount`: on CUDA it reads the maximum back to the host, and this runs at every training step. The codes
    are not validated here (that would synchronise); an out-of-range code would count for the neighbouring
    sub-codebook, so validate untrusted codes with `check_codes` first.
    """
    k = codes.shape[-1]
    offsets = torch.arange(k, device=codes.device) * codebook_size                     # (k,)
    ids = (codes.reshape(-1, k).long() + offsets).reshape(-1)                          # (N * k,)
    counts = torch.zeros(k * codebook_size, dtype=torch.int64, device=codes.device)
    counts.index_add_(0, ids, torch.ones_like(ids))
    return counts.view(k, codebook_size)
