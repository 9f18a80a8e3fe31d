"""Multi-codebook quantizer: forward + backward at the reference size, three implementations side by side, and
the quantizer study's contenders beside it.

    python benchmarks/quantizer.py [--tokens 16384] [--repeats 3] [--threads 1] [--no-contenders]

Contenders, all in this one process on the same input (64 images x 256 tokens, 64-d, 8 sub-codebooks x 4096):
  unitok   unitok.MultiCodebookQuantizer: all sub-codebooks searched by one batched matmul over cache-sized
           blocks of tokens, only the argmax kept.
  loop     what the reference implementation does: one codebook module per sub-codebook, looped over in Python;
           each normalises its chunk and its codes, takes argmax(z @ codes.T) over all tokens at once (a tokens x
           4096 similarity per sub-codebook), gathers the codes, and adds the same two-term loss and
           straight-through output as unitok.
  vqtorch  vector_quantize_pytorch.VectorQuantize(dim=64, codebook_size=4096, heads=8,
           separate_codebook_per_head=True, codebook_dim=8, learnable_codebook=True, ema_update=False,
           rotation_trick=False) when installed: codebooks learned by gradient (not EMA) with a plain
           straight-through estimator, as in UniTok. How it still differs: the library refuses cosine similarity
           with a learnable codebook, so it searches by Euclidean distance on unnormalised chunks and codes; and
           its loss is one mse(quantized, input) term with gradients to both sides (weight 1) instead of
           0.25 * commitment + 1 * codebook.
The quantizer study's contenders (unitok.tokenizer.quantizers, the library's classes behind the toolkit's token
format) at the same size and an equal 96 bits per token, each timed and measured the same way, as a multiple of
unitok's (MCQ) time and memory:
  rvq      ResidualVQ: 8 levels of 4096 codes over the whole 64-d latent (EMA codebooks, k-means init).
  fsq      FSQ: 8 chunks of 8 dimensions, levels (4, 4, 4, 4, 2, 2, 2, 2) = 4096 points each; nothing to search.
  lfq      LFQ: 8 groups of 12 sign bits, so a 96-d latent (the others' is 64-d); its entropy loss compares every
           token with all 4096 corners of its group, which is what it costs.
  simvq    SimVQ per chunk: 8 frozen codebooks of 4096 through learned linear maps, Euclidean search.
It prints the fp32 matmul peak of this machine measured in the same run (every absolute time is only meaningful
next to it: these machines differ by up to 3x from one day to the next), the median wall time of each contender,
its peak memory (the growth of peak RSS during one forward + backward, each contender in a fresh subprocess so they
cannot share it) and the ratios. A peak below one 4 KiB page is counted as one page (the resolution of RSS).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

DIM, K_BOOKS, K_CODES = 64, 8, 4096


class ReferenceLoopQuantizer(nn.Module):
    """The reference's algorithm: one module per sub-codebook, looped over in Python; cosine argmax per chunk."""

    def __init__(self, dim=DIM, num_codebooks=K_BOOKS, codebook_size=K_CODES, beta=0.25):
        super().__init__()
        d = dim // num_codebooks
        self.num_codebooks, self.beta = num_codebooks, beta
        self.codebooks = nn.ModuleList(nn.Embedding(codebook_size, d) for _ in range(num_codebooks))
        for cb in self.codebooks:
            cb.weight.data.uniform_(-d ** -0.5 / 36, d ** -0.5 / 36)

    def forward(self, z):
        outs, codes, losses = [], [], []
        for chunk, cb in zip(z.chunk(self.num_codebooks, dim=-1), self.codebooks):
            flat = F.normalize(chunk.reshape(-1, chunk.shape[-1]), dim=-1)     # (N, d) unit chunks
            emb = F.normalize(cb.weight, dim=-1)                                 # (K, d) unit codes
            idx = (flat @ emb.t()).argmax(dim=1)                                 # (N,) cosine argmax, (N, K) at once
            z_q = F.embedding(idx, emb)
            losses.append(self.beta * F.mse_loss(z_q.detach(), flat) + F.mse_loss(z_q, flat.detach()))
            outs.append(flat + (z_q - flat).detach())
            codes.append(idx)
        z_q = torch.cat(outs, dim=-1).reshape(z.shape)
        return z_q, torch.stack(codes, -1), sum(losses) / len(losses)


CONTENDERS = ("rvq", "fsq", "lfq", "simvq")


def set_codebook_size(codes: int) -> None:
    """K of every contender (default 4096, the reference's); `--codebook-size` (a smaller K for a quick check)."""
    global K_CODES
    if codes < 4 or codes & (codes - 1):
        raise SystemExit(f"--codebook-size must be a power of 2 >= 4 (LFQ's bits), got {codes}")
    K_CODES = codes


def latent_dim(name):
    # LFQ: one bit per dimension, 8 x log2(K) (96 at K = 4096); the others keep the 64-d latent
    return K_BOOKS * int(math.log2(K_CODES)) if name == "lfq" else DIM


def build(name):
    torch.manual_seed(0)
    if name in CONTENDERS:
        from unitok.tokenizer.config import ModelConfig
        from unitok.tokenizer.quantizers import build_quantizer
        dim = latent_dim(name)
        # FSQ's levels: K spread evenly over its 8 dimensions (4 x 4 x 4 x 4 x 2 x 2 x 2 x 2 at K = 4096)
        config = ModelConfig(latent_dim=dim, num_codebooks=K_BOOKS, codebook_size=K_CODES, quantizer=name,
                             width=2 * dim)
        q = build_quantizer(config).train()

        def run(z):
            out = q(z)
            return out.z_q, out.loss

        return run, q
    if name == "unitok":
        from unitok.tokenizer.quantizer import MultiCodebookQuantizer
        q = MultiCodebookQuantizer(DIM, K_BOOKS, K_CODES)

        def run(z):
            out = q(z)
            return out.z_q, out.loss

        return run, q
    if name == "loop":
        q = ReferenceLoopQuantizer(codebook_size=K_CODES)

        def run(z):
            z_q, _, loss = q(z)
            return z_q, loss

        return run, q
    if name == "vqtorch":
        from vector_quantize_pytorch import VectorQuantize
        # Gradient-learned codebooks and a plain straight-through estimator, as UniTok trains; see the docstring
        # for what still differs (Euclidean search, one symmetric loss term).
        q = VectorQuantize(dim=DIM, codebook_size=K_CODES, heads=K_BOOKS, separate_codebook_per_head=True,
                           codebook_dim=DIM // K_BOOKS, learnable_codebook=True, ema_update=False,
                           rotation_trick=False)
        q.train()

        def run(z):
            z_q, _, loss = q(z)
            return z_q, loss

        return run, q
    raise ValueError(name)


def _objective(fn, z):
    z_q, loss = fn(z)
    return z_q.square().mean() + loss.sum()


def time_one(name, tokens, repeats):
    """Median seconds of forward + backward (loss = mean square of the output + the quantizer's own loss, so the
    codebooks get their gradients too)."""
    fn, _ = build(name)
    z = torch.randn(tokens // 256, 256, latent_dim(name), generator=torch.Generator().manual_seed(1),
                    requires_grad=True)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        _objective(fn, z).backward()
        if i:  # the first call warms up allocators and lazy inits
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _measure_peak(name, tokens):
    fn, _ = build(name)
    z = torch.randn(tokens // 256, 256, latent_dim(name), requires_grad=True)
    _objective(fn, z).backward()               # warm-up: lazy inits and allocator pools are not the algorithm
    z.grad = None
    with open("/proc/self/clear_refs", "w") as f:  # Linux: reset the peak-RSS high-water mark to the current RSS
        f.write("5")
    base = _status_kib("VmRSS")
    _objective(fn, z).backward()
    return (_status_kib("VmHWM") - base) / 1024


def peak_memory(name, tokens, threads, codes=None):
    """Peak RSS growth (MiB) of one forward + backward, in a fresh interpreter so contenders don't share it."""
    code = f"""
import sys, torch
torch.set_num_threads({threads})
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
import quantizer as b
b.set_codebook_size({codes or K_CODES})
print(b._measure_peak({name!r}, {tokens}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(res.stderr)
    return float(res.stdout.strip().splitlines()[-1])


PAGE_MIB = 4 / 1024   # RSS is counted in 4 KiB pages: a smaller growth reads as 0


def main(argv=None):
    from train_throughput import matmul_peak   # the same measurement as the throughput benchmark

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64 * 256)
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per round (3 interleaved rounds)")
    ap.add_argument("--threads", type=int, default=None,
                    help="intra-op threads (default: torch's); 1 gives stable ratios on a machine shared with other "
                         "work, where multi-threaded small kernels wait on each other")
    ap.add_argument("--codebook-size", type=int, default=K_CODES,
                    help="codes per sub-codebook for every contender (default 4096, the reference's; a smaller K "
                         "for a quick check)")
    ap.add_argument("--no-contenders", action="store_true",
                    help="only the three MCQ implementations, not the quantizer study's other quantizers")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    set_codebook_size(args.codebook_size)
    names = ["unitok", "loop"]
    names.append("vqtorch")   # vector-quantize-pytorch is a dependency of unitok (the quantizer study's contenders)
    contenders = [] if args.no_contenders else list(CONTENDERS)
    names += contenders
    cpu = torch.device("cpu")
    peak_before = matmul_peak(cpu)
    print(f"forward+backward, {args.tokens} tokens x {DIM}-d, {K_BOOKS} x {K_CODES} codes, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}", flush=True)
    # interleave contenders so drifting machine load hits all of them alike
    times = {n: [] for n in names}
    for round_ in range(3):
        for n in names:
            times[n].append(time_one(n, args.tokens, args.repeats))
            print(f"  round {round_ + 1}/3  {n:8s} {times[n][-1] * 1e3:8.1f} ms", flush=True)
    peak_after = matmul_peak(cpu)
    print(f"fp32 matmul peak (2048^3, this process): {peak_before / 1e9:.0f} GFLOP/s before the timings, "
          f"{peak_after / 1e9:.0f} GFLOP/s after")
    results = {n: {"median_s": statistics.median(t),
                   "peak_mib": max(peak_memory(n, args.tokens, torch.get_num_threads()), PAGE_MIB)}
               for n, t in times.items()}
    for n, r in results.items():
        print(f"  {n:8s} median {r['median_s'] * 1e3:8.1f} ms   peak +{r['peak_mib']:7.1f} MiB")
    base = results["unitok"]
    for n in contenders:
        r = results[n]
        print(f"contender {n:6s}: {r['median_s'] / base['median_s']:.3g}x unitok's time, "
              f"{r['peak_mib'] / base['peak_mib']:.3g}x its peak memory")
    for n in [n for n in names[1:] if n not in contenders]:
        r = results[n]
        print(f"unitok vs {n:8s}: {r['median_s'] / base['median_s']:.3g}x faster, "
              f"peak memory {base['peak_mib'] / r['peak_mib']:.3g}x of {n}'s")
    results["matmul_peak_flops"] = {"before": peak_before, "after": peak_after}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
