"""Image metrics on images in [-1, 1], shape (B, 3, H, W): `psnr` (dB, data range 2) and `ssim`.

Both are torchmetrics' implementations, called with this project's conventions (data range 2, per-image values,
inputs clamped to [-1, 1] the way saving them as images would).
"""
from __future__ import annotations

import torch

__all__ = ["psnr", "ssim"]


def _check_image_pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate two image batches in [-1, 1] and clamp them there (as saving them as images would).

    Decoders overshoot [-1, 1] a little, which clamping handles. Values beyond +-1.5 mean another convention
    ([0, 255] or unnormalised) and would silently give wrong numbers, so they raise.
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"expected two image batches of the same shape (B, C, H, W), got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    x, y = x.detach().float(), y.detach().float()
    for name, t in (("x", x), ("y", y)):
        lo, hi = float(t.min()), float(t.max())
        if lo < -1.5 or hi > 1.5:
            raise ValueError(f"images must be in [-1, 1]; {name} has values in [{lo:.3g}, {hi:.3g}]")
    return x.clamp(-1, 1), y.clamp(-1, 1)


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "none":
        return values
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def psnr(x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Peak signal-to-noise ratio in dB for images in [-1, 1] (data range 2.0), computed per image.

    Args:
        x, y: (B, C, H, W) float in [-1, 1] (clamped there first).
        reduction: "mean" -> () the mean of the per-image PSNRs; "none" -> (B,). Identical images give inf.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio

    x, y = _check_image_pair(x, y)
    per_image = peak_signal_noise_ratio(x, y, data_range=2.0, reduction="none", dim=(1, 2, 3))   # (B,)
    return _reduce(per_image, reduction)


def ssim(x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Structural similarity for images in [-1, 1] (data range 2.0).

    The standard Gaussian window (sigma 1.5, 11 x 11) is used when it fits (images of 11 px and more, so 32 px
    is standard SSIM); smaller images get the largest odd uniform window that fits (at least 3 px).

    Args:
        x, y: (B, C, H, W) float in [-1, 1] (clamped there first).
        reduction: "mean" -> (); "none" -> (B,) one value per image.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    x, y = _check_image_pair(x, y)
    side = min(x.shape[-2:])
    if side >= 11:
        kw = dict(gaussian_kernel=True, sigma=1.5, kernel_size=11)
    elif side >= 3:
        kw = dict(gaussian_kernel=False, kernel_size=side if side % 2 else side - 1)
    else:
        raise ValueError(f"SSIM needs images of at least 3 x 3 pixels, got {tuple(x.shape[-2:])}")
    per_image = structural_similarity_index_measure(x, y, data_range=2.0, reduction="none", **kw)   # (B,)
    return _reduce(per_image, reduction)
