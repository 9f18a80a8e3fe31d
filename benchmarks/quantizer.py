"""Multi-codebook quantizer: forward + backward at the reference size, three implementations side by side.

    python benchmarks/quantizer.py [--tokens 16384] [--repeats 7]

Contenders, all in this one process on the same input (64 images x 256 tokens, 64-d, 8 sub-codebooks x 4096):
  unitok   unitok.MultiCodebookQuantizer (one batched search over all sub-codebooks, cache-sized token blocks)
  loop     a plain per-sub-codebook loop shaped like the reference implementation: chunk, normalise, squared
           distance |z|^2 + |c|^2 - 2 z.c over all tokens at once, argmin, gather, losses, concatenate
  vqtorch  vector_quantize_pytorch.VectorQuantize(dim=64, codebook_size=4096, heads=8,
           separate_codebook_per_head=True, codebook_dim=8, use_cosine_sim=True) when installed
It prints median wall time and peak memory (the growth of peak RSS during one forward + backward, each contender
in a fresh subprocess so they cannot share it) and the ratios.
Absolute times on shared machines are noisy; the ratios are what to compare.
"""
from __future__ import annotations

import argparse
import json
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
    """The reference's structure: one module per sub-codebook, looped over in Python."""

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
            flat = F.normalize(chunk.reshape(-1, chunk.shape[-1]), dim=-1)
            emb = F.normalize(cb.weight, dim=-1)
            dist = flat.pow(2).sum(1, keepdim=True) + emb.pow(2).sum(1) - 2 * flat @ emb.t()
            idx = dist.argmin(dim=1)
            z_q = emb[idx]
            losses.append(self.beta * F.mse_loss(z_q.detach(), flat) + F.mse_loss(z_q, flat.detach()))
            outs.append(flat + (z_q - flat).detach())
            codes.append(idx)
        z_q = torch.cat(outs, dim=-1).reshape(z.shape)
        return z_q, torch.stack(codes, -1), sum(losses) / len(losses)


def build(name):
    torch.manual_seed(0)
    if name == "unitok":
        from unitok.quantizer import MultiCodebookQuantizer
        q = MultiCodebookQuantizer(DIM, K_BOOKS, K_CODES)
        return lambda z: q(z).z_q, q
    if name == "loop":
        q = ReferenceLoopQuantizer()
        return lambda z: q(z)[0], q
    if name == "vqtorch":
        from vector_quantize_pytorch import VectorQuantize
        q = VectorQuantize(dim=DIM, codebook_size=K_CODES, heads=K_BOOKS, separate_codebook_per_head=True,
                           codebook_dim=DIM // K_BOOKS, use_cosine_sim=True)
        q.train()
        return lambda z: q(z)[0], q
    raise ValueError(name)


def time_one(name, tokens, repeats):
    """Median seconds of forward + backward (loss = sum of outputs + the quantizer's own loss)."""
    fn, _ = build(name)
    z = torch.randn(tokens // 256, 256, DIM, generator=torch.Generator().manual_seed(1), requires_grad=True)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        out = fn(z)
        (out.square().mean()).backward()
        if i:  # the first call warms up allocators and lazy inits
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _measure_peak(name, tokens):
    fn, _ = build(name)
    z = torch.randn(tokens // 256, 256, DIM, requires_grad=True)
    fn(z).square().mean().backward()           # warm-up: lazy inits and allocator pools are not the algorithm
    z.grad = None
    with open("/proc/self/clear_refs", "w") as f:  # Linux: reset the peak-RSS high-water mark to the current RSS
        f.write("5")
    base = _status_kib("VmRSS")
    fn(z).square().mean().backward()
    return (_status_kib("VmHWM") - base) / 1024


def peak_memory(name, tokens):
    """Peak RSS growth (MiB) of one forward + backward, in a fresh interpreter so contenders don't share it."""
    code = f"""
import sys, torch
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
import quantizer as b
print(b._measure_peak({name!r}, {tokens}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(res.stderr)
    return float(res.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64 * 256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    names = ["unitok", "loop"]
    try:
        import vector_quantize_pytorch  # noqa: F401
        names.append("vqtorch")
    except ImportError:
        print("vector_quantize_pytorch not installed: skipping that contender (pip install unitok[bench])")
    print(f"forward+backward, {args.tokens} tokens x {DIM}-d, {K_BOOKS} x {K_CODES} codes, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    # interleave contenders so drifting machine load hits all of them alike
    times = {n: [] for n in names}
    for _ in range(3):
        for n in names:
            times[n].append(time_one(n, args.tokens, args.repeats))
    results = {n: {"median_s": statistics.median(t), "peak_mib": peak_memory(n, args.tokens)} for n, t in times.items()}
    for n, r in results.items():
        print(f"  {n:8s} median {r['median_s'] * 1e3:8.1f} ms   peak +{r['peak_mib']:7.1f} MiB")
    base = results["unitok"]
    for n in names[1:]:
        r = results[n]
        print(f"unitok vs {n:8s}: {r['median_s'] / base['median_s']:.2f}x faster, "
              f"peak memory {base['peak_mib'] / r['peak_mib']:.2f}x of {n}'s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
