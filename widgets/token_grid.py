"""TokenGrid: the H x W x k code grid of one image, drawn over the image.

    >>> grid = TokenGrid(model, dataset)          # a dataset, a batch, one image (3, S, S) or one dataset item
    >>> grid.index.value = 3                      # which image (of the first `num_images`)
    >>> grid.codebook.value = 2                   # which sub-codebook's code ids the heatmap shows
    >>> grid.select(3, 5)                         # (or click a patch) -> that token's k codes in the table
    >>> grid.selected_codes                       # == model.encode(image)[0, 3, 5].tolist()

Left: the image, large, with the token grid (every cell is one patch_size x patch_size patch = one token); an
optional colour overlay of the selected sub-codebook's codes. Right: the code ids of that sub-codebook, written in
every cell. Colours are *identities*, not a scale: the `PALETTE_SIZE` codes that occur most often in this image
(at least twice) each get their own colour, so equal colour really means the same code; every other cell is grey
(a code that is rarer in this image: read its number). Hovering a cell shows all k codes; clicking selects it.
"""
from __future__ import annotations

import numpy as np

import ipywidgets as W
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ._common import (draw_box, encode_images, figure_layout, html_table, image_widget,
                      new_figure, set_image, take_images, title_html, to_uint8, upscale, View)

# Qualitative colours for code identities (Tableau-10 without its grey), and the grey for all other codes.
IDENTITY_COLOURS = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
                    "#9c755f")
OTHER_COLOUR = "#d9d9d9"
PALETTE_SIZE = len(IDENTITY_COLOURS)


def identity_slots(codes: np.ndarray, size: int = PALETTE_SIZE) -> tuple[np.ndarray, list[int]]:
    """codes (H, W) int -> (slots (H, W) int, the codes that got a colour, most frequent first).

    The `size` most frequent codes that occur at least twice get slots 0..size-1 (ties broken by the smaller code
    id, so the picture is deterministic); every other cell gets slot `size` (grey). A code seen once has nothing
    to be matched with, so it never takes a colour from a code that repeats.
    """
    values, counts = np.unique(codes, return_counts=True)
    order = sorted((c for c in range(len(values)) if counts[c] >= 2), key=lambda c: (-counts[c], values[c]))
    coloured = [int(values[c]) for c in order[:size]]
    slots = np.full(codes.shape, size, dtype=np.int64)
    for slot, code in enumerate(coloured):
        slots[codes == code] = slot
    return slots, coloured


def _discrete_colorscale(size: int = PALETTE_SIZE) -> list:
    """A plotly colorscale with size + 1 flat bands for z = 0..size (z = size is grey)."""
    colours = list(IDENTITY_COLOURS[:size]) + [OTHER_COLOUR]
    n = len(colours)
    scale = []
    for i, colour in enumerate(colours):
        scale += [[i / n, colour], [(i + 1) / n, colour]]
    return scale


class TokenGrid(View):
    """One image's token grid: image + grid lines, code ids per sub-codebook, and a patch's k codes.

    Args:
        model: a UniTok model.
        data: a dataset, images (B, 3, S, S) in [-1, 1], one image (3, S, S), a dataset item, or a list.
        index: the image shown first.
        num_images: how many of the data's first images the `index` slider can pick.
        px: on-screen size of each of the two panels.

    Drivable: `index` (IntSlider, which image), `codebook` (Dropdown), `row` / `col` (IntSliders; clicking a
    cell in `figure` sets them), `opacity` (FloatSlider, the code overlay on the image). Read: `codes`
    ((H, W, k) numpy), `selected_codes` (list of k ints of the selected patch), `slots` ((H, W): colour slot of
    each cell, PALETTE_SIZE = grey), `coloured_codes`, `table` (HTML), `patch_image` (Image). `set_image(image)`
    shows any other image.
    """

    def __init__(self, model, data, *, index: int = 0, num_images: int = 64, px: int = 280):
        self.model = model
        cfg = model.config
        self.num_codebooks, self.codebook_size = cfg.num_codebooks, cfg.codebook_size
        self.grid_size, self.patch_size = cfg.grid_size, cfg.patch_size
        self.px = int(px)
        self.images = take_images(data, num_images)                                      # (N, 3, S, S)
        self._build_widgets(len(self.images), index)
        self.set_image(self.images[self.index.value])

    # ------------------------------------------------------------------ data
    def set_image(self, image) -> None:
        """Encode a new image and redraw everything."""
        self.image = take_images(image, 1)[0]                                               # (3, S, S)
        self.codes = encode_images(self.model, self.image[None])[0].numpy()                 # (H, W, k)
        with self.figure.batch_update():
            self.image_trace.z = to_uint8(self.image)
            hover = np.array([[" · ".join(str(v) for v in self.codes[r, c]) for c in range(self.grid_size)]
                              for r in range(self.grid_size)])
            self.overlay.customdata = hover
            self.heatmap.customdata = hover
        self._draw_codebook()
        self._draw_selection()

    @property
    def selected_codes(self) -> list[int]:
        return [int(v) for v in self.codes[self.row.value, self.col.value]]

    # ------------------------------------------------------------------ widgets
    def _build_widgets(self, num_images: int, index: int) -> None:
        g, k, K = self.grid_size, self.num_codebooks, self.codebook_size
        self.index = W.IntSlider(value=min(max(index, 0), max(0, num_images - 1)), min=0,
                                 max=max(0, num_images - 1), description="image", disabled=num_images < 2,
                                 layout=W.Layout(width="260px", display=None if num_images > 1 else "none"))
        self.codebook = W.Dropdown(options=[(f"sub-codebook {i}", i) for i in range(k)], value=0,
                                   description="codebook", layout=W.Layout(width="240px"))
        self.row = W.IntSlider(value=0, min=0, max=g - 1, description="row", layout=W.Layout(width="240px"))
        self.col = W.IntSlider(value=0, min=0, max=g - 1, description="col", layout=W.Layout(width="240px"))
        self.opacity = W.FloatSlider(value=0.0, min=0.0, max=0.9, step=0.05, description="overlay",
                                     readout_format=".2f", layout=W.Layout(width="240px"))
        self.table = W.HTML()
        self.legend = W.HTML()
        self.status = self.legend            # the name every view gives its message line
        self.patch_image = image_widget(px=128)
        fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.06,
                            subplot_titles=("image and token grid", "code ids"))
        # Pixel (i, j) of the S x S image sits at grid coordinate (j + 0.5) / p - 0.5, so cell (r, c) is centred
        # on (c, r) in both panels: heatmap and image share one coordinate system.
        step = 1.0 / self.patch_size
        fig.add_trace(go.Image(z=np.zeros((g * self.patch_size, g * self.patch_size, 3), np.uint8),
                               x0=-0.5 + step / 2, dx=step, y0=-0.5 + step / 2, dy=step, hoverinfo="skip"),
                      row=1, col=1)
        cells = list(range(g))
        hover = "row %{y}, col %{x}<br>codes: %{customdata}<extra></extra>"
        scale = _discrete_colorscale()
        fig.add_trace(go.Heatmap(x=cells, y=cells, z=np.zeros((g, g)), zmin=-0.5, zmax=PALETTE_SIZE + 0.5,
                                 opacity=0.0, colorscale=scale, showscale=False, hovertemplate=hover), row=1, col=1)
        fig.add_trace(go.Heatmap(x=cells, y=cells, z=np.zeros((g, g)), zmin=-0.5, zmax=PALETTE_SIZE + 0.5,
                                 colorscale=scale, showscale=False, texttemplate="%{text}",
                                 textfont=dict(size=10 if g <= 16 else 7, color="#111"), xgap=1, ygap=1,
                                 hovertemplate=hover), row=1, col=2)
        # Tick labels every cell up to 16 per side, else every 4th: derived from the grid, not from a pixel size.
        ticks = 1 if g <= 16 else 4
        for col in (1, 2):
            fig.update_xaxes(range=[-0.5, g - 0.5], showgrid=False, zeroline=False, dtick=ticks,
                             constrain="domain", row=1, col=col)
            fig.update_yaxes(range=[g - 0.5, -0.5], showgrid=False, zeroline=False, dtick=ticks,
                             scaleanchor="x" if col == 1 else "x2", constrain="domain", row=1, col=col)
        # grid lines between tokens (left panel), drawn once
        lines = [dict(type="line", xref="x", yref="y", x0=v - 0.5, x1=v - 0.5, y0=-0.5, y1=g - 0.5,
                      line=dict(color="rgba(255,255,255,0.55)", width=1)) for v in range(1, g)]
        lines += [dict(type="line", xref="x", yref="y", y0=v - 0.5, y1=v - 0.5, x0=-0.5, x1=g - 0.5,
                       line=dict(color="rgba(255,255,255,0.55)", width=1)) for v in range(1, g)]
        self._grid_shapes = lines
        fig.update_layout(**figure_layout("", 2 * self.px + 60, self.px + 60, margin=dict(l=30, r=10, t=40, b=30)),
                          shapes=lines)
        self.figure = go.FigureWidget(fig)
        self.image_trace, self.overlay, self.heatmap = self.figure.data
        self.overlay.on_click(self._on_click)
        self.heatmap.on_click(self._on_click)
        self.index.observe(lambda _: self.set_image(self.images[self.index.value]), names="value")
        self.codebook.observe(lambda _: self._draw_codebook(), names="value")
        self.opacity.observe(lambda _: setattr(self.overlay, "opacity", self.opacity.value), names="value")
        self.row.observe(lambda _: self._draw_selection(), names="value")
        self.col.observe(lambda _: self._draw_selection(), names="value")
        header = W.HTML(title_html("Token grid", f"{g} × {g} tokens of {self.patch_size} × {self.patch_size} px, "
                                                 f"each with k = {k} codes (one per sub-codebook, K = {K}); "
                                                 "click a cell or use the sliders"))
        side = W.VBox([W.HTML("<b>selected patch</b> (and its surroundings)"), self.patch_image, self.table],
                      layout=W.Layout(margin="0 0 0 12px", width="250px", min_width="250px"))
        # The figure and the side panel wrap onto two rows in a narrow output area instead of overlapping.
        # The figure sits in a box of its drawn size: plotly draws after the row is laid out, and a row sized by the
        # not-yet-drawn figure let the wrapped side panel overlap the figure's bottom.
        figure_box = W.Box([self.figure], layout=W.Layout(width=f"{2 * self.px + 60}px", height=f"{self.px + 60}px",
                                                          min_width=f"{2 * self.px + 60}px"))
        body = W.HBox([figure_box, side], layout=W.Layout(flex_flow="row wrap", align_items="flex-start"))
        controls = W.HBox([self.index, self.codebook, self.opacity, self.row, self.col],
                          layout=W.Layout(flex_flow="row wrap", align_items="center"))
        for control in controls.children:
            control.layout.margin = "0 12px 4px 0"
        self.figure.add_class("unitok-tokengrid-figure")          # names for the browser test
        side.add_class("unitok-tokengrid-side")
        self.widget = self._root([header, controls, self.legend, body])
        self.widget.add_class("unitok-tokengrid")

    def _on_click(self, trace, points, selector) -> None:
        if points.xs:
            self.select(int(round(points.ys[0])), int(round(points.xs[0])))

    def select(self, row: int, col: int) -> None:
        """Select the token at (row, col), as a click does."""
        if not (0 <= row < self.grid_size and 0 <= col < self.grid_size):
            raise ValueError(f"row and col must lie in [0, {self.grid_size}), got ({row}, {col})")
        self.row.value, self.col.value = int(row), int(col)      # each slider's observer redraws

    def _draw_codebook(self) -> None:
        i = self.codebook.value
        z = self.codes[..., i]
        self.slots, self.coloured_codes = identity_slots(z)
        with self.figure.batch_update():
            self.heatmap.z = self.slots
            self.heatmap.text = z
            self.overlay.z = self.slots
            self.figure.layout.annotations[1].text = f"code ids of sub-codebook {i}"
        swatches = " ".join(f"<span style='background:{IDENTITY_COLOURS[s]};padding:0 5px;border-radius:2px'>"
                            f"{code}</span>" for s, code in enumerate(self.coloured_codes))
        self.legend.value = (f"<div style='font-size:12px;color:#333;margin:2px 0'>colour = code identity: "
                             f"{swatches or '<i>no code repeats in this image</i>'} "
                             f"<span style='background:{OTHER_COLOUR};padding:0 5px;border-radius:2px'>grey</span>"
                             f" = any other code (read the number). Equal colour = the same code.</div>")

    def _draw_selection(self) -> None:
        r, c = self.row.value, self.col.value
        box = dict(type="rect", x0=c - 0.5, x1=c + 0.5, y0=r - 0.5, y1=r + 0.5, line=dict(color="#222", width=3))
        self.figure.layout.shapes = self._grid_shapes + [dict(box, xref="x", yref="y"),
                                                         dict(box, xref="x2", yref="y2")]
        codes = self.codes[r, c]
        k = self.num_codebooks
        rows = []
        for i in range(k):
            same = int((self.codes[..., i] == codes[i]).sum()) - 1      # other tokens of this image with that code
            # plain numbers: in this view a colour means a code's identity, so sub-codebooks get none
            rows.append([str(i), f"<b>{int(codes[i])}</b>", same])
        self.table.value = html_table(["sub-cb", "code", "elsewhere"], rows,
                                      f"token (row {r}, col {c}), index {r * self.grid_size + c} row-major; "
                                      "elsewhere = other tokens of this image with the same code")
        p = self.patch_size
        # the patch with one token of surroundings, the patch itself outlined
        padded = np.pad(to_uint8(self.image), ((p, p), (p, p), (0, 0)), constant_values=128)
        crop = upscale(padded[r * p:r * p + 3 * p, c * p:c * p + 3 * p], size=128)
        f = crop.shape[0] // (3 * p)
        set_image(self.patch_image, draw_box(crop, p * f, p * f, p * f, width=max(2, f // 3)), 128)

    # ------------------------------------------------------------------ static picture
    def static_figure(self):
        from matplotlib.colors import BoundaryNorm, ListedColormap

        g, i = self.grid_size, self.codebook.value
        r, c = self.row.value, self.col.value
        fig = new_figure(11, 4.4)
        ax = fig.add_subplot(1, 3, 1)
        ax.imshow(to_uint8(self.image), interpolation="nearest", extent=(-0.5, g - 0.5, g - 0.5, -0.5))
        for v in range(1, g):
            ax.axhline(v - 0.5, color="white", lw=0.6, alpha=0.6)
            ax.axvline(v - 0.5, color="white", lw=0.6, alpha=0.6)
        ax.add_patch(_rect(c, r))
        ax.set_title("image and token grid", fontsize=10)
        ax = fig.add_subplot(1, 3, 2)
        z = self.codes[..., i]
        slots, coloured = identity_slots(z)
        cmap = ListedColormap(list(IDENTITY_COLOURS) + [OTHER_COLOUR])
        ax.imshow(slots, cmap=cmap, norm=BoundaryNorm(np.arange(PALETTE_SIZE + 2) - 0.5, PALETTE_SIZE + 1),
                  interpolation="nearest")
        if g <= 16:
            for rr in range(g):
                for cc in range(g):
                    ax.text(cc, rr, str(z[rr, cc]), ha="center", va="center", fontsize=7, color="#111")
        ax.add_patch(_rect(c, r))
        ax.set_title(f"code ids, sub-codebook {i}\n(equal colour = same code; grey = other codes)", fontsize=9)
        ax = fig.add_subplot(1, 3, 3)
        ax.axis("off")
        cell = [[str(j), str(int(v))] for j, v in enumerate(self.codes[r, c])]
        table = ax.table(cellText=cell, colLabels=["sub-codebook", "code"], loc="center", cellLoc="center")
        table.scale(1, 1.3)
        ax.set_title(f"token (row {r}, col {c})", fontsize=10)
        fig.subplots_adjust(left=0.03, right=0.98, top=0.86, bottom=0.06, wspace=0.15)
        return fig


def _rect(col: int, row: int):
    from matplotlib.patches import Rectangle

    return Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="#222", lw=2.5)
