"""Tests for unitok.evaluation.codebook_stats and unitok.tokenizer.codes: the statistics, the tracker, code checks (CPU, deterministic)."""
import math

import unitok.torchvision_fix as _tv

_tv.apply()  # before torchmetrics/timm/open_clip import torchvision

import pytest  # noqa: E402
import torch  # noqa: E402

from unitok.evaluation import codebook_stats as CS  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------
# codebook_stats
# ---------------------------------------------------------------------------------------------------------------

def _grid_codes(K):
    """All K*K pairs once: each sub-codebook uniform, and the two exactly independent. (K*K, 2)."""
    a = torch.arange(K * K)
    return torch.stack([a // K, a % K], 1)


def test_uniform_independent_codes():
    K = 8
    s = CS.codebook_stats(_grid_codes(K), K)
    assert s["codebook_usage"] == [1.0, 1.0] and s["dead_codes"] == [0, 0] and s["batch_usage"] == [1.0, 1.0]
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
    s = CS.codebook_stats(torch.full((100, 3), 5), K)
    assert s["codebook_usage"] == pytest.approx([1 / K] * 3)
    assert s["dead_codes"] == [K - 1] * 3
    assert s["perplexity"] == pytest.approx([1.0] * 3)
    assert s["normalized_entropy"] == pytest.approx([0.0] * 3, abs=1e-12)
    assert s["joint_unique"] == 1 and s["joint_unique_fraction"] == pytest.approx(0.01)
    assert s["mean_pairwise_mi"] == pytest.approx(0.0, abs=1e-12)


def test_identical_subcodebooks_mi_equals_entropy():
    K = 32
    c = torch.arange(K).repeat(4)                    # uniform, 128 tokens
    s = CS.codebook_stats(torch.stack([c, c], 1), K)
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
    s = CS.codebook_stats(codes, K)

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
    s = CS.codebook_stats(codes, K)
    assert s["codebook_usage"] == [1.0]                        # code 0 was chosen once
    assert s["batch_usage"] == [0.75]                 # 1/1000 < 0.01/K: the reference's metric ignores it
    assert CS.codebook_stats(codes[:50], K)["batch_usage"] == [0.5]   # codes 0, 1 in a 50-token window


def test_shapes_counts_and_errors():
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 10, (2, 4, 4, 3), generator=g)      # (B, H, W, k)
    s = CS.codebook_stats(codes, 10)
    assert s == CS.codebook_stats(codes.reshape(-1, 3), 10)
    assert s["window_tokens"] == 32
    counts = torch.stack([torch.bincount(codes[..., i].flatten(), minlength=10) for i in range(3)])
    m = CS.stats_from_counts(counts)
    assert set(m) == {"codebook_usage", "dead_codes", "perplexity", "normalized_entropy", "batch_usage", "window_tokens"}
    for key in m:
        assert m[key] == pytest.approx(s[key])
    with pytest.raises(ValueError):
        CS.codebook_stats(codes.float(), 10)
    with pytest.raises(ValueError):
        CS.codebook_stats(codes, 5)                      # values >= K
    with pytest.raises(ValueError):
        CS.codebook_stats(torch.zeros(0, 3, dtype=torch.long), 10)
    with pytest.raises(ValueError):
        CS.codebook_stats(torch.zeros(5, dtype=torch.long), 10)   # no sub-codebook axis


# ---------------------------------------------------------------------------------------------------------------
# CodebookTracker
# ---------------------------------------------------------------------------------------------------------------

def _stream(seed, sizes, k=3, K=12):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, K, (n, k), generator=g) for n in sizes]


def test_tracker_matches_codebook_stats_on_last_n():
    k, K, W = 3, 12, 64
    tracker = CS.CodebookTracker(k, K, window_tokens=W)
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
        assert stats == CS.codebook_stats(window, K)


def test_tracker_reset_errors_and_merge():
    tracker = CS.CodebookTracker(2, 5, window_tokens=10)
    with pytest.raises(ValueError):
        tracker.compute()                                    # nothing seen yet
    with pytest.raises(ValueError):
        tracker.update(torch.zeros(4, 3, dtype=torch.long))  # wrong k
    with pytest.raises(ValueError):
        tracker.update(torch.full((4, 2), 5))                # code out of range (checked on CPU)
    tracker.update(torch.ones(4, 2, dtype=torch.long))
    other = CS.CodebookTracker(2, 5, window_tokens=10)
    other.update(torch.zeros(3, 2, dtype=torch.long))
    tracker.merge_(other)
    assert tracker.counts[:, :2].tolist() == [[3, 4], [3, 4]]
    assert CS.stats_from_counts(tracker.counts)["window_tokens"] == 7
    assert torch.equal(CS.all_reduce_counts(tracker), tracker.counts)   # no process group: a copy
    tracker.reset()
    assert tracker.counts.sum() == 0 and tracker.valid_tokens == 0 and tracker.total_tokens == 0


def test_tracker_state_dict_round_trip(tmp_path):
    k, K, W = 3, 12, 50
    first, second = _stream(1, [30, 17, 29]), _stream(2, [11, 40, 7])
    a = CS.CodebookTracker(k, K, window_tokens=W)
    for batch in first:
        a.update(batch)
    torch.save(a.state_dict(), tmp_path / "tracker.pt")
    b = CS.CodebookTracker(k, K, window_tokens=W)
    b.load_state_dict(torch.load(tmp_path / "tracker.pt", weights_only=True))
    for batch in second:                                     # the resumed run continues exactly
        a.update(batch)
        b.update(batch)
    assert a.compute() == b.compute()
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    with pytest.raises(ValueError):
        CS.CodebookTracker(k, K, window_tokens=W + 1).load_state_dict(a.state_dict())


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

    tracker = CS.CodebookTracker(4, 4096, window_tokens=100, device="meta")
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
        tracker = CS.CodebookTracker(2, 6, window_tokens=8)
        tracker.update(torch.tensor([[0, 1], [2, 3], [0, 5]]))
        assert torch.equal(CS.all_reduce_counts(tracker), tracker.counts)
    finally:
        dist.destroy_process_group()
