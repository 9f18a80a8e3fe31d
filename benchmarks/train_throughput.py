"""Training throughput per preset, and how close it gets to the machine's matrix-multiply peak.

    python benchmarks/train_throughput.py [--presets tiny small] [--batch 64] [--steps 5]

For each preset: images/s of a full training step (forward + losses + backward + AdamW) on synthetic batches,
the FLOPs of one step counted by torch's FlopCounterMode, and the achieved FLOP/s as a fraction of the peak
FLOP/s of a large fp32 matmul measured in the same process (so the ratio is meaningful on a noisy machine).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import unitok
from unitok.config import get_preset
from unitok.losses import UniTokLoss


def matmul_peak(device, size=2048, repeats=5) -> float:
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 / min(times[1:])


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(preset_name, batch, steps, device):
    preset = get_preset(preset_name)
    torch.manual_seed(0)
    model = unitok.UniTok(preset.model).to(device)
    # The LPIPS term of base/paper costs the same with random VGG weights, and a benchmark must not need the file.
    perceptual = None
    if preset.model.lpips_weight:
        from unitok.discriminator import build_lpips

        perceptual = build_lpips("random")
    loss_fn = UniTokLoss(preset.model, perceptual=perceptual)
    # fused, as the trainer runs it (unitok.train): on CPU the per-tensor loop took ~10 % of a tiny step
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-6,
                            fused=device.type in ("cuda", "cpu"))
    s = preset.model.image_size
    images = torch.rand(batch, 3, s, s, device=device) * 2 - 1
    texts = [f"a small red circle number {i}" for i in range(batch)]
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with amp:
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
    return {"preset": preset_name, "batch": batch, "step_s": t, "images_per_s": batch / t,
            "gflop_per_step": flops / 1e9, "achieved_flops": flops / t}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=None, help="default: tiny small (CPU), tiny small base (GPU)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    presets = args.presets or (["tiny", "small", "base"] if device.type == "cuda" else ["tiny", "small"])
    peak = matmul_peak(device)
    print(f"device {device}, {torch.get_num_threads()} threads, fp32 matmul peak {peak / 1e9:.1f} GFLOP/s "
          f"(2048^3, best of 5{', TF32 allowed' if device.type == 'cuda' else ''})")
    rows = []
    for name in presets:
        r = measure(name, args.batch, args.steps, device)
        rows.append(r)
        print(f"  {name:6s} batch {r['batch']:3d}: {r['step_s'] * 1e3:8.1f} ms/step  {r['images_per_s']:8.1f} images/s  "
              f"{r['gflop_per_step']:8.1f} GFLOP/step  {r['achieved_flops'] / 1e9:8.1f} GFLOP/s = "
              f"{r['achieved_flops'] / peak:.2f} x matmul peak")
    return rows


if __name__ == "__main__":
    main()
