"""Image conversions shared by the datasets, the evaluation and the widgets, all in unitok's [-1, 1] convention.

- ``pil_to_tensor``     a PIL image of any mode and size -> (3, S, S) float32 in [-1, 1], centre-cropped square
                        (EXIF rotation applied, 16-bit and float greys scaled, transparency put on white).
- ``to_uint8_image``    (3, H, W) or (B, 3, H, W) in [-1, 1] -> uint8 (H, W, 3) / (B, H, W, 3), for PNGs and widgets.
- ``make_grid_image``   a batch in [-1, 1] -> one uint8 picture of tiles (torchvision's make_grid).
- ``IMAGE_EXTENSIONS``  the file suffixes a folder of images is searched for.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


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
