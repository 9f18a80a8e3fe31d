"""Generator throughput: training images/s, and sampling images/s with and without the KV cache, side by side.

    python benchmarks/generator.py [--preset tiny] [--batch 32] [--steps 5] [--sample-batch 16 64] [--json FILE]

Everything runs in one process next to an fp32 matmul-peak measurement (before and after the timings), so the
numbers can be scaled to another machine: time x (measured peak / 192 GFLOP/s) is the time on a 192 GFLOP/s
machine (the convention of the other benchmarks). The generator has random weights with a random (not zero)
classifier, so sampling draws real, varied codes; speed does not depend on what was learned. On a GPU the base
preset is measured the same way (pass --preset base).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import matmul_peak  # noqa: E402  (the same peak measurement as the other benchmarks)

import unitok  # noqa: E402,F401
from unitok.generator.config import GeneratorConfig  # noqa: E402
from unitok.generator.model import TokenGenerator  # noqa: E402
from unitok.generator.trainer import GeneratorTrainConfig  # noqa: E402
from unitok.tokenizer.model import UniTok  # noqa: E402
from unitok.training.machine import REFERENCE_GFLOPS, training_autocast, uses_bf16  # noqa: E402

REFERENCE_PEAK = REFERENCE_GFLOPS * 1e9   # FLOP/s of the 2-core machine the README's times refer to
ROOT = Path(__file__).resolve().parents[1]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(preset: str, device):
    if preset == "tiny":
        tok = UniTok.from_pretrained(ROOT / "data" / "tiny-shapes")
    else:   # the base tokenizer's shapes (random weights: only the text tower and sizes matter here)
        tok = UniTok.from_preset("base")
    tok = tok.to(device).eval()
    torch.manual_seed(0)
    gen = TokenGenerator(GeneratorConfig.preset(preset, tokenizer=tok), tok).to(device)
    torch.nn.init.normal_(gen.classifier.weight, std=0.05)
    return tok, gen


def time_training(gen, tok, batch: int, steps: int, device, cpu_bf16: str = "off") -> dict:
    """Median training step; on a GPU under bf16 autocast, on the CPU as `cpu_bf16` says (unitok.training.machine)."""
    cfg = gen.config
    opt = torch.optim.AdamW(gen.parameters(), lr=1e-4, fused=device.type == "cuda")
    codes = torch.randint(0, cfg.codebook_size, (batch, cfg.grid_size, cfg.grid_size, cfg.num_codebooks),
                          device=device)
    ids = tok.tokenize([f"a small red circle number {i}" for i in range(batch)])
    times = []
    for i in range(steps + 1):   # the first step warms up
        _sync(device)
        start = time.perf_counter()
        with training_autocast(device, amp=True, cpu_bf16=cpu_bf16):
            out = gen(codes, gen.text_states_from_ids(ids))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        _sync(device)
        times.append(time.perf_counter() - start)
    step = statistics.median(times[1:])
    return {"seconds_per_step": step, "images_per_second": batch / step,
            "bf16": uses_bf16(device, True, cpu_bf16)}


def time_sampling(gen, batch: int, use_cache: bool, device, repeats: int = 1) -> float:
    prompts = [f"a red star" for _ in range(batch)]
    gen.generate(prompts=prompts[:1], num=1, cfg_scale=3.0, use_cache=use_cache)   # warm-up
    times = []
    for r in range(repeats):
        _sync(device)
        start = time.perf_counter()
        gen.generate(prompts=prompts, num=1, cfg_scale=3.0, seed=r, use_cache=use_cache)
        _sync(device)
        times.append(time.perf_counter() - start)
    return batch / min(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=["tiny", "base"])
    ap.add_argument("--batch", type=int, default=GeneratorTrainConfig.batch_size, help="training batch")
    ap.add_argument("--steps", type=int, default=5, help="timed training steps (median)")
    ap.add_argument("--sample-batch", type=int, nargs="+", default=[16, 64], help="images per sampling call")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    peak_before = matmul_peak(device)
    tok, gen = build(args.preset, device)
    results = {"preset": args.preset, "device": str(device), "threads": torch.get_num_threads(),
               "parameters": gen.num_parameters()}
    defaults = GeneratorTrainConfig()
    train = time_training(gen, tok, args.batch, args.steps, device, defaults.cpu_bf16)   # as the trainer runs
    default_steps = defaults.steps
    results["train"] = dict(train, batch=args.batch)
    if device.type == "cpu" and train["bf16"]:   # and fp32 next to it, for the ratio
        results["train_fp32"] = dict(time_training(gen, tok, args.batch, args.steps, device, "off"), batch=args.batch)
    sampling = []
    for b in args.sample_batch:
        cached = time_sampling(gen, b, True, device)
        recompute = time_sampling(gen, b, False, device)
        sampling.append({"batch": b, "cached_images_per_second": cached,
                         "recompute_images_per_second": recompute, "speedup": cached / recompute})
    results["sampling"] = sampling
    peak_after = matmul_peak(device)
    peak = (peak_before + peak_after) / 2
    results["matmul_peak_flops"] = {"before": peak_before, "after": peak_after}
    scale = peak / REFERENCE_PEAK if device.type == "cpu" else float("nan")
    print(f"{args.preset} generator ({gen.num_parameters() / 1e6:.2f} M params) on {device}, "
          f"{torch.get_num_threads()} threads")
    print(f"fp32 matmul peak (2048^3, this process): {peak_before / 1e9:.0f} GFLOP/s before the timings, "
          f"{peak_after / 1e9:.0f} GFLOP/s after")
    print(f"training: {train['images_per_second']:.1f} images/s ({train['seconds_per_step']:.3f} s per step of "
          f"{args.batch}); the default {default_steps} steps: {default_steps * train['seconds_per_step'] / 60:.1f} "
          f"min here" + (f", {default_steps * train['seconds_per_step'] * scale / 60:.1f} min at "
                         f"{REFERENCE_PEAK / 1e9:.0f} GFLOP/s" if device.type == "cpu" else "")
          + (" (bf16 autocast)" if train["bf16"] else ""))
    if "train_fp32" in results:
        fp32 = results["train_fp32"]
        print(f"training in fp32 (cpu_bf16=off): {fp32['seconds_per_step']:.3f} s per step; bf16 is "
              f"{fp32['seconds_per_step'] / train['seconds_per_step']:.2f}x faster")
    for s in sampling:
        print(f"sampling, batch {s['batch']:3d} (CFG on): KV cache {s['cached_images_per_second']:.2f} images/s, "
              f"recompute {s['recompute_images_per_second']:.2f} images/s: cache {s['speedup']:.1f}x faster")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
