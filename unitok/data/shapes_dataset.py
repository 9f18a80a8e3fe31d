"""ShapesDataset: coloured shapes drawn on the fly from (seed, split, index), unlimited and captioned.

A fixed set of colour x shape pairs is held out of training (the "heldout" split has only those) to test zero-shot
generalisation. The scenes (shapes, colours, sizes, positions, backgrounds, captions and a hard-negative caption)
are sampled here; `unitok.data.shapes` draws them. Items follow the shared contract of `unitok.data.datasets`::

    {"image": Tensor (3, S, S) float32 in [-1, 1], "caption": str, "negative_caption": str, "labels": dict[str, int]}
"""
from __future__ import annotations

import random
import re

import numpy as np
import torch

from .checks import check_image_size, check_index
from .shapes import COLOURS, SHAPES, render_scene, rgb


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
        self.image_size = check_image_size(image_size)
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
        index = check_index(index, self.length)
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
