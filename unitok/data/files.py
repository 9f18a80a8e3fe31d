"""Datasets read from files: Fashion-MNIST, your own captioned images (a folder, CSV or JSONL), webdataset shards.

Every item is {"image": (3, S, S) float32 in [-1, 1], "caption": str, "labels": dict} (see `unitok.data.datasets`).

- ``FashionMNIST``      real 28x28 grey photos of clothes, read from the Debian package's IDX files (or downloaded).
- ``FolderDataset``     your own images plus a CSV / JSONL file with ``image`` and ``caption`` columns.
- ``WebDataset``        an IterableDataset over image+text tar shards (optional ``webdataset`` package).
- ``default_cache_dir`` where downloaded and derived data go ($UNITOK_DATA_CACHE, else the repository's data/cache/).
"""
from __future__ import annotations

import csv
import functools
import gzip
import io
import json
import math
import os
import random
import re
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .checks import check_image_size, check_index
from .images import IMAGE_EXTENSIONS, pil_to_tensor


def default_cache_dir() -> Path:
    """Where downloaded data goes: $UNITOK_DATA_CACHE, else the repository's git-ignored data/cache/."""
    # this file is <repository>/unitok/data/files.py: three levels up is the repository
    return Path(os.environ.get("UNITOK_DATA_CACHE", Path(__file__).resolve().parents[2] / "data" / "cache"))


# ----------------------------------------------------------------------------------------------------------------
# Fashion-MNIST

FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) of unsigned bytes -> uint8 array of its stated shape."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if array.size != math.prod(shape):
        raise ValueError(f"{path}: header says shape {shape} but holds {array.size} bytes")
    return array.reshape(shape)


def _find_fashion_files(split: str, dirs: list[Path]) -> tuple[Path, Path] | None:
    for folder in dirs:
        for sub in (folder, folder / "FashionMNIST" / "raw"):  # the second is torchvision's layout
            found = []
            for name in _FASHION_FILES[split]:
                candidates = [sub / f"{name}.gz", sub / name]
                found.append(next((p for p in candidates if p.is_file()), None))
            if all(found):
                return found[0], found[1]
    return None


@functools.lru_cache(maxsize=4)
def _load_fashion(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = _read_idx(images_path), _read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"unexpected Fashion-MNIST shapes {images.shape} and {labels.shape} in {images_path.parent}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


class FashionMNIST(torch.utils.data.Dataset):
    """Fashion-MNIST (60 000 train / 10 000 test photos of clothes, 28x28 grey, 10 classes) as captioned RGB.

    Each item: ``image`` (3, image_size, image_size) float32 in [-1, 1] (grey copied to three channels, resized
    bilinearly with antialiasing); ``caption`` e.g. "a black and white photo of a sneaker." (template fixed per
    index); ``labels`` {"class": int index into CLASSES}.

    Files are looked for in ``root`` (if given), then the Debian package's /usr/share/datasets/fashion-mnist, then
    default_cache_dir(); gzipped or not, flat or in torchvision's FashionMNIST/raw/ layout. If none has them,
    torchvision downloads them into the cache (needs network).
    """

    CLASSES = ("t-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
               "ankle boot")
    TEMPLATES = (
        "a photo of a {}.", "a black and white photo of a {}.", "a low resolution photo of a {}.", "a {}.",
        "a picture of a {}.", "a grayscale image of a {}.", "a product photo of a {}.", "a small photo of a {}.",
    )
    SPLITS = ("train", "test")

    def __init__(self, image_size: int = 32, split: str = "train", root: str | os.PathLike | None = None):
        if split not in self.SPLITS:
            raise ValueError(f"FashionMNIST split must be one of {self.SPLITS}, got {split!r}")
        self.image_size, self.split = check_image_size(image_size), split
        dirs = ([Path(root)] if root is not None else []) + [FASHION_MNIST_DEBIAN_DIR, default_cache_dir()]
        paths = _find_fashion_files(split, dirs) or self._download(split, dirs)
        self.images, self.targets = _load_fashion(*paths)  # (N, 28, 28) uint8, (N,) int64
        self.files = paths

    @staticmethod
    def _download(split: str, dirs: list[Path]) -> tuple[Path, Path]:
        cache = default_cache_dir()
        try:
            import torchvision  # lazily: only this fallback needs it (unitok's import fixed it for CPU torch)

            torchvision.datasets.FashionMNIST(str(cache), train=split == "train", download=True)
        except Exception as e:
            raise RuntimeError(
                f"Fashion-MNIST not found in {[str(d) for d in dirs]} and torchvision could not download it "
                f"({type(e).__name__}: {e}). Install the Debian package (apt-get install dataset-fashion-mnist) "
                f"or put the four *-ubyte.gz files in one of those folders."
            ) from e
        paths = _find_fashion_files(split, [cache])
        if paths is None:
            raise RuntimeError(f"torchvision downloaded Fashion-MNIST but its files are not under {cache}")
        return paths

    def __len__(self) -> int:
        return len(self.targets)

    @classmethod
    def zero_shot_tasks(cls) -> dict[str, tuple[list[str], list[str], str]]:
        """name -> (classnames, templates, label_key); one task, "class"."""
        return {"class": (list(cls.CLASSES), list(cls.TEMPLATES), "class")}

    def __getitem__(self, index: int) -> dict:
        index = check_index(index, len(self))
        x = self.images[index].float().div(127.5).sub(1.0)[None, None]  # (1, 1, 28, 28)
        if self.image_size != x.shape[-1]:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        image = x[0].clamp(-1.0, 1.0).repeat(3, 1, 1)  # (3, S, S)
        label = int(self.targets[index])
        template = self.TEMPLATES[random.Random(f"fashion/{self.split}/{index}").randrange(len(self.TEMPLATES))]
        caption = re.sub(r"\ba ([aeiou])", r"an \1", template.format(self.CLASSES[label]))  # "an ankle boot"
        return {"image": image, "caption": caption, "labels": {"class": label}}

    def __repr__(self) -> str:
        return (f"FashionMNIST(image_size={self.image_size}, split={self.split!r}, n={len(self)}, "
                f"from={self.files[0].parent})")


# ----------------------------------------------------------------------------------------------------------------
# Your own images: a folder with an annotation file, or webdataset shards

def _open_image(path: Path, image_size: int) -> torch.Tensor:
    with Image.open(path) as image:
        image.draft("RGB", (2 * image_size, 2 * image_size))  # JPEG: decode at reduced size, much faster
        return pil_to_tensor(image, image_size)


def _read_annotations(path: Path) -> list[dict]:
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:
            return list(csv.DictReader(f))
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        rows = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}, line {number}: expected one JSON object per line ({e})") from e
        return rows
    raise ValueError(f"annotation file must end in .csv or .jsonl, got {path.name!r}")


class FolderDataset(torch.utils.data.Dataset):
    """Your captioned images: items ``image`` (3, image_size, image_size) in [-1, 1], ``caption``, ``labels`` {}.

    ``annotations`` is a CSV or JSONL file with ``image`` and ``caption`` columns (image paths relative to ``root``,
    default the annotation file's folder, unless absolute). It may also be a folder: then a captions.csv /
    captions.jsonl / metadata.jsonl inside it is used, or else every image in it, captioned by a same-named .txt
    file or by its file name ("red_car.png" -> "red car").

    Images are centre-cropped to a square and resized. Missing, unreadable or corrupt images never stop a run: each
    file is checked once here (cheap PIL verify) and skipped; an image that still fails to decode later is replaced
    by the next readable item. Every skip is recorded in ``skipped`` as (path, reason) and announced by a warning.
    """

    ANNOTATION_NAMES = ("captions.csv", "captions.jsonl", "metadata.jsonl", "metadata.csv", "annotations.csv",
                        "annotations.jsonl")

    def __init__(self, annotations: str | os.PathLike, image_size: int = 32, root: str | os.PathLike | None = None):
        self.image_size = check_image_size(image_size)
        self.source = Path(annotations)
        if not self.source.exists():
            raise ValueError(f"FolderDataset expected an annotation file or a folder, but {self.source} does not exist")
        rows, base = self._rows(self.source)
        base = Path(root) if root is not None else base

        self.skipped: list[tuple[str, str]] = []
        self.items: list[tuple[Path, str]] = []
        for row in rows:
            name, caption = str(row.get("image") or "").strip(), str(row.get("caption") or "").strip()
            if not name:  # a JSONL row without the key, or an empty CSV cell
                self.skipped.append(("", "no image path"))
                continue
            path = Path(name) if Path(name).is_absolute() else base / name
            reason = self._check(path, caption)
            if reason:
                self.skipped.append((str(path), reason))
            else:
                self.items.append((path, caption))
        if not self.items:
            raise ValueError(f"no readable images in {self.source} ({len(rows)} listed, {len(self.skipped)} skipped"
                             + (f", e.g. {self.skipped[0][0]}: {self.skipped[0][1]})" if self.skipped else ")"))
        if self.skipped:
            warnings.warn(f"FolderDataset skipped {len(self.skipped)} of {len(rows)} images listed in {self.source} "
                          f"(first: {self.skipped[0][0]}: {self.skipped[0][1]}); see .skipped for all", stacklevel=2)
        self._bad: set[int] = set()  # indices that failed to decode after the construction check

    def _rows(self, source: Path) -> tuple[list[dict], Path]:
        if source.is_dir():
            for name in self.ANNOTATION_NAMES:
                if (source / name).is_file():
                    return self._rows(source / name)
            images = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            rows = []
            for p in images:
                txt = p.with_suffix(".txt")
                if txt.is_file():
                    caption = txt.read_text(encoding="utf-8").strip()
                else:
                    caption = p.stem.replace("_", " ").replace("-", " ")  # "red_car.png" -> "red car"
                rows.append({"image": p.name, "caption": caption})
            if not rows:
                raise ValueError(f"no readable images in {source}: expected image files ({', '.join(IMAGE_EXTENSIONS)})"
                                 f" or an annotation file ({', '.join(self.ANNOTATION_NAMES)})")
            return rows, source
        rows = _read_annotations(source)
        columns = set(rows[0]) if rows else set()
        missing = {"image", "caption"} - columns
        if rows and missing:
            raise ValueError(f"{source} must have columns 'image' and 'caption'; missing {sorted(missing)}, "
                             f"found {sorted(columns)}")
        if not rows:
            raise ValueError(f"no readable images in {source}: the annotation file lists no rows")
        return rows, source.parent

    @staticmethod
    def _check(path: Path, caption: str) -> str | None:
        """Why this row cannot be used, or None; opening + verify reads headers only, so it stays cheap."""
        if not caption:
            return "empty caption"
        if not path.is_file():
            return "missing file"
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as e:
            return f"unreadable image ({type(e).__name__}: {e})"
        return None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        index = check_index(index, len(self))
        # A file that passed verify() can still fail to decode (truncated data): take the next good item instead,
        # deterministically, so one bad file never kills a long run. (With DataLoader workers, each worker keeps
        # its own record of such late failures.)
        for step in range(len(self)):
            j = (index + step) % len(self)
            if j in self._bad:
                continue
            path, caption = self.items[j]
            try:
                return {"image": _open_image(path, self.image_size), "caption": caption, "labels": {}}
            except Exception as e:
                self._bad.add(j)
                self.skipped.append((str(path), f"failed to decode ({type(e).__name__}: {e})"))
                warnings.warn(f"FolderDataset could not decode {path} ({e}); using the next readable image instead")
        raise RuntimeError(f"no readable images left in {self.source}: all {len(self)} failed to decode")

    def __repr__(self) -> str:
        return (f"FolderDataset({str(self.source)!r}, image_size={self.image_size}, n={len(self)}, "
                f"skipped={len(self.skipped)})")


class WebDataset(torch.utils.data.IterableDataset):
    """Image + text tar shards (webdataset format: ``<key>.jpg|png|webp`` with ``<key>.txt``), streamed.

    Yields {"image": (3, image_size, image_size) float32 in [-1, 1], "caption": str, "labels": {}}. ``urls`` is a
    shard path or URL, a brace pattern ("shards/{000..099}.tar"), a list of them, or a folder of .tar files.
    ``shuffle`` > 0 shuffles shards and a buffer of that many samples (seeded; call ``set_epoch`` to vary it).
    Shards are split across DataLoader workers and torch.distributed ranks. Samples without an image or caption,
    or whose image fails to decode, are skipped with a warning and counted in ``skipped`` (per process).
    """

    IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
    TEXT_KEYS = ("txt", "text", "caption")

    def __init__(self, urls, image_size: int = 32, shuffle: int = 0, seed: int = 0):
        try:
            import webdataset  # noqa: F401  (optional dependency: fail here, not in a worker)
        except ImportError as e:
            raise ImportError(
                "WebDataset needs the optional package 'webdataset': pip install unitok[webdataset]") from e
        self.image_size = check_image_size(image_size)
        if isinstance(shuffle, bool) or not isinstance(shuffle, int) or shuffle < 0:
            raise ValueError(f"shuffle must be a buffer size >= 0 (0 = no shuffling), got {shuffle!r}")
        if isinstance(urls, (str, os.PathLike)) and Path(urls).is_dir():
            folder, urls = urls, sorted(str(p) for p in Path(urls).glob("*.tar"))
            if not urls:
                raise ValueError(f"WebDataset expected .tar shards in the folder {folder}, found none")
        elif isinstance(urls, (str, os.PathLike)):
            urls = str(urls)
        elif isinstance(urls, (list, tuple)) and urls:
            urls = [str(u) for u in urls]
        else:
            raise ValueError(f"WebDataset expected a shard path, a brace pattern or a non-empty list, got {urls!r}")
        self.urls, self.shuffle, self.seed, self.epoch = urls, shuffle, int(seed), 0
        self.skipped = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        import webdataset as wds

        seed = self.seed + self.epoch
        pipeline = wds.WebDataset(self.urls, shardshuffle=100 if self.shuffle else False, seed=seed,
                                  nodesplitter=wds.split_by_node, handler=wds.warn_and_continue, empty_check=False)
        if self.shuffle:
            pipeline = pipeline.shuffle(self.shuffle, seed=seed)
        for sample in pipeline:
            image_key = next((k for k in self.IMAGE_KEYS if k in sample), None)
            text_key = next((k for k in self.TEXT_KEYS if k in sample), None)
            where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
            if image_key is None or text_key is None:
                self.skipped += 1
                warnings.warn(f"WebDataset sample {where} has no image or no caption (keys {sorted(sample)}); skipped")
                continue
            try:
                with Image.open(io.BytesIO(sample[image_key])) as image:
                    tensor = pil_to_tensor(image, self.image_size)
            except Exception as e:
                self.skipped += 1
                warnings.warn(f"WebDataset sample {where}: cannot decode {image_key} ({e}); skipped")
                continue
            caption = sample[text_key]
            caption = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
            yield {"image": tensor, "caption": caption.strip(), "labels": {}}

    def __repr__(self) -> str:
        return f"WebDataset({self.urls!r}, image_size={self.image_size}, shuffle={self.shuffle})"
