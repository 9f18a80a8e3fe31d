"""Argument checks every dataset shares: an image size and an item index, each with a message that says what is allowed.

Kept apart from the datasets so that the procedural set (`unitok.data.shapes_dataset`) and the sets read from
files (`unitok.data.files`) refuse the same bad arguments with the same words.
"""
from __future__ import annotations

import operator

import numpy as np


def check_image_size(image_size) -> int:
    """``image_size`` as an int (pixels per side); a ValueError unless it is an integer >= 8 (bools refused)."""
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8 (pixels per side), got {image_size!r}")
    return int(image_size)


def check_index(index, length: int) -> int:
    """``index`` into a dataset of ``length`` items as a non-negative int (negative counts from the end, as for a
    list); an IndexError when out of range, a TypeError for floats (numpy / torch integers are accepted)."""
    index = operator.index(index)  # accepts numpy / torch integers, refuses floats
    if index < 0:
        index += length
    if not 0 <= index < length:
        raise IndexError(f"index {index} out of range for a dataset of {length} items")
    return index
