"""Saved folders of a model that works over a frozen UniTok tokenizer (the generator, the unified model).

A folder holds model.safetensors (the model's own weights, never the tokenizer's), config.json (the model's config
under its own key, the tokenizer's path relative to the folder and the sha256 of its weights, plus anything the
trainer adds) and whatever else the model needs (the unified model's text_tokenizer.json). The tokenizer stays
where it is: loading follows the stored path, and warns when the tokenizer found there is not the one trained on.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from ..checkpoint import atomic_write, tokenizer_hash

PathLike = Union[str, os.PathLike]


def save_weights(model: nn.Module, directory: PathLike, dtype: Optional[torch.dtype] = None) -> Path:
    """Create `directory` and write the model's state dict (on the CPU; floats cast to dtype when given) to
    model.safetensors, atomically. Returns the directory as a Path."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype if dtype is not None and v.is_floating_point() else v.dtype)
             .contiguous() for k, v in model.state_dict().items()}
    atomic_write(directory / "model.safetensors", lambda p: save_file(state, p, metadata={"format": "pt"}))
    return directory


def write_config(directory: Path, meta: dict, tokenizer=None, tokenizer_path: Optional[PathLike] = None,
                 extra: Optional[dict] = None) -> None:
    """config.json: `meta` (the model's config under its key), the tokenizer's path relative to `directory` and
    its weight hash (when given), then `extra`, atomically."""
    meta = dict(meta)
    if tokenizer_path is not None:
        meta["tokenizer"] = os.path.relpath(Path(tokenizer_path).resolve(), directory.resolve())
    if tokenizer is not None:
        meta["tokenizer_sha256"] = tokenizer_hash(tokenizer)
    meta.update(extra or {})
    atomic_write(directory / "config.json", lambda p: Path(p).write_text(json.dumps(meta, indent=2)))


def require_files(directory: Path, names: Sequence[str], writer: str) -> None:
    """FileNotFoundError naming the first missing file and what writes such a folder."""
    for name in names:
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found; expected a folder written by {writer}")


def linked_tokenizer(directory: Path, meta: dict, map_location: str = "cpu"):
    """The tokenizer config.json points at (loaded), or None when it names none."""
    from ..tokenizer.model import UniTok

    if not meta.get("tokenizer"):
        return None
    return UniTok.from_pretrained((directory / meta["tokenizer"]).resolve(), map_location=map_location)


def warn_if_tokenizer_changed(meta: dict, tokenizer, directory: Path, consequence: str) -> None:
    """A warning (at the caller of the caller's `from_pretrained`) when the tokenizer's weights differ from the
    ones the folder was trained on; `consequence` says what that means for this model."""
    want = meta.get("tokenizer_sha256")
    if want and want != tokenizer_hash(tokenizer):
        warnings.warn(f"the tokenizer's weights differ from the ones {directory} was trained on "
                      f"(sha256 {want[:12]}...); {consequence}", stacklevel=3)
