"""Datasets for UniTok by name: start here. ``build_dataset(name, ...)`` builds one, ``build_datasets(spec, ...)`` a
run's training set and its evaluation sets.

Every dataset yields the same item, so torch's ``default_collate`` batches any of them::

    {"image": Tensor (3, H, W) float32 in [-1, 1],  # H == W == image_size
     "caption": str,
     "labels": dict[str, int]}                       # may be {} (folder, webdataset)

The datasets, one file per kind:

- ``ShapesDataset``   (unitok.data.shapes_dataset) coloured shapes drawn on the fly from (seed, split, index):
                      unlimited, captioned, and with a fixed set of colour x shape pairs held out of training to test
                      zero-shot generalisation.
- ``FashionMNIST``    (unitok.data.files) real 28x28 grey photos of clothes, read from the Debian package's IDX files.
- ``FolderDataset``   (unitok.data.files) your own images plus a CSV / JSONL file with ``image`` and ``caption``
                      columns.
- ``WebDataset``      (unitok.data.files) an IterableDataset over image+text tar shards (optional ``webdataset``).

Downloaded data goes to ``unitok.data.files.default_cache_dir()``; ``to_uint8_image`` and ``make_grid_image``
(unitok.data.images) turn [-1, 1] tensors into uint8 arrays for PNGs and widgets.
"""
from __future__ import annotations

import torch

from .files import FashionMNIST, FolderDataset, WebDataset
from .shapes_dataset import ShapesDataset

DATASETS = ("shapes", "fashion-mnist", "folder", "webdataset")


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

