"""Datasets for UniTok: procedural shapes, Fashion-MNIST, a folder of captioned images, webdataset shards.

Every dataset yields the same item, so torch's ``default_collate`` batches any of them::

    {"image": Tensor (3, H, W) float32 in [-1, 1],  # H == W == image_size
     "caption": str,
     "labels": dict[str, int]}                       # may be {} (folder, webdataset)

- ``ShapesDataset``   coloured shapes drawn on the fly from (seed, split, index): unlimited, captioned, and with a
                      fixed set of colour x shape pairs held out of training to test zero-shot generalisation.
- ``FashionMNIST``    real 28x28 grey photos of clothes, read from the Debian package's IDX files.
- ``FolderDataset``   your own images plus a CSV / JSONL file with ``image`` and ``caption`` columns.
- ``WebDataset``      an IterableDataset over image+text tar shards (optional ``webdataset`` package).

``build_dataset(name, image_size, split, **kwargs)`` picks one by name, ``build_datasets(spec, ...)`` a run's
training and evaluation sets; ``to_uint8_image`` and ``make_grid_image``
turn [-1, 1] tensors into uint8 arrays for PNGs and widgets.
"""
from __future__ import annotations

import csv
import functools
import gzip
import io
import json
import math
import operator
import os
import random
import re
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .shapes import COLOURS, SHAPES, render_scene, rgb

DATASETS = ("shapes", "fashion-mnist", "folder", "webdataset")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _check_image_size(image_size) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8 (pixels per side), got {image_size!r}")
    return int(image_size)


def _check_index(index, length: int) -> int:
    index = operator.index(index)  # accepts numpy / torch integers, refuses floats
    if index < 0:
        index += length
    if not 0 <= index < length:
        raise IndexError(f"index {index} out of range for a dataset of {length} items")
    return index


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


class ShapesDataset(torch.utils.data.Dataset):
    """Coloured shapes on plain backgrounds, rendered on the fly, deterministic from (seed, split, index).

    Each item: ``image`` (3, image_size, image_size) float32 in [-1, 1]; ``caption`` e.g. "a small red triangle on
    the left, on a black background"; ``negative_caption``, the same with the primary object's shape swapped
    ("a small red heart on the left, ...", a hard negative for training); ``labels`` for the primary
    (first-mentioned) object: ``shape``, ``colour``, ``size``, ``position``, ``background`` (indices into SHAPES,
    COLOURS, SIZES, POSITIONS, BACKGROUNDS),
    ``num_objects`` (1 or 2) and ``colour_shape`` (index into COLOUR_SHAPES, = colour * len(SHAPES) + shape).

    Splits: "train" and "test" never contain a held-out colour x shape pair (``heldout_pairs``) in any object;
    "heldout" contains only images whose primary object is a held-out pair. Each split has its own random stream,
    so test images are not training images. A scene does not depend on image_size: index i is the same picture
    (and caption) at 32 and at 256 px.

    Args:
        image_size: pixels per side (>= 16).
        split: "train", "test" or "heldout".
        length: number of items; default 50_000 for "train", 2_000 otherwise.
        seed: selects the stream; same seed, split and index give the identical item.
        max_objects: 1 or 2; default 2 for "train"/"test" and 1 for "heldout". With two objects both are small and
            sit in cells two steps apart on the 3x3 grid (never the centre), so they never overlap.
        p_no_colour: the share of captions that leave the colours out (default ``P_NO_COLOUR``, what the tokenizer
            trains on). Only the captions change: the same random numbers are drawn, so the pictures stay the same.
            A text-to-image generator wants 0 (every caption says what to draw).
    """

    SHAPES, COLOURS = SHAPES, COLOURS
    SIZES = ("small", "large")
    POSITIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
    BACKGROUNDS = ("black", "grey", "dark blue", "dark green", "white")
    COLOUR_SHAPES = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)  # label "colour_shape" indexes this
    SPLITS = ("train", "test", "heldout")

    # 11 of the 64 pairs (~1/6), spread so each colour and each shape keeps at least 6 training partners.
    heldout_pairs = [
        ("red", "star"), ("red", "diamond"), ("green", "heart"), ("blue", "triangle"), ("blue", "heart"),
        ("yellow", "cross"), ("purple", "circle"), ("orange", "square"), ("orange", "cross"),
        ("cyan", "crescent"), ("white", "diamond"),
    ]

    RGB = {
        "red": rgb(235, 45, 45), "green": rgb(50, 200, 70), "blue": rgb(50, 110, 255),
        "yellow": rgb(255, 225, 40), "purple": rgb(170, 70, 230), "orange": rgb(255, 140, 20),
        "cyan": rgb(40, 220, 225), "white": rgb(245, 245, 245),
    }
    BACKGROUND_RGB = {
        "black": rgb(12, 12, 14), "grey": rgb(105, 105, 110), "dark blue": rgb(20, 30, 85),
        "dark green": rgb(20, 65, 35), "white": rgb(235, 235, 230),
    }
    # Object colours that would not stand out on a background; every colour keeps >= 3 backgrounds.
    CLASHES = {"dark blue": {"blue", "purple"}, "dark green": {"green"}, "white": {"white", "yellow", "cyan"}}

    EXTENT = {"small": 0.36, "large": 0.64}  # the object's bounding box as a fraction of the image side
    P_TWO_OBJECTS = 0.4
    P_NO_COLOUR = 0.5  # captions that name the shapes but not their colours (see _caption)
    POSITION_PHRASES = {
        "top left": "in the top left corner", "top": "at the top", "top right": "in the top right corner",
        "left": "on the left", "centre": "in the centre", "right": "on the right",
        "bottom left": "in the bottom left corner", "bottom": "at the bottom",
        "bottom right": "in the bottom right corner",
    }
    ZERO_SHOT_TEMPLATES = (
        "a {}.", "a photo of a {}.", "a small {}.", "a large {}.", "a {} on a plain background.",
        "a picture of a {}.", "there is a {} in the image.", "a drawing of a {}.",
    )

    def __init__(self, image_size: int = 32, split: str = "train", length: int | None = None, seed: int = 0,
                 max_objects: int | None = None, p_no_colour: float | None = None):
        if split not in self.SPLITS:
            raise ValueError(f"ShapesDataset split must be one of {self.SPLITS}, got {split!r}")
        if max_objects is None:
            max_objects = 1 if split == "heldout" else 2
        if max_objects not in (1, 2):
            raise ValueError(f"max_objects must be 1 or 2, got {max_objects!r}")
        if length is None:
            length = 50_000 if split == "train" else 2_000
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
            raise ValueError(f"length must be a positive int, got {length!r}")
        self.image_size = _check_image_size(image_size)
        if self.image_size < 16:
            raise ValueError(f"ShapesDataset needs image_size >= 16 to draw recognisable shapes, got {image_size}")
        self.split, self.length, self.seed, self.max_objects = split, int(length), int(seed), max_objects
        if p_no_colour is None:
            p_no_colour = self.P_NO_COLOUR
        if isinstance(p_no_colour, bool) or not isinstance(p_no_colour, (int, float)) or not 0 <= p_no_colour <= 1:
            raise ValueError(f"p_no_colour must be a number in [0, 1], got {p_no_colour!r}")
        self.p_no_colour = float(p_no_colour)

        heldout = set(self.heldout_pairs)
        self._train_pairs = [(c, s) for c in self.COLOURS for s in self.SHAPES if (c, s) not in heldout]
        self._primary_pairs = list(self.heldout_pairs) if split == "heldout" else self._train_pairs

    def __len__(self) -> int:
        return self.length

    @classmethod
    def zero_shot_tasks(cls) -> dict[str, tuple[list[str], list[str], str]]:
        """name -> (classnames, templates, label_key) for zero-shot classification with the text tower.

        "shape" ("triangle", ...) and "colour_shape" ("red triangle", ...) use generic templates ("a photo of a {}.");
        "colour" ("red", ...) averages over one template per shape ("a {} circle.", ...), because captions never
        name a colour without its shape.
        """
        generic = list(cls.ZERO_SHOT_TEMPLATES)
        return {
            "shape": (list(cls.SHAPES), generic, "shape"),
            "colour": (list(cls.COLOURS), [f"a {{}} {s}." for s in cls.SHAPES], "colour"),
            "colour_shape": (list(cls.COLOUR_SHAPES), generic, "colour_shape"),
        }

    # -- scene sampling: everything random happens here, in fractions of the image side --------------------------

    def _place(self, rng: random.Random, size: str, cell: int) -> tuple[float, float, float]:
        """Centre (cx, cy) and half-extent of an object in cell 0..8 of the 3x3 grid, as fractions of the side."""
        extent = self.EXTENT[size] * rng.uniform(0.92, 1.08)
        max_offset = (1.0 - extent) / 2 - 0.025  # keep the whole object inside the frame, with a margin
        col, row = cell % 3 - 1, cell // 3 - 1
        cx = 0.5 + col * 0.88 * max_offset + rng.uniform(-0.03, 0.03)
        cy = 0.5 + row * 0.88 * max_offset + rng.uniform(-0.03, 0.03)
        clamp = lambda v: min(max(v, 0.5 - max_offset), 0.5 + max_offset)
        return clamp(cx), clamp(cy), extent / 2

    def scene(self, index: int) -> dict:
        """The random choices behind item ``index``, independent of image_size.

        Returns {"objects": [{"shape", "colour", "size", "position", "cx", "cy", "half", "rgb"}, ...],
        "background": name, "background_rgb": (3,) array, "caption": str}; geometry in fractions of the side.
        """
        index = _check_index(index, self.length)
        # Seeding Python's Random with a string is deterministic across processes and fast (~7 us).
        rng = random.Random(f"unitok-shapes/{self.seed}/{self.split}/{index}")
        pairs = [rng.choice(self._primary_pairs)]
        if self.max_objects == 2 and rng.random() < self.P_TWO_OBJECTS:
            pairs.append(rng.choice([p for p in self._train_pairs if p != pairs[0]]))
            # Two small objects in cells two steps apart on the grid (e.g. left and right), so they never touch.
            first = rng.choice([c for c in range(9) if c != 4])
            far = [c for c in range(9) if max(abs(c % 3 - first % 3), abs(c // 3 - first // 3)) == 2]
            layout = [("small", first), ("small", rng.choice(far))]
        else:
            layout = [(rng.choice(self.SIZES), rng.randrange(9))]

        objects = []
        for (colour, shape), (size, cell) in zip(pairs, layout):
            cx, cy, half = self._place(rng, size, cell)
            jitter = np.array([rng.uniform(-0.06, 0.06) for _ in range(3)], np.float32)  # no two reds alike
            objects.append(dict(shape=shape, colour=colour, size=size, position=self.POSITIONS[cell],
                                cx=cx, cy=cy, half=half, rgb=np.clip(self.RGB[colour] + jitter, -1.0, 1.0)))
        colours = {o["colour"] for o in objects}
        background = rng.choice([b for b in self.BACKGROUNDS if not colours & self.CLASHES.get(b, set())])
        bg_rgb = np.clip(self.BACKGROUND_RGB[background] + rng.uniform(-0.04, 0.04), -1.0, 1.0)
        return dict(objects=objects, background=background, background_rgb=bg_rgb,
                    caption=self._caption(rng, objects, background))

    def _caption(self, rng: random.Random, objects: list[dict], background: str) -> str:
        # A share of captions leave the colours out ("a large star on the left"): colour, position and background
        # alone tell most images of a batch apart, so without these the contrastive loss never needs the shape.
        with_colour = rng.random() >= self.p_no_colour

        def phrase(obj, article=True):
            words = ([obj["size"]] if rng.random() < 0.5 else []) + [obj["colour"]] * with_colour + [obj["shape"]]
            text = " ".join(words)
            if article:
                text = f"{_article(text)} {text}"
            if rng.random() < 0.5:
                text += " " + self.POSITION_PHRASES[obj["position"]]
            return text

        bg = background
        if len(objects) == 2:
            a, b = phrase(objects[0]), phrase(objects[1])
            return rng.choice([
                f"{a} and {b}", f"{a} and {b}, on {bg}", f"{a} and {b}, on a {bg} background",
                f"a picture of {a} and {b}", f"two shapes: {a} and {b}, over {bg}",
            ])
        template = rng.randrange(7)
        if template == 0:
            return phrase(objects[0], article=False) + f" over {bg}"  # "large blue circle in the centre over grey"
        obj = phrase(objects[0])
        return [
            None, f"{obj}", f"{obj}, on a {bg} background", f"{obj} on a plain {bg} background",
            f"a picture of {obj}", f"there is {obj} on a {bg} background", f"an image of {obj} against {bg}",
        ][template]

    # -- rendering -------------------------------------------------------------------------------------------------

    def render(self, scene: dict) -> np.ndarray:
        """Draw a scene from ``scene()`` -> (3, image_size, image_size) float32 array in [-1, 1]."""
        n = self.image_size
        objects = [dict(o, cx=o["cx"] * n, cy=o["cy"] * n, half=o["half"] * n) for o in scene["objects"]]  # -> px
        return render_scene(objects, scene["background_rgb"], n)

    def negative_caption(self, index: int, caption: str, shape: str) -> str:
        """The caption with its first mention of ``shape`` (the primary object's) swapped for another shape,
        chosen deterministically from the index: a hard negative that only the shape tells apart."""
        other = random.Random(f"unitok-shapes-negative/{self.seed}/{self.split}/{index}").choice(
            [s for s in self.SHAPES if s != shape])
        return re.sub(rf"\b{shape}\b", other, caption, count=1)

    def __getitem__(self, index: int) -> dict:
        scene = self.scene(index)
        first = scene["objects"][0]
        colour, shape = self.COLOURS.index(first["colour"]), self.SHAPES.index(first["shape"])
        labels = {
            "shape": shape, "colour": colour, "size": self.SIZES.index(first["size"]),
            "position": self.POSITIONS.index(first["position"]),
            "background": self.BACKGROUNDS.index(scene["background"]),
            "num_objects": len(scene["objects"]), "colour_shape": colour * len(self.SHAPES) + shape,
        }
        return {"image": torch.from_numpy(self.render(scene)), "caption": scene["caption"], "labels": labels,
                "negative_caption": self.negative_caption(index, scene["caption"], first["shape"])}

    def __repr__(self) -> str:
        return (f"ShapesDataset(image_size={self.image_size}, split={self.split!r}, length={self.length}, "
                f"seed={self.seed}, max_objects={self.max_objects})")


# ----------------------------------------------------------------------------------------------------------------
# Fashion-MNIST

FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def default_cache_dir() -> Path:
    """Where downloaded data goes: $UNITOK_DATA_CACHE, else the repository's git-ignored data/cache/."""
    return Path(os.environ.get("UNITOK_DATA_CACHE", Path(__file__).resolve().parent.parent / "data" / "cache"))


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
        self.image_size, self.split = _check_image_size(image_size), split
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
        index = _check_index(index, len(self))
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

def _to_8bit(image: Image.Image) -> Image.Image:
    """High-bit-depth and float modes -> "L" with the right brightness (PIL's own convert clips them to 255).

    16-bit greyscale ("I;16*", or "I" holding values above 255) is scaled by 255 / 65535; 32-bit float ("F") is read
    as [0, 1] when its values lie there (the usual convention), else as [0, 255].
    """
    if not (image.mode.startswith("I;16") or image.mode in ("I", "F")):
        return image
    array = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        scale = 255.0 if np.nanmax(array, initial=0.0) <= 1.0 else 1.0
    else:
        scale = 255.0 / 65535.0 if (image.mode.startswith("I;16") or array.max(initial=0) > 255) else 1.0
    array = np.clip(np.nan_to_num(array * scale), 0, 255).round().astype(np.uint8)
    return Image.fromarray(array)  # uint8 (H, W) -> mode "L"


def pil_to_tensor(image: Image.Image, image_size: int) -> torch.Tensor:
    """PIL image of any mode and size -> (3, image_size, image_size) float32 in [-1, 1], centre-cropped square."""
    image = ImageOps.exif_transpose(image)  # phone photos store their rotation in EXIF
    image = _to_8bit(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")  # put transparent pixels on white rather than black
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    image = image.convert("RGB")
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.resize((image_size, image_size), Image.Resampling.BICUBIC,
                         box=(left, top, left + side, top + side))  # crop and resize in one antialiased step
    array = np.asarray(image, dtype=np.float32)  # (S, S, 3) in [0, 255]
    return torch.from_numpy(array).permute(2, 0, 1).div(127.5).sub(1.0).contiguous()


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
        self.image_size = _check_image_size(image_size)
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
        index = _check_index(index, len(self))
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
        self.image_size = _check_image_size(image_size)
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


# ----------------------------------------------------------------------------------------------------------------
# Factory and image helpers

def build_dataset(name: str, image_size: int, split: str = "train", **kwargs) -> torch.utils.data.Dataset:
    """Build a dataset by name (one of DATASETS).

    "shapes": ShapesDataset(image_size, split, length=, seed=, max_objects=)
    "fashion-mnist": FashionMNIST(image_size, split, root=)
    "folder": FolderDataset(path, image_size, root=)             -- path: annotation file or folder
    "webdataset": WebDataset(path or urls, image_size, shuffle=) -- path: shard, pattern, list or folder
    For "folder" and "webdataset" the path names the data, so ``split`` is not used.
    """
    key = str(name).lower().replace("_", "-")
    key = {"fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist", "wds": "webdataset"}.get(key, key)
    if key == "shapes":
        return ShapesDataset(image_size, split, **kwargs)
    if key == "fashion-mnist":
        return FashionMNIST(image_size, split, **kwargs)
    if key in ("folder", "webdataset"):
        path = kwargs.pop("path", None)
        if key == "webdataset" and path is None:
            path = kwargs.pop("urls", None)
        if path is None:
            raise ValueError(f"build_dataset({name!r}) needs path=... (" + (
                "an annotation file or a folder of images)" if key == "folder" else "shards: file, pattern or folder)"))
        cls = FolderDataset if key == "folder" else WebDataset
        return cls(path, image_size, **kwargs)
    raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")


def build_datasets(spec: dict, image_size: int, seed: int = 0):
    """(train dataset, {"recon": ..., "zero_shot": ..., "zero_shot_heldout": ..., "probe_train": ...}) for a run.

    spec: {"name": one of DATASETS, "path": for folder / webdataset, "eval_images": test items (default 1024)}.
    shapes: the test split for reconstruction, its one-object version for zero-shot, and the held-out colour x
    shape pairs, and 2 x eval_images one-object training-split scenes to fit the linear probe on; fashion-mnist:
    its test split for both and its first 2 x eval_images training photos for the probe; a folder: its own images
    for reconstruction (there is no test split to take); webdataset: no evaluation sets (a stream has no fixed
    subset to come back to).
    """
    name, path, n_eval = spec["name"], spec.get("path"), int(spec.get("eval_images") or 1024)
    kwargs = {"path": path} if path else {}
    if name == "shapes":
        train = build_dataset("shapes", image_size, split="train", seed=seed)
        evals = {"recon": build_dataset("shapes", image_size, split="test", seed=seed, length=n_eval),
                 "zero_shot": build_dataset("shapes", image_size, split="test", seed=seed, length=n_eval,
                                            max_objects=1),
                 "zero_shot_heldout": build_dataset("shapes", image_size, split="heldout", seed=seed,
                                                    length=n_eval),
                 # the linear probe is fitted on training-split scenes (one object, as in the zero-shot set)
                 "probe_train": build_dataset("shapes", image_size, split="train", seed=seed, length=2 * n_eval,
                                              max_objects=1)}
    elif name == "fashion-mnist":
        train = build_dataset(name, image_size, split="train")
        test = build_dataset(name, image_size, split="test")
        evals = {"recon": test, "zero_shot": test,
                 "probe_train": torch.utils.data.Subset(train, range(min(len(train), 2 * n_eval)))}
    else:
        train = build_dataset(name, image_size, split="train", **kwargs)
        evals = {"recon": train} if not isinstance(train, torch.utils.data.IterableDataset) else {}
    if not isinstance(train, torch.utils.data.IterableDataset) and len(train) == 0:
        raise ValueError(f"dataset {name!r} yields no items; expected at least one image")
    return train, evals


def to_uint8_image(x) -> np.ndarray:
    """(3, H, W) or (B, 3, H, W) tensor in [-1, 1] -> uint8 numpy (H, W, 3) or (B, H, W, 3); values clamped."""
    x = torch.as_tensor(x).detach()
    if x.ndim not in (3, 4) or x.shape[-3] not in (1, 3):
        raise ValueError(f"expected an image (3, H, W) or batch (B, 3, H, W) in [-1, 1], got shape {tuple(x.shape)}")
    x = ((x.float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    x = x.expand(*x.shape[:-3], 3, *x.shape[-2:])  # grey -> RGB
    return x.movedim(-3, -1).contiguous().numpy()


def make_grid_image(images, nrow: int = 8, padding: int = 2, pad_value: int = 0) -> np.ndarray:
    """(B, 3, H, W) tensor or a list of (3, H, W) in [-1, 1] -> uint8 (rows * (H + p) + p, nrow * (W + p) + p, 3).

    torchvision's `make_grid` lays the tiles out (row-major, `nrow` per row); `pad_value` is a 0-255 grey level.
    """
    from torchvision.utils import make_grid

    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("make_grid_image expected at least one image, got an empty list")
        images = torch.stack([torch.as_tensor(i) for i in images])
    images = torch.as_tensor(images)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"make_grid_image expected a batch (B, 3, H, W), got shape {tuple(images.shape)}")
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    grid = make_grid(images.detach().float().cpu().clamp(-1, 1), nrow=nrow, padding=padding,
                     pad_value=pad_value / 127.5 - 1.0)                   # (3, H', W') in [-1, 1]
    return to_uint8_image(grid)
