"""Tests for unitok.evaluation.image_metrics: PSNR and SSIM on images in [-1, 1] (CPU, deterministic)."""
import unitok.torchvision_fix as _tv

_tv.apply()  # before torchmetrics/timm/open_clip import torchvision

import pytest  # noqa: E402
import torch  # noqa: E402

from unitok.evaluation import image_metrics as IM  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------
# PSNR / SSIM
# ---------------------------------------------------------------------------------------------------------------

def test_psnr_known_values_and_reduction():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) - 0.5           # [-0.5, 0.5], offsets stay in [-1, 1]
    y = x.clone()
    y[0] += 0.2                                              # MSE 0.04 -> 10 log10(4 / 0.04) = 20 dB
    y[1] += 0.02                                             # -> 40 dB
    per_image = IM.psnr(y, x, reduction="none")
    assert per_image.shape == (2,)
    assert per_image.tolist() == pytest.approx([20.0, 40.0], abs=1e-3)
    assert float(IM.psnr(y, x)) == pytest.approx(30.0, abs=1e-3)   # mean of the per-image PSNRs
    with pytest.raises(ValueError):
        IM.psnr(x * 255, x)                                   # wrong convention
    with pytest.raises(ValueError):
        IM.psnr(x, x[:1])
    with pytest.raises(ValueError):
        IM.psnr(x, y, reduction="sum")


def test_ssim_small_images():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    assert float(IM.ssim(x, x)) == pytest.approx(1.0, abs=1e-5)
    noisy = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    per_image = IM.ssim(noisy, x, reduction="none")
    assert per_image.shape == (3,) and bool((per_image < 0.99).all())
    tiny = x[:, :, :8, :8]                                   # smaller than the 11 px Gaussian window
    assert float(IM.ssim(tiny, tiny)) == pytest.approx(1.0, abs=1e-5)
