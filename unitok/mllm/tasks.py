"""The unified model's training data: shapes scenes encoded once by the frozen tokenizer and cached.

    >>> train_set = encode_scenes(tokenizer, "train", 12_000)    # tqdm bar the first time, then from the cache
    >>> train_set.images([0, 1], continuous=False)               # (2, N, k) int64 codes
    >>> train_set.records[0]                                     # `unitok.data.scene_text.scene_record`

Images of a split are encoded once by the frozen tokenizer and cached (codes, and the continuous features when the
model reads those) with their scene descriptions under `unitok.data.files.default_cache_dir()/mllm/`; the file
name carries the tokenizer's weight hash. Every training sequence is then built on the fly from a scene
(`unitok.data.scene_text`: captions, prompts, questions).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Union

import torch

from ..data.files import default_cache_dir
from ..data.shapes_dataset import ShapesDataset
from ..data.scene_text import scene_record
from ..checkpoint import atomic_write, read_torch, tokenizer_hash


@dataclass
class SceneSet:
    """Encoded images of one split: codes (n, N, k) int16, optional features (n, N, F) float16, records."""
    codes: torch.Tensor
    records: List[dict]
    features: Optional[torch.Tensor] = None
    split: str = "train"

    def __len__(self) -> int:
        return len(self.records)

    def image(self, i: int, continuous: bool) -> torch.Tensor:
        return self.features[i].float() if continuous else self.codes[i].long()

    def images(self, index, continuous: bool) -> torch.Tensor:
        index = torch.as_tensor(index, dtype=torch.long)
        return self.features[index].float() if continuous else self.codes[index].long()


@torch.no_grad()
def encode_scenes(tokenizer, split: str = "train", num_images: int = 20_000, seed: int = 0,
                  max_objects: int = 2, features: Optional[str] = None, batch_size: int = 256,
                  cache_dir: Optional[Union[str, Path]] = None, progress: bool = True,
                  digest: Optional[str] = None) -> SceneSet:
    """Render `num_images` shapes scenes of a split, encode them with the frozen tokenizer (codes, and features
    "latent" / "encoder" when asked), or load them from the cache."""
    from tqdm.auto import tqdm

    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if features not in (None, "latent", "encoder"):
        raise ValueError(f"features must be None, 'latent' or 'encoder', got {features!r}")
    digest = digest or tokenizer_hash(tokenizer)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    size = tokenizer.config.image_size
    path = (cache / "mllm" / f"shapes-{split}-{num_images}-seed{seed}-obj{max_objects}-{features or 'codes'}-"
            f"{size}px-{digest[:16]}.pt")
    if path.is_file():
        state = read_torch(path, what="a cached scene file")
        if state.get("tokenizer_sha256") == digest:
            return SceneSet(state["codes"], state["records"], state.get("features"), split)
    ds = ShapesDataset(size, split, length=num_images, seed=seed, max_objects=max_objects)
    device = tokenizer.logit_scale.device
    tokenizer.eval()
    codes, feats, records = [], [], []
    for start in tqdm(range(0, num_images, batch_size), desc=f"encoding shapes/{split}", disable=not progress):
        idx = range(start, min(num_images, start + batch_size))
        scenes = [ds.scene(i) for i in idx]
        images = torch.stack([torch.from_numpy(ds.render(s)) for s in scenes]).to(device)
        records += [scene_record(s) for s in scenes]
        codes.append(tokenizer.encode(images).flatten(1, 2).to("cpu", torch.int16))
        if features == "latent":
            feats.append(tokenizer.encode_latent(images).to("cpu", torch.float16))
        elif features == "encoder":
            feats.append(tokenizer.encoder(images).to("cpu", torch.float16))
    state = {"codes": torch.cat(codes), "records": records, "tokenizer_sha256": digest,
             "features": torch.cat(feats) if feats else None}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    return SceneSet(state["codes"], records, state["features"], split)
