"""Codebook statistics: one definition, per sub-codebook, over a stated window of tokens.

Every figure is measured per sub-codebook over a *window* of N tokens, and every result carries that N
(`window_tokens`); the definitions are written out in docs/codebook_statistics.md.

    >>> codes = torch.randint(0, 4096, (65536, 8))        # (N, k) int64: k = 8 sub-codes per token
    >>> s = codebook_stats(codes, codebook_size=4096)
    >>> s["codebook_usage"][0], s["perplexity"][0], s["window_tokens"]   # ~1.0, ~4000, 65536

`CodebookTracker` accumulates the same statistics cheaply during training: `update(codes)` never synchronises
with the device; `compute()` (the only place that does) returns `codebook_stats` over the last N tokens.

The names are the ones training logs and evaluation results use: `codebook_usage`, `dead_codes`, `perplexity`,
`normalized_entropy`, `batch_usage` (lists, one entry per sub-codebook); in a flat results dict the window is
`codebook_window_tokens`.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from ..tokenizer.codes import check_codes, count_codes

__all__ = ["codebook_stats", "stats_from_counts", "CodebookTracker", "all_reduce_counts", "count_codes"]


def _entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in nats along `dim`, with 0 * log 0 = 0."""
    return -torch.special.xlogy(p, p).sum(dim)



def _marginal_stats(counts: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """The per-sub-codebook part of the statistics from a (k, K) count tensor (any device, int or float).

    Returns the stats dict and H, the (k,) float64 entropies in nats (reused for mutual information)."""
    counts = counts.detach().to("cpu", torch.float64)
    k, K = counts.shape
    n = counts.sum(1)                                           # (k,) tokens per sub-codebook, all equal
    if bool((n <= 0).any()):
        raise ValueError("counts are empty: statistics need at least one token in the window")
    if bool((n != n[0]).any()):
        raise ValueError(f"every sub-codebook must count the same tokens, got row sums {n.tolist()}")
    p = counts / n[:, None]                                     # (k, K) code frequencies in the window
    used = (counts > 0).sum(1)                                  # (k,)
    H = _entropy(p)                                             # (k,) nats
    # ln K = 0 for a one-code "codebook": its single code is trivially used uniformly, so call it 1.
    norm_H = H / math.log(K) if K > 1 else torch.ones_like(H)
    return {
        "codebook_usage": (used / K).tolist(),
        "dead_codes": (K - used).tolist(),
        "perplexity": H.exp().tolist(),
        "normalized_entropy": norm_H.tolist(),
        # The reference's metric: a code counts if its frequency exceeds 1 % of uniform (0.01 / K). A code seen
        # once has frequency 1/N, so for windows N < 100 K this equals `codebook_usage`; for bigger windows it ignores
        # rare codes. It therefore depends on the window size: compare only at equal N.
        "batch_usage": (p > 0.01 / K).double().mean(1).tolist(),
        "window_tokens": int(n[0]),
    }, H


def stats_from_counts(counts: torch.Tensor) -> dict:
    """Marginal-only codebook statistics from counts.

    Args:
        counts: (k, K) number of tokens that chose each code of each sub-codebook, e.g. `CodebookTracker.counts`
            (totals since reset) or the sum of the quantizer's per-call `counts`.
    Returns:
        dict with per-sub-codebook lists (length k) `codebook_usage`, `dead_codes`, `perplexity`, `normalized_entropy`,
        `batch_usage`, and `window_tokens` (N, the tokens counted). The joint statistics need the codes themselves
        and are only in `codebook_stats`.
    """
    counts = torch.as_tensor(counts)
    if counts.dim() != 2:
        raise ValueError(f"counts must have shape (k, K), got {tuple(counts.shape)}")
    return _marginal_stats(counts)[0]


def _value_counts(x: torch.Tensor) -> torch.Tensor:
    """Counts of the distinct values of a 1-D tensor (in sorted order). Sort + run lengths: on CPU this is ~20x
    faster than `torch.unique(return_counts=True)` for 64 k int64 values."""
    s = x.sort().values
    starts = torch.cat([torch.ones(1, dtype=torch.bool, device=x.device), s[1:] != s[:-1]]).nonzero().squeeze(1)
    return torch.diff(starts, append=torch.tensor([s.numel()], device=x.device))


def _pairwise_mutual_information(codes: torch.Tensor, codebook_size: int, H: torch.Tensor) -> torch.Tensor:
    """(k, k) matrix of plug-in mutual information I(i; j) = H_i + H_j - H_ij in nats; diagonal = H_i.

    The joint distribution of a pair is taken from its *observed* pairs only: each token's pair becomes one id
    c_i * K + c_j whose repeats are counted. A dense K x K histogram would be 16.7 M bins (128 MB) per pair at
    K = 4096, almost all empty; this costs O(N log N) time and O(N) memory per pair.
    """
    N, k = codes.shape
    columns = codes.T.contiguous()                                     # (k, N): contiguous rows are faster
    mi = torch.diag(H.clone())
    for i in range(k):
        for j in range(i + 1, k):
            pair_ids = columns[i] * codebook_size + columns[j]         # (N,) < K^2, fits int64 for K < 3e9
            H_ij = _entropy(_value_counts(pair_ids).to(torch.float64) / N).cpu()
            # Rounding can leave a -1e-16 for truly independent codes; MI is never negative.
            mi[i, j] = mi[j, i] = (H[i] + H[j] - H_ij).clamp_min(0.0)
    return mi


def codebook_stats(codes: torch.Tensor, codebook_size: int) -> dict:
    """Codebook statistics over one window of tokens, as docs/codebook_statistics.md defines them.

    Args:
        codes: int tensor (..., k), last dimension = sub-codebook (e.g. (B, H, W, k) from `UniTok.encode`);
            flattened to (N, k): the window is these N tokens.
        codebook_size: K, codes per sub-codebook.
    Returns:
        dict (plain Python numbers and lists, JSON-serialisable):
        - per sub-codebook, lists of length k:
          `codebook_usage` share of the K codes chosen at least once; `dead_codes` K - used (int);
          `perplexity` exp(H(p)) with p the code frequency (K for uniform use, 1 for a single code);
          `normalized_entropy` H(p) / ln K in [0, 1]; `batch_usage` the reference's metric, share of codes with
          frequency > 0.01 / K (equals `codebook_usage` for N < 100 K; depends on N, see `_marginal_stats`);
        - joint: `joint_unique` distinct k-tuples among the N tokens; `joint_unique_fraction` = joint_unique / N;
          `mutual_information` k x k list of lists in nats, diagonal = entropy of each sub-codebook;
          `mean_pairwise_mi` mean of the off-diagonal entries (0.0 when k = 1);
          `mean_pairwise_mi_shuffled` the same after shuffling each sub-codebook's codes independently across
          tokens: the MI this estimator reports for truly independent codebooks with these marginals and this N.
          The plug-in MI is biased upwards when N is not much larger than the number of occupied pairs (N = 65536
          tokens cannot fill K^2 = 16.7 M pairs), so read `mean_pairwise_mi` against this baseline, not against 0;
        - `window_tokens` N, `codebook_size` K, `num_codebooks` k.
    """
    codes = torch.as_tensor(codes)
    if codes.dim() < 2:
        raise ValueError(f"codes must have shape (..., k) with the sub-codebook last, got shape {tuple(codes.shape)}"
                         " (for a single codebook pass codes[..., None])")
    check_codes(codes, codebook_size)
    codes = codes.reshape(-1, codes.shape[-1]).long()                 # (N, k): the window
    N, k = codes.shape
    stats, H = _marginal_stats(count_codes(codes, codebook_size))
    joint_unique = int(torch.unique(codes, dim=0).shape[0])
    mi = _pairwise_mutual_information(codes, codebook_size, H)
    off_diag = ~torch.eye(k, dtype=torch.bool)
    mean_mi = float(mi[off_diag].mean()) if k > 1 else 0.0
    if k > 1:
        # Shuffle each column with its own fixed permutation: same marginals, dependence destroyed. Seeded, so
        # the same codes always give the same baseline.
        g = torch.Generator().manual_seed(0)
        perms = torch.stack([torch.randperm(N, generator=g) for _ in range(k)], 1).to(codes.device)  # (N, k)
        shuffled = torch.gather(codes, 0, perms)
        mean_mi_shuffled = float(_pairwise_mutual_information(shuffled, codebook_size, H)[off_diag].mean())
    else:
        mean_mi_shuffled = 0.0
    stats.update(
        joint_unique=joint_unique,
        joint_unique_fraction=joint_unique / N,
        mutual_information=mi.tolist(),
        mean_pairwise_mi=mean_mi,
        mean_pairwise_mi_shuffled=mean_mi_shuffled,
        window_tokens=N,
        codebook_size=codebook_size,
        num_codebooks=k,
    )
    return stats


class CodebookTracker:
    """Running codebook statistics during training, with no host synchronisation on the hot path.

    Keeps, on the device of the codes:
      (a) `counts` (k, K): tokens per code since `reset()`, accumulated with `index_add_` on offset ids;
      (b) a ring buffer of the codes of the last `window_tokens` tokens, so `compute()` returns `codebook_stats`
          over the last N training tokens (a stated, reproducible window, unlike a per-batch figure).
    `update` only launches device kernels: the write position and the number of valid rows are Python integers
    derived from shapes, never read back from the device. `compute()` is where the host waits for the device.

        >>> tracker = CodebookTracker(num_codebooks=8, codebook_size=4096, window_tokens=65536, device="cuda")
        >>> tracker.update(out.codes)          # every step: (B, L, 8) int64, no sync
        >>> stats = tracker.compute()          # when logging: codebook_stats of the last 65536 tokens

    DDP: each rank tracks its own tokens. For global totals use `all_reduce_counts(tracker)` (returns summed
    counts, the tracker is left unchanged, so calling it at every log step never double-counts) and
    `stats_from_counts`. `compute()` reports the local window; rank 0's window is a fair sample of the stream.
    """

    def __init__(self, num_codebooks: int, codebook_size: int, window_tokens: int = 65536,
                 device: Optional[Union[str, torch.device]] = None):
        if num_codebooks < 1 or codebook_size < 1 or window_tokens < 1:
            raise ValueError(f"num_codebooks, codebook_size and window_tokens must be >= 1, got "
                             f"{num_codebooks}, {codebook_size}, {window_tokens}")
        self.num_codebooks, self.codebook_size, self.window_tokens = num_codebooks, codebook_size, window_tokens
        device = torch.device(device) if device is not None else torch.device("cpu")
        # int32 halves the buffer (65536 x 8 x 4 B = 2 MB); codes are < K, far below 2^31.
        wdtype = torch.int32 if codebook_size <= torch.iinfo(torch.int32).max else torch.int64
        self._counts = torch.zeros(num_codebooks * codebook_size, dtype=torch.int64, device=device)
        self._window = torch.zeros(window_tokens, num_codebooks, dtype=wdtype, device=device)
        self._pos = 0      # next row of the ring buffer to write
        self._valid = 0    # rows of the ring buffer holding real tokens (min(tokens seen, window_tokens))
        self._total = 0    # tokens passed to update() since reset()

    # -- state ------------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._counts.device

    @property
    def counts(self) -> torch.Tensor:
        """(k, K) int64 tokens per code since `reset()` (a view; clone it to keep a snapshot)."""
        return self._counts.view(self.num_codebooks, self.codebook_size)

    @property
    def total_tokens(self) -> int:
        """Tokens passed to `update` since `reset()` (counts merged with `merge_` are not included)."""
        return self._total

    @property
    def valid_tokens(self) -> int:
        """Tokens currently in the window: min(total_tokens, window_tokens)."""
        return self._valid

    def to(self, device: Union[str, torch.device]) -> "CodebookTracker":
        self._counts, self._window = self._counts.to(device), self._window.to(device)
        return self

    def reset(self) -> None:
        self._counts.zero_()
        self._window.zero_()
        self._pos = self._valid = self._total = 0

    # -- hot path ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, codes: torch.Tensor) -> None:
        """Add a batch of codes (..., k) int (e.g. (B, L, k) from the quantizer). No host synchronisation.

        On CPU the codes are range-checked (ValueError). On an accelerator they are not: that check would need a
        sync, and the quantizer's argmax cannot leave [0, K).
        """
        # An out-of-range code would silently count for the next sub-codebook (offset ids), so refuse it; the
        # range check reads values back, so only where that costs no device synchronisation.
        check_codes(codes, self.codebook_size, self.num_codebooks, check_range=codes.device.type == "cpu",
                    allow_empty=True)
        codes = codes.detach().reshape(-1, self.num_codebooks).to(self.device, non_blocking=True)
        n = codes.shape[0]    # from the shape: known on the host without asking the device
        if n == 0:
            return
        # (a) counts: device kernels only (see `count_codes`).
        self._counts += count_codes(codes, self.codebook_size).view(-1)
        # (b) ring buffer: at most two slice copies; all bounds are Python ints.
        W = self.window_tokens
        if n >= W:                                   # the batch alone fills the window: keep its last W tokens
            self._window.copy_(codes[n - W:])
            self._pos = 0                            # row 0 now holds the oldest token
        else:
            first = min(n, W - self._pos)            # rows until the end of the buffer
            self._window[self._pos:self._pos + first] = codes[:first]
            if first < n:                            # wrap around to the start
                self._window[:n - first] = codes[first:]
            self._pos = (self._pos + n) % W
        self._valid = min(self._valid + n, W)
        self._total += n

    # -- read out (syncs) -------------------------------------------------------------------------------------
    def window_codes(self) -> torch.Tensor:
        """(valid_tokens, k) int64 codes of the window, oldest first."""
        if self._valid < self.window_tokens:         # never wrapped: rows 0 .. valid-1, in order
            w = self._window[:self._valid]
        else:                                        # full: the oldest row is the next one to be overwritten
            w = torch.cat([self._window[self._pos:], self._window[:self._pos]])
        return w.long()

    def window_counts(self) -> torch.Tensor:
        """(k, K) int64 code counts over the window (marginals only: what `stats_from_counts` needs)."""
        return count_codes(self.window_codes(), self.codebook_size)

    def compute(self) -> dict:
        """`codebook_stats` over the last `valid_tokens` tokens, plus `total_tokens` (since reset)."""
        if self._valid == 0:
            raise ValueError("CodebookTracker.compute(): no tokens since reset(); call update(codes) first")
        stats = codebook_stats(self.window_codes(), self.codebook_size)
        stats["total_tokens"] = self._total
        return stats

    # -- checkpoints and DDP ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Tensors only (works with `torch.save`/`torch.load(weights_only=True)` and safetensors)."""
        return {
            "counts": self.counts.clone(),
            "window": self._window.clone(),
            "position": torch.tensor(self._pos, dtype=torch.int64),
            "valid": torch.tensor(self._valid, dtype=torch.int64),
            "total_tokens": torch.tensor(self._total, dtype=torch.int64),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()`; a resumed run then continues exactly as if never stopped."""
        k, K, W = self.num_codebooks, self.codebook_size, self.window_tokens
        counts, window = torch.as_tensor(state["counts"]), torch.as_tensor(state["window"])
        if tuple(counts.shape) != (k, K) or tuple(window.shape) != (W, k):
            raise ValueError(f"tracker state does not match: expected counts {(k, K)} and window {(W, k)}, got "
                             f"counts {tuple(counts.shape)} and window {tuple(window.shape)}")
        self._counts.copy_(counts.reshape(-1))
        self._window.copy_(window)
        self._pos, self._valid, self._total = (int(state[key]) for key in ("position", "valid", "total_tokens"))

    @torch.no_grad()
    def merge_(self, other_counts: Union[torch.Tensor, "CodebookTracker"]) -> "CodebookTracker":
        """Add another (k, K) count tensor (or another tracker's counts) to `counts`; the window is unchanged."""
        if isinstance(other_counts, CodebookTracker):
            other_counts = other_counts.counts
        if tuple(other_counts.shape) != (self.num_codebooks, self.codebook_size):
            raise ValueError(f"counts must have shape {(self.num_codebooks, self.codebook_size)}, "
                             f"got {tuple(other_counts.shape)}")
        self._counts += other_counts.reshape(-1).to(self._counts)
        return self


def all_reduce_counts(tracker: CodebookTracker, group=None) -> torch.Tensor:
    """Counts summed over all DDP ranks, (k, K) int64, as a new tensor (the tracker is not modified).

    Every rank must call it (it is a collective). Without an initialised process group it returns a copy of the
    local counts, so single-process code needs no special case. Feed the result to `stats_from_counts`.
    """
    counts = tracker.counts.clone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.SUM, group=group)
    return counts

