"""Codes, extracted once and cached: a frozen tokenizer's codes for a dataset split, the generator's training data.

    >>> train = extract_codes(tokenizer, "shapes", "train", 20_000)   # tqdm bar the first time, then from the cache
    >>> train.batch([0, 1])["codes"].shape                            # (2, H, W, k) int64
    >>> codes, evals = extract_run_codes(tokenizer, "shapes", train_config)   # what a training run uses

Codes are extracted once from the frozen tokenizer (`extract_codes`, with a progress bar) and cached on disk under
`unitok.data.files.default_cache_dir()/codes/`; the file name carries the tokenizer's weight hash, so a changed
tokenizer never reuses stale codes. `blank_plain_codes` (with `plain_colour_mask`) gives plain patches the codes of
their colour alone as they are extracted (`GeneratorTrainConfig.plain_codes`, one of `PLAIN_CODES`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Union

import torch

from ..data.datasets import build_dataset
from ..data.files import default_cache_dir
from ..data.shapes_dataset import ShapesDataset
from ..checkpoint import atomic_write, read_torch, tokenizer_hash

PLAIN_CODES = ("tokenizer", "background", "plain")   # GeneratorTrainConfig.plain_codes, `blank_plain_codes`


class CodeSet(torch.utils.data.Dataset):
    """Tokenized images: codes (N, H, W, k) int16, text token ids (N, L) int32, labels {name: (N,) int64},
    captions (N strings). Item i -> {"codes": (H, W, k) int64, "ids": (L,), "labels": {...}, "caption": str}."""

    def __init__(self, codes: torch.Tensor, ids: torch.Tensor, labels: Dict[str, torch.Tensor], captions: List[str],
                 info: Optional[dict] = None):
        self.codes, self.ids, self.labels, self.captions = codes, ids, labels, list(captions)
        self.info = dict(info or {})

    def __len__(self) -> int:
        return self.codes.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"codes": self.codes[i].long(), "ids": self.ids[i].long(),
                "labels": {k: v[i] for k, v in self.labels.items()}, "caption": self.captions[i]}

    def batch(self, index) -> dict:
        """Gather many items at once (faster than collating): codes (B, H, W, k) int64, ids (B, L) int64, labels."""
        index = torch.as_tensor(index, dtype=torch.long)
        return {"codes": self.codes[index].long(), "ids": self.ids[index].long(),
                "labels": {k: v[index] for k, v in self.labels.items()},
                "caption": [self.captions[i] for i in index.tolist()]}


def _dataset_for(data: str, image_size: int, split: str, num_images: int, seed: int, p_no_colour: float):
    """The first `num_images` images of a dataset split, the ones `extract_codes` encodes."""
    if data == "shapes":
        # held-out pairs appear only as single objects, so the seen-pair sets are single-object too: every set then
        # measures the same kind of picture
        return ShapesDataset(image_size, split, length=num_images, seed=seed,
                             max_objects=None if split == "train" else 1, p_no_colour=p_no_colour)
    ds = build_dataset(data, image_size, split=split)
    return torch.utils.data.Subset(ds, range(min(num_images, len(ds))))


@torch.no_grad()
def extract_codes(tokenizer, data: str = "shapes", split: str = "train", num_images: int = 20_000, seed: int = 0,
                  batch_size: int = 256, cache_dir: Optional[Union[str, Path]] = None, progress: bool = True,
                  digest: Optional[str] = None, p_no_colour: float = 0.0,
                  plain_codes: str = "tokenizer") -> CodeSet:
    """Encode `num_images` images of a dataset split with the frozen tokenizer, or load them from the cache.

    The cache file is `<cache_dir>/codes/<data>-<split>-<n>-seed<seed>-<px>[-pnc<p>][-blank<plain_codes>]-<hash>.pt`
    with the tokenizer's weight hash; `digest` is its `tokenizer_hash` when already known (it is recomputed
    otherwise). `p_no_colour` (shapes
    only): the share of captions that leave the colours out; 0 (the default) names every colour, since a
    text-to-image model can only learn to draw what its captions say (the tokenizer trains on 0.5).
    `plain_codes`: "background" / "plain" give plain patches the codes of their colour alone (`blank_plain_codes`).
    """
    from tqdm.auto import tqdm

    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    digest = digest or tokenizer_hash(tokenizer)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    captions = f"-pnc{p_no_colour:g}" if data == "shapes" else ""
    blank = "" if plain_codes == "tokenizer" else f"-blank{plain_codes}"
    path = cache / "codes" / (f"{data}-{split}-{num_images}-seed{seed}-{tokenizer.config.image_size}px{captions}"
                              f"{blank}-{digest[:16]}.pt")
    if path.is_file():
        state = read_torch(path, what="a cached code file")
        if state.get("tokenizer_sha256") == digest:
            return CodeSet(state["codes"], state["ids"], state["labels"], state["captions"],
                           {"cache": str(path), "tokenizer_sha256": digest})
    ds = _dataset_for(data, tokenizer.config.image_size, split, num_images, seed, p_no_colour)
    device = tokenizer.logit_scale.device
    was_training = tokenizer.training
    tokenizer.eval()
    codes, ids, captions, labels = [], [], [], {}
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)
    for batch in tqdm(loader, desc=f"tokenizing {data}/{split}", disable=not progress):
        images = batch["image"].to(device)
        grid = tokenizer.encode(images)
        grid = blank_plain_codes(tokenizer, images, grid, plain_codes)
        codes.append(grid.to("cpu", torch.int16))
        ids.append(tokenizer.tokenize(list(batch["caption"])).to(torch.int32))
        captions.extend(batch["caption"])
        for k, v in batch["labels"].items():
            labels.setdefault(k, []).append(v.long())
    tokenizer.train(was_training)
    state = {"codes": torch.cat(codes), "ids": torch.cat(ids), "labels": {k: torch.cat(v) for k, v in labels.items()},
             "captions": captions, "tokenizer_sha256": digest}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    return CodeSet(state["codes"], state["ids"], state["labels"], captions, {"cache": str(path),
                                                                            "tokenizer_sha256": digest})


def extract_run_codes(tokenizer, data: str, train, digest: Optional[str] = None, progress: bool = True) -> tuple:
    """The codes a training run uses -> (train CodeSet, {"test": CodeSet[, "heldout": CodeSet for shapes]}).
    `train`: the run's `unitok.generator.trainer.GeneratorTrainConfig` (its images, seed and code options)."""
    kw = dict(progress=progress, digest=digest, p_no_colour=train.p_no_colour,
              plain_codes=train.plain_codes)
    codes = extract_codes(tokenizer, data, "train", train.train_images, train.seed, **kw)
    splits = ("test", "heldout") if data == "shapes" else ("test",)
    return codes, {s: extract_codes(tokenizer, data, s, train.eval_images, train.seed, **kw) for s in splits}


def plain_colour_mask(images: torch.Tensor, patch: int, tol: float = 0.02,
                      among: Optional[torch.Tensor] = None) -> tuple:
    """images (B, C, S, S) -> (mask (B, S/patch, S/patch) bool, colour (B, C)): the patches of one plain colour
    and that colour. A patch is plain when no pixel is more than `tol` from the patch's mean in any channel; the
    colour is the per-channel median of the means of the plain patches (of those in `among`, a (B, g, g) mask, when
    given), so the first call finds the background, which covers most of a picture; `mask` holds the plain patches
    whose mean lies within `tol` of it. An image with no such patch gets an empty mask."""
    tiles = images.unfold(2, patch, patch).unfold(3, patch, patch)               # (B, C, g, g, p, p)
    mean = tiles.mean((-1, -2))                                                  # (B, C, g, g)
    plain = (tiles - mean[..., None, None]).abs().amax((1, -1, -2)) < tol        # (B, g, g)
    if among is not None:
        plain = plain & among
    means = mean.flatten(2).transpose(1, 2).masked_fill(~plain.flatten(1)[..., None], float("nan"))  # (B, N, C)
    colour = means.nanmedian(1).values.nan_to_num(0.0)                          # (B, C)
    near = (mean - colour[..., None, None]).abs().amax(1) < tol
    return plain & near, colour


@torch.no_grad()
def blank_plain_codes(tokenizer, images: torch.Tensor, codes: torch.Tensor, which: str = "background",
                      tol: float = 0.02, max_colours: int = 4) -> torch.Tensor:
    """images (B, C, S, S), their codes (B, H, W, k) -> codes in which plain patches hold the code the tokenizer
    gives, at that position, to a picture of that one colour alone.

    which: "background" replaces the background's tokens (`plain_colour_mask`); "plain" also every other plain
    patch (an object's flat interior), one colour at a time, up to `max_colours`; "tokenizer" changes nothing.
    The encoder attends over the whole image, so a plain patch's k sub-codes depend on what else is in the picture:
    on the shapes test images 99.4 % of background tokens differ from the blank picture's in at least one
    sub-code, while decoding with the blank picture's codes changes nothing the classifier can see
    (docs/generation.md). One extra encoder pass per colour.
    """
    if which not in PLAIN_CODES:
        raise ValueError(f"plain_codes must be one of {PLAIN_CODES}, got {which!r}")
    patch = tokenizer.config.image_size // tokenizer.config.grid_size
    left = torch.ones(codes.shape[:3], dtype=torch.bool, device=images.device)
    for _ in range(0 if which == "tokenizer" else 1 if which == "background" else max_colours):
        mask, colour = plain_colour_mask(images, patch, tol, among=left)
        if not mask.any():
            break
        blank = tokenizer.encode(colour[..., None, None].expand_as(images).contiguous())
        codes = torch.where(mask[..., None].to(codes.device), blank, codes)
        left = left & ~mask
    return codes
