"""The judge of generated shapes images: `ShapeClassifier`, a small CNN with a colour head and a shape head.

    >>> classifier = load_shape_classifier(32)       # trained on first use (one to two minutes), then cached
    >>> classifier.predict(images)                   # {"colour": (B,), "shape": (B,)} indices
    >>> classifier.accuracy                          # on unseen real test-split and held-out-pair images

It is trained once on real single-object shapes renders only (every colour x shape pair, held-out pairs included:
it is the measuring instrument, not the model under test) and cached under `unitok.data.files.default_cache_dir()`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.bundled import BUNDLED_SHAPE_CLASSIFIER
from ..data.files import default_cache_dir
from ..data.shapes_dataset import ShapesDataset
from ..checkpoint import atomic_write, load_state_dict_checked, read_torch


class ShapeClassifier(nn.Module):
    """A small CNN reading the primary object's colour and shape: images (B, 3, S, S) in [-1, 1] ->
    {"colour": (B, 8) logits, "shape": (B, 8) logits}."""

    def __init__(self, width: int = 32):
        super().__init__()

        def conv(i, o, s):
            return nn.Sequential(nn.Conv2d(i, o, 3, s, 1), nn.BatchNorm2d(o), nn.ReLU(inplace=True))

        self.features = nn.Sequential(conv(3, width, 1), conv(width, width, 1), conv(width, 2 * width, 2),
                                      conv(2 * width, 2 * width, 1), conv(2 * width, 4 * width, 2),
                                      conv(4 * width, 4 * width, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.colour = nn.Linear(4 * width, len(ShapesDataset.COLOURS))
        self.shape = nn.Linear(4 * width, len(ShapesDataset.SHAPES))

    def forward(self, images: torch.Tensor) -> dict:
        f = self.features(images)
        return {"colour": self.colour(f), "shape": self.shape(f)}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict:
        """images (B, 3, S, S) -> {"colour": (B,), "shape": (B,)} predicted indices."""
        self.eval()
        device = next(self.parameters()).device
        out = {"colour": [], "shape": []}
        for start in range(0, len(images), batch_size):
            logits = self(images[start:start + batch_size].to(device).float())
            for k in out:
                out[k].append(logits[k].argmax(-1).cpu())
        return {k: torch.cat(v) for k, v in out.items()}


def real_images(split: str, n: int, image_size: int, seed: int) -> tuple:
    """`n` real single-object shapes images of a split -> (images (n, 3, S, S) in [-1, 1], labels
    {name: (n,)}): what the classifier is trained and checked on, and the reference for samples."""
    ds = ShapesDataset(image_size, split, length=n, seed=seed, max_objects=1)
    batch = torch.utils.data.default_collate([ds[i] for i in range(n)])
    return batch["image"], batch["labels"]


def load_shape_classifier(image_size: int = 32, cache_dir: Optional[Union[str, Path]] = None, steps: int = 600,
                          progress: bool = True) -> ShapeClassifier:
    """The cached classifier for this image size, trained on first use (one to two minutes on 2 CPU cores); the
    repository ships the 32 px, 600-step one in data/shape-classifier/, so notebooks and commands skip that.

    Trained on 12 000 real single-object images: train split plus the held-out-pair split (every colour x shape
    pair). `classifier.accuracy` holds its accuracy on 1000 unseen test-split images and 500 held-out-pair images.
    """
    from tqdm.auto import tqdm

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / f"shape_classifier_{image_size}px_{steps}steps_v1.pt"   # a quick (smoke) one never replaces it
    bundled = BUNDLED_SHAPE_CLASSIFIER / path.name     # shipped in data/: the same seeded training, done once
    if cache_dir is None and bundled.is_file():
        path = bundled
    model = ShapeClassifier()
    if path.is_file():
        state = read_torch(path, what="a cached shape classifier")
        load_state_dict_checked(model, state["model"])
        model.accuracy = state["accuracy"]
        return model.eval()
    g = torch.Generator().manual_seed(0)
    torch_state = torch.get_rng_state()
    torch.manual_seed(0)
    model = ShapeClassifier()   # built after seeding: the same starting weights in every process
    xa, la = real_images("train", 9000, image_size, seed=101)
    xb, lb = real_images("heldout", 3000, image_size, seed=101)
    x = torch.cat([xa, xb])
    y = {k: torch.cat([la[k], lb[k]]) for k in ("colour", "shape")}
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    # callers may hold torch.no_grad() (evaluate_samples does): training the classifier needs gradients
    with torch.enable_grad():
        model.train()
        for _ in tqdm(range(steps), desc="shape classifier", disable=not progress):
            idx = torch.randint(0, len(x), (64,), generator=g)
            xb_ = x[idx]
            if torch.rand(1, generator=g).item() < 0.5:   # mirror: no shape here depends on left/right
                xb_ = xb_.flip(-1)
            out = model(xb_ + 0.03 * torch.randn(xb_.shape, generator=g))  # a little noise: samples are not pristine
            loss = F.cross_entropy(out["colour"], y["colour"][idx]) + F.cross_entropy(out["shape"], y["shape"][idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    torch.set_rng_state(torch_state)
    accuracy = {}
    for split, n in (("test", 1000), ("heldout", 500)):
        xt, lt = real_images(split, n, image_size, seed=202)
        pred = model.predict(xt)
        for k in ("colour", "shape"):
            accuracy[f"{k}_{split}"] = float((pred[k] == lt[k]).float().mean())
    model.accuracy = accuracy
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save({"model": model.state_dict(), "accuracy": accuracy}, tmp))
    return model.eval()
