"""Helpers shared by every view: image conversion and PNG encoding, input normalisation, inference mode, layout
constants and a redraw throttle.

Nothing here holds state about a model; each view calls these with the public objects it was given.
"""
from __future__ import annotations

import contextlib
import io
import math
import time
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

import ipywidgets as W

from unitok.tokenizer.codes import count_codes
from unitok.training.machine import eval_mode, model_device, model_lock  # noqa: F401  (re-exported for the views)

# Background threads (training, UMAP) may import modules while the main thread updates plotly figures. plotly looks
# pandas up in sys.modules on every trace update and would find it half-initialised if a worker were importing it
# at that moment (`import umap` does): "partially initialized module 'pandas' has no attribute 'Series'".
# Importing it once here, in the importing thread, closes that race.
try:
    import pandas  # noqa: F401
except ImportError:  # pragma: no cover - pandas is optional for the views themselves
    pass

# ----------------------------------------------------------------------------------------------------------------
# Look: one set of sizes and colours, so the views line up when shown one under another.
# ----------------------------------------------------------------------------------------------------------------
IMAGE_PX = 192          # on-screen side of one image panel: a 32 px image is upscaled x6, nearest neighbour
FIG_WIDTH = 800         # full-width plotly figures: JupyterLab's output area is ~820 px in a 1000 px window
HALF_WIDTH = 390        # side-by-side plotly figures
PLOTLY_TEMPLATE = "plotly_white"
WIDE_LABEL = {"description_width": "initial"}   # a slider label as wide as its words ("temperature" is not cut)
# Tableau-10: distinct and colour-blind friendly; sub-codebook i is always drawn in PALETTE[i % 10].
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
           "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac")
LOSS_COLOURS = {"loss": "#222222", "l1": "#4e79a7", "l2": "#f28e2b", "vq": "#e15759", "clip": "#59a14f"}


def codebook_colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def figure_layout(title: str = "", width: int = FIG_WIDTH, height: int = 360, **extra) -> dict:
    """Plotly layout shared by all views (same template, font, margins)."""
    layout = dict(template=PLOTLY_TEMPLATE, width=width, height=height, font=dict(size=12),
                  margin=dict(l=60, r=20, t=50 if title else 30, b=45),
                  title=dict(text=title, x=0.01, xanchor="left", font=dict(size=14)) if title else None)
    layout.update(extra)
    return layout


def json_safe(values):
    """Array with NaN/inf -> (nested) list with None there: a FigureWidget sends its data to the browser as JSON,
    which has no NaN (the whole message would be dropped); plotly draws None as a gap. Finite arrays are returned
    as they are (cheaper to validate and send)."""
    a = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(a)
    return a if finite.all() else np.where(finite, a, None).tolist()


def hbox(children, gap: int = 10, **layout) -> W.HBox:
    """A row of ipywidgets controls `gap` px apart (ipywidgets 8.1's Layout has no flex `gap`: use margins)."""
    for child in children[:-1]:
        if not child.layout.margin:
            child.layout.margin = f"0 {gap}px 0 0"
    return W.HBox(list(children), layout=W.Layout(align_items="center", **layout))


def title_html(text: str, subtitle: str = "") -> str:
    sub = f"<div style='color:#666;font-size:12px'>{subtitle}</div>" if subtitle else ""
    return f"<div style='font-size:15px;font-weight:600;margin:4px 0'>{text}</div>{sub}"


# ----------------------------------------------------------------------------------------------------------------
# Images: library tensors are (3, H, W) floats in [-1, 1]; the screen wants uint8 PNGs, upscaled without blur.
# ----------------------------------------------------------------------------------------------------------------
def to_uint8(image) -> np.ndarray:
    """(3, H, W) tensor in [-1, 1] (or an already-converted uint8 (H, W, 3) array) -> uint8 (H, W, 3)."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8:
        return image
    from unitok.data.images import to_uint8_image

    return to_uint8_image(image)


def upscale(array: np.ndarray, size: Optional[int] = None, factor: Optional[int] = None) -> np.ndarray:
    """Nearest-neighbour upscaling of an (H, W[, C]) array by an integer factor (default: to about `size` px).

    Integer factors keep every source pixel a crisp square, which is what you want for 32 px images and patches.
    """
    if factor is None:
        factor = max(1, int(size // max(array.shape[:2]))) if size else 1
    if factor == 1:
        return array
    return np.repeat(np.repeat(array, factor, axis=0), factor, axis=1)


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return buffer.getvalue()


def image_widget(array: Optional[np.ndarray] = None, px: int = IMAGE_PX) -> W.Image:
    """An ipywidgets.Image showing `array` upscaled to about px x px (a blank panel when array is None)."""
    widget = W.Image(format="png", layout=W.Layout(width=f"{px}px", height=f"{px}px", object_fit="contain"))
    widget.add_class("unitok-pixelated")  # sharp pixels when the browser rescales (see pixelated_css)
    # an empty Image draws the browser's broken-image icon: a light grey square until there is a picture
    set_image(widget, array if array is not None else np.full((8, 8, 3), 238, np.uint8), px)
    return widget


def set_image(widget: W.Image, array: np.ndarray, px: Optional[int] = None) -> None:
    widget.value = png_bytes(upscale(to_uint8(array), size=px or IMAGE_PX))


VIEW_CSS = """<style>
.unitok-pixelated {image-rendering: pixelated;}
/* A disabled button must look disabled: JupyterLab's default keeps a coloured (e.g. green) button nearly as
   bright as an enabled one. Grey it out and show a 'not allowed' cursor. */
.unitok-view button:disabled, .unitok-view .jupyter-button:disabled, .unitok-view .widget-button:disabled {
  opacity: 0.38 !important; filter: grayscale(100%); cursor: not-allowed !important; box-shadow: none !important;}
/* A view's controls answer only when the kernel is free. While a cell (or Run All's queue) keeps it busy, a click
   waits silently; this note says so. JupyterLab marks its notebook toolbar's execution indicator data-status. */
.unitok-busy-note {display: none; color: #a05a00; font-size: 12px; margin: 0 0 4px 0;}
.jp-NotebookPanel:has(.jp-Notebook-ExecutionIndicator[data-status="busy"]) .unitok-busy-note {display: block;}
</style>"""
BUSY_NOTE = ("<div class='unitok-busy-note'>⏳ the kernel is busy (a cell is running, or this view is working): "
             "clicks here are answered when it is free. ■ stops a long cell.</div>")


def pixelated_css() -> W.HTML:
    """A tiny style tag shared by every view: square pixels when the browser rescales an image (browsers smooth
    them otherwise), disabled buttons drawn greyed out, and a note shown only while the kernel is busy."""
    return W.HTML(VIEW_CSS + BUSY_NOTE, layout=W.Layout(margin="0"))


def error_map(original: torch.Tensor, reconstruction: torch.Tensor, vmax: float = 1.0,
              cmap: str = "inferno") -> np.ndarray:
    """|x - x_hat| averaged over channels, coloured with a fixed scale [0, vmax] (so maps are comparable between
    images and models) -> uint8 (H, W, 3). Pixels in [-1, 1]: an error of 1 is half the data range."""
    import matplotlib

    err = (original.float().cpu() - reconstruction.float().cpu()).abs().mean(0).numpy()   # (H, W)
    rgba = matplotlib.colormaps[cmap](np.clip(err / vmax, 0.0, 1.0))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def draw_grid(array: np.ndarray, cells: int, colour=(255, 255, 255), alpha: float = 0.45) -> np.ndarray:
    """Blend 1-px lines between `cells` x `cells` equal cells into an upscaled uint8 image (H, W, 3)."""
    out = array.astype(np.float32).copy()
    h, w = out.shape[:2]
    colour = np.asarray(colour, np.float32)
    for i in range(1, cells):
        y, x = round(i * h / cells), round(i * w / cells)
        out[y, :] = (1 - alpha) * out[y, :] + alpha * colour
        out[:, x] = (1 - alpha) * out[:, x] + alpha * colour
    return out.round().astype(np.uint8)


def draw_box(array: np.ndarray, top: int, left: int, size: int, colour=(255, 40, 40), width: int = 2) -> np.ndarray:
    """Outline a size x size square at (top, left) in an uint8 (H, W, 3) image (clipped to the image)."""
    out = array.copy()
    h, w = out.shape[:2]
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + size, h), min(left + size, w)
    out[y0:min(y0 + width, y1), x0:x1] = colour
    out[max(y1 - width, y0):y1, x0:x1] = colour
    out[y0:y1, x0:min(x0 + width, x1)] = colour
    out[y0:y1, max(x1 - width, x0):x1] = colour
    return out


def tile_grid(tiles: Sequence[np.ndarray], ncol: int, pad: int = 4, background=(255, 255, 255)) -> np.ndarray:
    """Equal-size uint8 tiles (h, w, 3) -> one uint8 mosaic with `ncol` columns and `pad` px gaps."""
    if not tiles:
        return np.full((8, 8, 3), background, np.uint8)
    h, w = tiles[0].shape[:2]
    ncol = max(1, min(ncol, len(tiles)))
    nrow = math.ceil(len(tiles) / ncol)
    grid = np.empty((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), np.uint8)
    grid[:] = background
    for n, tile in enumerate(tiles):
        r, c = divmod(n, ncol)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = tile
    return grid


# ----------------------------------------------------------------------------------------------------------------
# Inputs: the views accept a batch tensor, one image, a dataset item, a list of either, or a dataset.
# ----------------------------------------------------------------------------------------------------------------
def _is_dataset(obj) -> bool:
    return hasattr(obj, "__getitem__") and hasattr(obj, "__len__") and not isinstance(obj, (torch.Tensor, dict,
                                                                                             list, tuple, np.ndarray))


def take_items(source, n: Optional[int] = None) -> tuple[torch.Tensor, list[str], list[dict]]:
    """Images (B, 3, S, S), captions (B) and labels (B) from a tensor, a dataset item, a list or a dataset.

    Only the first `n` images are taken (all when None). Tensors have no captions: those come back as "".
    """
    if isinstance(source, np.ndarray):
        source = torch.from_numpy(source)
    if isinstance(source, torch.Tensor):
        images = source[None] if source.ndim == 3 else source
        if images.ndim != 4:
            raise ValueError(f"expected images (B, 3, S, S) or one image (3, S, S) in [-1, 1], got shape "
                             f"{tuple(source.shape)}")
        images = images[:n] if n is not None else images
        return images.float(), [""] * len(images), [{} for _ in range(len(images))]
    if isinstance(source, dict):
        if "image" not in source:
            raise ValueError(f"expected a dataset item with an 'image' key, got keys {sorted(source)}")
        source = [source]
    if _is_dataset(source) or isinstance(source, (list, tuple)):
        count = len(source) if n is None else min(n, len(source))
        if count == 0:
            raise ValueError("expected at least one image, got an empty dataset/list")
        items = [source[i] for i in range(count)]
        images, captions, labels = [], [], []
        for item in items:
            if isinstance(item, dict):
                images.append(torch.as_tensor(item["image"]).float())
                captions.append(str(item.get("caption", "")))
                labels.append(dict(item.get("labels", {}) or {}))
            else:
                images.append(torch.as_tensor(item).float())
                captions.append("")
                labels.append({})
        return torch.stack(images), captions, labels
    raise ValueError(f"expected images as a tensor (B, 3, S, S), a dataset or a list of items, got "
                     f"{type(source).__name__}")


def take_images(source, n: Optional[int] = None) -> torch.Tensor:
    return take_items(source, n)[0]


@contextlib.contextmanager
def inference(model):
    """Eval mode + no_grad for the duration, holding the model's lock, restoring its training flag afterwards.

    This is `unitok.training.machine.eval_mode`: the TrainingDashboard trains in a background thread while the other views
    switch the *same* model to eval mode from the main thread. `Trainer.step` and `eval_mode` hold the same
    per-model lock (`model_lock`), so a view waits for the current step to end instead of flipping the model to
    eval mode in the middle of it (with dead-code restart on, that batch would go uncounted).
    """
    with eval_mode(model):
        yield


def encode_images(model, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """model.encode in batches -> codes (B, H, W, k) int64 on the CPU."""
    device = model_device(model)
    out = []
    with inference(model):
        for start in range(0, len(images), batch_size):
            out.append(model.encode(images[start:start + batch_size].to(device)).cpu())
    return torch.cat(out)


def code_counts(codes: torch.Tensor, codebook_size: int) -> np.ndarray:
    """codes (..., k) -> (k, K) int64 counts per code of each sub-codebook, as numpy for plotting (the library's one
    counter, `unitok.tokenizer.codes.count_codes`)."""
    return count_codes(codes.long(), codebook_size).cpu().numpy()


# ----------------------------------------------------------------------------------------------------------------
# Throttling and display
# ----------------------------------------------------------------------------------------------------------------
class Throttle:
    """`ready()` is True at most once per `interval` seconds (then call `mark()`): redraws stay cheap however fast
    the data comes."""

    def __init__(self, interval: float):
        self.interval = float(interval)
        self.last = -math.inf

    def ready(self) -> bool:
        return time.perf_counter() - self.last >= self.interval

    def mark(self) -> None:
        self.last = time.perf_counter()


def close_tree(widget) -> None:
    """Close an ipywidgets widget and every widget below it (`Widget.close` alone leaves the children open, and
    each open widget keeps a comm to the browser)."""
    for child in getattr(widget, "children", ()) or ():
        close_tree(child)
    widget.close()


class View:
    """Base class: every view has `.widget` (an ipywidgets container) and shows it when displayed.

    The constructor shape is the same for every view: `View(model, data=None, *, options)` where `data` is a
    dataset, an image batch (B, 3, S, S) in [-1, 1], one image or dataset item, or a list of them, and options
    share names across views (`num_images`, `px`, `seed`, `index`). Controls with the same role share a name:
    `index` (which image), `codebook` (which sub-codebook), `status` (an HTML line for messages and warnings),
    `figure` (the main plotly figure).

    Subclasses also provide `static_figure()`: a matplotlib Figure of the same content for notebooks rendered
    without a kernel (saved outputs keep a PNG, not live widgets). `close()` stops any background work and closes
    every widget of the view.
    """

    widget: W.Widget
    closed: bool = False

    def display(self):
        from IPython.display import display

        display(self.widget)

    def _ipython_display_(self):
        self.display()

    def close(self) -> None:
        """Stop background work (subclasses) and close every widget of the view. Safe to call twice."""
        self.closed = True
        if getattr(self, "widget", None) is not None:
            close_tree(self.widget)

    def static_figure(self):  # pragma: no cover - every view overrides it
        raise NotImplementedError

    def _root(self, children) -> W.VBox:
        """The view's outer box, with the shared style and the class the style applies to."""
        box = W.VBox([pixelated_css(), *children])
        box.add_class("unitok-view")
        box.add_class(f"unitok-{type(self).__name__.lower()}")     # e.g. unitok-trainingdashboard (browser tests)
        return box


def new_figure(width: float, height: float):
    """A matplotlib Figure made through pyplot (so Jupyter's inline formatter knows it) but already closed, so it
    is shown once, when returned or displayed, and does not pile up in pyplot's figure manager."""
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(width, height), dpi=100)
    plt.close(fig)
    return fig


def style_axes_image(ax, title: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])


def fmt_db(value: float) -> str:
    return "∞ dB" if math.isinf(value) else f"{value:.2f} dB"


def html_table(header: Sequence[str], rows: Iterable[Sequence], caption: str = "") -> str:
    """A small styled HTML table (ipywidgets.HTML renders it; no pandas needed)."""
    th = "".join(f"<th style='padding:3px 10px;text-align:right;border-bottom:1px solid #999'>{h}</th>"
                 for h in header)
    body = "".join("<tr>" + "".join(f"<td style='padding:2px 10px;text-align:right'>{v}</td>" for v in row)
                   + "</tr>" for row in rows)
    cap = (f"<caption style='caption-side:bottom;color:#555;font-size:12px;text-align:left;padding-top:4px'>"
           f"{caption}</caption>") if caption else ""
    return (f"<table style='border-collapse:collapse;font-size:13px;font-variant-numeric:tabular-nums'>{cap}"
            f"<thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>")
