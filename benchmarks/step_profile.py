"""Where a training step's time goes: torch.profiler over real `shapes` batches, before and after the CPU levers.

    python benchmarks/step_profile.py [--preset tiny] [--steps 6] [--top 12]

Three settings, measured in this one process, one after the other:
  before  the per-tensor AdamW loop and clip_grad_norm_ loop, no image-head block, fp32 (the earlier tiny recipe)
  fp32    fused AdamW, foreach gradient clipping, the preset's image head, fp32 (`cpu_bf16=off`)
  bf16    the same under the trainers' bf16 autocast with the math attention kernel (`cpu_bf16=on`; the tiny
          preset's "auto" picks it on CPUs with AMX)
For each: the median step, split into regions (data rendering, forward, loss, backward, gradient clipping,
optimizer) by `torch.profiler.record_function`, and the top operators by self time. Times are also given scaled to
a 192 GFLOP/s machine: wall time x (measured fp32 matmul peak / 192 GFLOP/s), the README's convention, since on a
shared machine the peak moves with the load.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from unitok.tokenizer.config import get_preset
from unitok.data.datasets import build_dataset
from unitok.training.losses import UniTokLoss
from unitok.tokenizer.model import UniTok
from unitok.training import machine
from unitok.training.machine import training_autocast

REGIONS = ("data", "forward", "loss", "backward", "clip_grad", "optimizer")
REFERENCE_PEAK = machine.REFERENCE_GFLOPS * 1e9   # FLOP/s


def matmul_peak(size: int = 2048, repeats: int = 5) -> float:
    """The CPU's fp32 matmul peak in FLOP/s, measured by `unitok.training.machine.matmul_peak`."""
    return machine.matmul_peak(size=size, repeats=repeats) * 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Step:
    """One training step of `preset` on shapes batches, with the optimizer settings of `fused`."""

    def __init__(self, preset: str, fused: bool, image_head_depth=None, batch: int = 64, cpu_bf16: str = "off"):
        p = get_preset(preset)
        cfg = p.model if image_head_depth is None else dataclasses.replace(p.model, image_head_depth=image_head_depth)
        torch.manual_seed(0)
        self.model = UniTok(cfg).train()
        self.loss_fn = UniTokLoss(cfg)
        self.fused = fused
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-6,
                                     weight_decay=0.02, fused=fused, foreach=False if not fused else None)
        self.data = build_dataset("shapes", cfg.image_size, split="train")
        self.batch, self.index = batch, 0
        self.cpu_bf16 = cpu_bf16

    def __call__(self) -> None:
        with record_function("data"):
            items = [self.data[self.index + j] for j in range(self.batch)]
            self.index += self.batch
            images = torch.stack([i["image"] for i in items])
            texts = [i["caption"] for i in items]
        with record_function("forward"), training_autocast(torch.device("cpu"), cpu_bf16=self.cpu_bf16,
                                                                   model=self.model):
            out = self.model(images, texts)
        with record_function("loss"):
            terms = self.loss_fn(out, images)
            terms["total"].detach().item()
        self.opt.zero_grad(set_to_none=True)
        with record_function("backward"):
            terms["total"].backward()
        with record_function("clip_grad"):
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 10.0, foreach=self.fused)
        with record_function("optimizer"):
            self.opt.step()


def profile_steps(step: Step, steps: int, top: int) -> dict:
    step()
    step()  # warm-up
    times = [_timed(step) for _ in range(steps)]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            step()
    regions: dict = defaultdict(float)
    for e in prof.key_averages():
        if e.key in REGIONS:
            regions[e.key] += e.cpu_time_total / 2 / 1e3   # ms per step
    ops = sorted((e for e in prof.key_averages() if e.key not in REGIONS), key=lambda e: -e.self_cpu_time_total)
    return {"step_ms": statistics.median(times) * 1e3, "regions": dict(regions),
            "ops": [(e.key, e.self_cpu_time_total / 2 / 1e3) for e in ops[:top]]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--batch", type=int, default=64, help="images per step (the recipe's: 64)")
    args = ap.parse_args(argv)
    settings = {"before": Step(args.preset, fused=False, image_head_depth=0, batch=args.batch),
                "fp32": Step(args.preset, fused=True, batch=args.batch),
                "bf16": Step(args.preset, fused=True, cpu_bf16="on", batch=args.batch)}
    peaks, results = [matmul_peak()], {}
    for name, step in settings.items():
        results[name] = profile_steps(step, args.steps, args.top)
        peaks.append(matmul_peak())
    peak = statistics.median(peaks)
    scale = peak / REFERENCE_PEAK
    print(f"{args.preset}, batch {args.batch}, {torch.get_num_threads()} threads; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s "
          f"(median of {len(peaks)}); 'scaled' = at {REFERENCE_PEAK / 1e9:.0f} GFLOP/s")
    for name, r in results.items():
        print(f"\n{name}: median step {r['step_ms']:.0f} ms wall, {r['step_ms'] * scale:.0f} ms scaled")
        total = sum(r["regions"].values()) or 1.0
        for region in REGIONS:
            ms = r["regions"].get(region, 0.0)
            print(f"  {region:10s} {ms * scale:7.1f} ms scaled  {100 * ms / total:5.1f} %")
        print("  top operators (self time, scaled ms):")
        for key, ms in r["ops"]:
            print(f"    {key[:60]:60s} {ms * scale:7.1f}")
    base = results["fp32"]["step_ms"]
    print("\nstep speed against fp32: " + ", ".join(f"{name} {base / r['step_ms']:.2f}x" for name, r in results.items()))
    return results, peak


if __name__ == "__main__":
    main()
