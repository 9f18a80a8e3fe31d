"""Training throughput per preset, and how close it gets to the machine's matrix-multiply peak.

    python benchmarks/train_throughput.py [--presets tiny small] [--batch 64] [--steps 5]

For each preset: images/s of a full training step (forward + losses + backward + AdamW) on synthetic batches,
the FLOPs of one step counted by torch's FlopCounterMode, and the achieved FLOP/s as a fraction of the peak
FLOP/s of a large fp32 matmul measured in the same process (so the ratio is meaningful on a noisy machine).
On the CPU each preset runs twice, fp32 and bf16 autocast (`--set train.cpu_bf16=on` in the trainers), and the
speed ratio is printed; the fraction stays relative to the *fp32* peak, so a bf16 step can pass 1.0.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import unitok
from unitok.tokenizer.config import get_preset
from unitok.training.losses import UniTokLoss
from unitok.training import machine
from unitok.training.machine import training_autocast


def matmul_peak(device, size=2048, repeats=5) -> float:
    """The fp32 matmul peak in FLOP/s (not GFLOP/s: this file's numbers are FLOP/s throughout), measured by the
    library's `unitok.training.machine.matmul_peak` (best of `repeats` after a warm-up)."""
    return machine.matmul_peak(size=size, repeats=repeats, device=device) * 1e9


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(preset_name, batch, steps, device, bf16=None):
    """One preset's step. bf16: autocast to bfloat16 (None: on CUDA only, as the trainers' default)."""
    preset = get_preset(preset_name)
    torch.manual_seed(0)
    model = unitok.UniTok(preset.model).to(device)
    # The LPIPS term of base/paper costs the same with random VGG weights, and a benchmark must not need the file.
    perceptual = None
    if preset.model.lpips_weight:
        from unitok.training.discriminator import build_lpips

        perceptual = build_lpips("random")
    loss_fn = UniTokLoss(preset.model, perceptual=perceptual)
    # fused, as the trainer runs it (unitok.training.tokenizer_trainer): on CPU the per-tensor loop took ~10 % of a tiny step
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-6,
                            fused=device.type in ("cuda", "cpu"))
    s = preset.model.image_size
    images = torch.rand(batch, 3, s, s, device=device) * 2 - 1
    texts = [f"a small red circle number {i}" for i in range(batch)]
    bf16 = device.type == "cuda" if bf16 is None else bf16

    def amp():  # the trainers' context: on the CPU, bf16 also means the math attention kernel (unitok.training.machine)
        return training_autocast(device, amp=bf16, cpu_bf16="on" if bf16 else "off")

    def step():
        with amp():
            out = model(images, texts)
        loss = loss_fn(out, images)["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    t = statistics.median(times)
    return {"preset": preset_name, "bf16": bf16, "batch": batch, "step_s": t, "images_per_s": batch / t,
            "gflop_per_step": flops / 1e9, "achieved_flops": flops / t}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=None, help="default: tiny small (CPU), tiny small base (GPU)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--fp32-only", action="store_true", help="CPU: skip the bf16 autocast comparison")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    presets = args.presets or (["tiny", "small", "base"] if device.type == "cuda" else ["tiny", "small"])
    peak = matmul_peak(device)
    print(f"device {device}, {torch.get_num_threads()} threads, fp32 matmul peak {peak / 1e9:.1f} GFLOP/s "
          f"(2048^3, best of 5{', TF32 allowed' if device.type == 'cuda' else ''})")
    # CPU: fp32 and bf16 autocast side by side (bf16 matmuls run on AMX/AVX-512-BF16 units where the CPU has them);
    # GPU: bf16 autocast + TF32, as the trainers run it
    precisions = [False, True] if device.type == "cpu" and not args.fp32_only else [None]
    rows = []
    for name in presets:
        by_precision = {}
        for bf16 in precisions:
            r = measure(name, args.batch, args.steps, device, bf16)
            rows.append(r)
            by_precision[r["bf16"]] = r
            print(f"  {name:6s} {'bf16' if r['bf16'] else 'fp32'} batch {r['batch']:3d}: {r['step_s'] * 1e3:8.1f} ms/step  "
                  f"{r['images_per_s']:8.1f} images/s  {r['gflop_per_step']:8.1f} GFLOP/step  "
                  f"{r['achieved_flops'] / 1e9:8.1f} GFLOP/s = {r['achieved_flops'] / peak:.2f} x matmul peak (fp32)")
        if len(by_precision) == 2:
            print(f"  {name:6s} bf16 autocast / fp32 step speed: {by_precision[False]['step_s'] / by_precision[True]['step_s']:.2f}x")
    return rows


if __name__ == "__main__":
    main()
