"""Training throughput per preset: eager and compiled, fp32 and bf16, against the matmul peak of each precision.

    python benchmarks/train_throughput.py [--presets tiny small] [--batch 64] [--steps 5] [--no-compile]

For each preset and each of {eager, compiled} x {fp32, bf16 autocast}: a full training step as the trainer runs it
(real `shapes` batches with their hard-negative captions, tokenized before the forward pass; forward, losses,
backward, fused AdamW), its FLOPs counted by torch's FlopCounterMode, the achieved FLOP/s as a fraction of the
peak of a large matmul **in the same precision**, measured in this run (fp32 and bf16 before the timings, again
after: the lower of the two is used, so a busy moment does not flatter the fraction), and, for a compiled step,
the compilation time of its first two steps and how many steps it takes to earn that time back.

On the CPU bf16 means the trainers' bf16 autocast with the math attention kernel (`cpu_bf16="on"`); where the CPU
has bf16 matrix hardware (AMX, or AVX-512 BF16) its bf16 peak is several times its fp32 peak. On a GPU the fp32
row runs with TF32 allowed, and "of peak" for bf16 is the model FLOPs utilisation (MFU) against the measured
dense bf16 matmul peak.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import unitok
from unitok.data.datasets import build_dataset
from unitok.tokenizer.config import get_preset
from unitok.training import machine
from unitok.training.losses import UniTokLoss
from unitok.training.machine import training_autocast

COMPILING_STEPS = 2   # as the trainer base: the first two compiled steps compile (the second once more)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, size=2048, repeats=5) -> float:
    """The fp32 matmul peak in FLOP/s (not GFLOP/s: the benchmarks' numbers are FLOP/s throughout), measured by the
    library's `unitok.training.machine.matmul_peak`; the other benchmarks import it from here."""
    return machine.matmul_peak(size=size, repeats=repeats, device=device) * 1e9


def peaks(device) -> dict:
    """{"fp32": FLOP/s, "bf16": FLOP/s} of a 2048-cube matmul on `device` right now (best of 5)."""
    return {name: machine.matmul_peak(size=2048, repeats=5, device=device, dtype=dtype) * 1e9
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}


def real_batch(preset, batch: int, device):
    """`batch` training scenes of `shapes` -> (images (B, 3, S, S), caption ids (2B, L)): each image's caption,
    then its hard negative (the shape swapped), as the tokenizer trainer feeds them."""
    data = build_dataset("shapes", preset.model.image_size, split="train")
    items = [data[i] for i in range(batch)]
    images = torch.stack([item["image"] for item in items]).to(device)
    texts = [item["caption"] for item in items]
    if preset.model.hard_negative_weight:
        texts += [item["negative_caption"] for item in items]
    return images, texts


def measure(preset_name: str, batch: int, steps: int, device, bf16: bool, compiled: bool, backend: str) -> dict:
    """One preset's training step in one setting -> its time, FLOPs, and (compiled) compilation seconds."""
    preset = get_preset(preset_name)
    torch.manual_seed(0)
    model = unitok.UniTok(preset.model).to(device)
    perceptual = None
    if preset.model.lpips_weight:   # base/paper: LPIPS costs the same with random VGG weights; no file needed
        from unitok.training.discriminator import build_lpips

        perceptual = build_lpips("random").to(device)
    loss_fn = UniTokLoss(preset.model, perceptual=perceptual)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-6, fused=True)
    images, texts = real_batch(preset, batch, device)
    ids = model.tokenize(texts).to(device)   # outside the compiled region, as in the trainer
    forward = torch.compile(model, backend=backend) if compiled else model

    def step(module=forward):
        with training_autocast(device, amp=bf16, cpu_bf16="on" if bf16 else "off", model=model):
            out = module(images, ids)
        loss = loss_fn(out, images)["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0, foreach=True)
        opt.step()

    def timed():
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        return time.perf_counter() - start

    first = [timed() for _ in range(COMPILING_STEPS if compiled else 1)]   # compilation, or a warm-up
    counter = FlopCounterMode(display=False)
    with counter:   # counted on the eager model: the same arithmetic, and every op is seen
        step(model)
    times = [timed() for _ in range(steps)]
    t = statistics.median(times)
    return {"preset": preset_name, "precision": "bf16" if bf16 else "fp32", "mode": "compiled" if compiled else "eager",
            "batch": batch, "step_s": t, "images_per_s": batch / t, "flops": counter.get_total_flops(),
            "compile_s": sum(first) - t * len(first) if compiled else 0.0}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=None, help="default: tiny small (CPU), tiny small base (GPU)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-compile", action="store_true", help="eager only")
    ap.add_argument("--fp32-only", action="store_true", help="skip bf16 autocast")
    ap.add_argument("--backend", default="inductor", choices=torch._dynamo.list_backends(exclude_tags=()),
                    metavar="BACKEND", help="torch.compile backend (default: inductor, the trainers')")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    presets = args.presets or (["tiny", "small", "base"] if device.type == "cuda" else ["tiny", "small"])
    precisions = [False] if args.fp32_only else [False, True]
    modes = [False] if args.no_compile else [False, True]
    before = peaks(device)
    rows = [measure(name, args.batch, args.steps, device, bf16, compiled, args.backend)
            for name in presets for bf16 in precisions for compiled in modes]
    after = peaks(device)
    peak = {k: min(before[k], after[k]) for k in before}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device {device} ({name}); matmul peak 2048^3 fp32 {before['fp32'] / 1e9:.1f} -> {after['fp32'] / 1e9:.1f}, "
          f"bf16 {before['bf16'] / 1e9:.1f} -> {after['bf16'] / 1e9:.1f} GFLOP/s (before -> after the timings; "
          f"the lower is used){', TF32 allowed' if device.type == 'cuda' else ''}")
    print(f"{'preset':6s} {'precision':9s} {'mode':8s} {'ms/step':>8s} {'images/s':>9s} {'GFLOP/step':>10s} "
          f"{'GFLOP/s':>8s} {'of its peak':>11s} {'of fp32 peak':>12s} {'compile s':>9s}")
    for r in rows:
        achieved = r["flops"] / r["step_s"]
        print(f"{r['preset']:6s} {r['precision']:9s} {r['mode']:8s} {r['step_s'] * 1e3:8.1f} {r['images_per_s']:9.1f} "
              f"{r['flops'] / 1e9:10.1f} {achieved / 1e9:8.1f} {achieved / peak[r['precision']]:10.2f}x "
              f"{achieved / peak['fp32']:11.2f}x {r['compile_s']:9.1f}")
    for preset in presets:
        base = next(r for r in rows if r["preset"] == preset and r["precision"] == "fp32" and r["mode"] == "eager")
        for r in rows:
            if r["preset"] != preset or r is base:
                continue
            line = f"{preset:6s} {r['precision']} {r['mode']} against fp32 eager: {base['step_s'] / r['step_s']:.2f}x step speed"
            if r["mode"] == "compiled":
                eager = next(e for e in rows if e["preset"] == preset and e["precision"] == r["precision"]
                             and e["mode"] == "eager")
                saved = eager["step_s"] - r["step_s"]
                line += (f"; against {r['precision']} eager {eager['step_s'] / r['step_s']:.2f}x, compilation earned back "
                         + (f"after {r['compile_s'] / saved:.0f} steps" if saved > 0 else "never (not faster)"))
            print(line)
    return rows


if __name__ == "__main__":
    main()
