"""How fast each image-head pooling learns *shape*: a supervised probe of the tiny tokenizer's image path.

    python benchmarks/image_pool.py [--steps 300] [--pools mean max attention] [--lr 5e-4]

Why this exists: the CPU recipe's zero-shot shape accuracy stayed near 50 % after 1200 steps, and neither
reconstruction-free (contrastive-only) training nor a 4x CLIP weight changed that (docs/cpu_recipe.md). This
script takes the contrastive loss and the text tower out of the question: it trains the tiny preset's image path
(encoder -> attention projection -> multi-codebook quantizer -> post-quant projection -> one head block ->
pooling -> fc_norm -> projection) with a plain 8-way cross-entropy on the primary object's shape, from the same
seed on the same batches, once per pooling, and prints test accuracy every 100 steps on 512 single-object test
scenes. A small CNN with global max / mean pooling is the reference point for how easy the task is.

Poolings: "mean" (the reference's head), "max" (`ModelConfig.image_pool="max"`), "attention" (timm's
`AttentionPoolLatent`, a learned query as in SigLIP's MAP head). Deterministic for a seed; one thread recommended
on a shared machine (OMP_NUM_THREADS=1).
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import unitok  # noqa: F401  (applies the torchvision fix before timm is imported)
from unitok.tokenizer.config import get_preset
from unitok.data.datasets import build_dataset
from unitok.tokenizer.model import UniTok


def _batch(ds, start: int, n: int):
    items = [ds[i] for i in range(start, start + n)]
    return torch.stack([it["image"] for it in items]), torch.tensor([it["labels"]["shape"] for it in items])


class TokenizerImagePath(nn.Module):
    """The tiny tokenizer's image path up to the unit-norm CLIP feature, with a chosen pooling."""

    def __init__(self, pool: str):
        super().__init__()
        cfg = dataclasses.replace(get_preset("tiny").model, image_pool="max" if pool == "max" else "mean")
        self.tok = UniTok(cfg)
        self.pool = pool
        if pool == "attention":
            from timm.layers import AttentionPoolLatent

            self.attn_pool = AttentionPoolLatent(cfg.width, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio)

    def forward(self, images):
        tok = self.tok
        q = tok.quantize(images)
        tokens = tok.image_blocks(tok.post_quant_proj(q.z_q))
        pooled = self.attn_pool(tokens) if self.pool == "attention" else tok.pool_tokens(tokens)
        return F.normalize(tok.projection(tok.fc_norm(pooled)), dim=-1), q.loss


class SmallCNN(nn.Module):
    """Three 3x3 conv layers and a global pooling: how quickly an architecture with locality learns the task."""

    def __init__(self, pool: str, out_dim: int = 64):
        super().__init__()
        pooling = nn.AdaptiveMaxPool2d(1) if pool == "max" else nn.AdaptiveAvgPool2d(1)
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, 1, 1), nn.GELU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, 1, 1), nn.GELU(),
            nn.MaxPool2d(2), nn.Conv2d(64, 128, 3, 1, 1), nn.GELU(), pooling, nn.Flatten(), nn.Linear(128, out_dim))

    def forward(self, images):
        return F.normalize(self.net(images), dim=-1), torch.zeros(())


def train_probe(model: nn.Module, lr: float, steps: int, train, test, seed: int, every: int = 100) -> list:
    torch.manual_seed(seed)
    head = nn.Linear(64, 8)
    opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=lr, betas=(0.9, 0.95),
                            weight_decay=0.02)
    test_x, test_y = _batch(test, 0, len(test))
    curve = []
    for step in range(1, steps + 1):
        x, y = _batch(train, (step - 1) * 64, 64)
        feats, aux = model(x)
        loss = F.cross_entropy(10.0 * head(feats), y) + aux   # unit-norm features: a fixed scale of 10
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            model.eval()
            with torch.no_grad():
                acc = (head(model(test_x)[0]).argmax(1) == test_y).float().mean().item()
            model.train()
            curve.append((step, acc))
    return curve


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--cnn-lr", type=float, default=2e-3)
    ap.add_argument("--pools", nargs="+", default=["mean", "max", "attention"],
                    choices=["mean", "max", "attention"])
    ap.add_argument("--no-cnn", action="store_true", help="skip the CNN reference point")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    train = build_dataset("shapes", 32, split="train")
    test = build_dataset("shapes", 32, split="test", max_objects=1, length=512)
    runs = [(f"tokenizer, {p} pool", lambda p=p: TokenizerImagePath(p), args.lr) for p in args.pools]
    if not args.no_cnn:
        runs += [(f"small CNN, {p} pool", lambda p=p: SmallCNN(p), args.cnn_lr) for p in ("max", "mean")]
    print(f"supervised 8-way shape probe, batch 64, {args.steps} steps, test = 512 single-object scenes "
          f"(chance 0.125); threads={torch.get_num_threads()}")
    for name, build, lr in runs:
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        curve = train_probe(build(), lr, args.steps, train, test, args.seed)
        accs = "  ".join(f"step {s}: {a:.3f}" for s, a in curve)
        print(f"{name:<26} lr {lr:g}  {accs}  ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
