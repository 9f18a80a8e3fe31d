"""TokenGrid: the H x W x k code grid of one image, drawn over the image.

    >>> grid = TokenGrid(model, dataset[0])       # an item, an image (3, S, S) or a batch of one
    >>> grid.codebook.value = 2                   # which sub-codebook's code ids the heatmap shows
    >>> grid.row.value, grid.col.value = 3, 5     # (or click a patch) -> that token's k codes in the table
    >>> grid.selected_codes                       # == model.encode(image)[0, 3, 5].tolist()

Left: the image, large, with the token grid (every cell is one patch_size x patch_size patch = one token); an
optional colour overlay of the selected sub-codebook's codes. Right: the code ids of that sub-codebook as a heatmap.
Hovering a cell shows all k codes; clicking selects it.
"""
from __future__ import annotations

import numpy as np

import ipywidgets as W
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ._common import (codebook_colour, draw_box, encode_images, figure_layout, hbox, html_table, image_widget,
                      new_figure, pixelated_css, set_image, take_images, title_html, to_uint8, upscale, View)


class TokenGrid(View):
    """One image's token grid: image + grid lines, code-id heatmap per sub-codebook, and a patch's k codes.

    Args:
        model: a UniTok model.
        image: (3, S, S) or (1, 3, S, S) in [-1, 1], a dataset item, or a dataset (its first image).
        px: on-screen size of each of the two panels.

    Drivable: `codebook` (Dropdown), `row` / `col` (IntSliders; clicking a cell in `figure` sets them),
    `opacity` (FloatSlider, the code overlay on the image). Read: `codes` ((H, W, k) numpy), `selected_codes`
    (list of k ints of the selected patch), `table` (HTML), `patch_image` (Image). `set_image(image)` switches
    to another image.
    """

    def __init__(self, model, image, px: int = 320):
        self.model = model
        cfg = model.config
        self.num_codebooks, self.codebook_size = cfg.num_codebooks, cfg.codebook_size
        self.grid_size, self.patch_size = cfg.grid_size, cfg.patch_size
        self.px = int(px)
        self._build_widgets()
        self.set_image(image)

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
    def _build_widgets(self) -> None:
        g, k, K = self.grid_size, self.num_codebooks, self.codebook_size
        self.codebook = W.Dropdown(options=[(f"sub-codebook {i}", i) for i in range(k)], value=0,
                                   description="heatmap", layout=W.Layout(width="240px"))
        self.row = W.IntSlider(value=0, min=0, max=g - 1, description="row", layout=W.Layout(width="260px"))
        self.col = W.IntSlider(value=0, min=0, max=g - 1, description="col", layout=W.Layout(width="260px"))
        self.opacity = W.FloatSlider(value=0.0, min=0.0, max=0.9, step=0.05, description="overlay",
                                     readout_format=".2f", layout=W.Layout(width="260px"))
        self.table = W.HTML()
        self.patch_image = image_widget(px=128)
        fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.08,
                            subplot_titles=("image and token grid", "code ids"))
        # Pixel (i, j) of the S x S image sits at grid coordinate (j + 0.5) / p - 0.5, so cell (r, c) is centred
        # on (c, r) in both panels: heatmap and image share one coordinate system.
        step = 1.0 / self.patch_size
        fig.add_trace(go.Image(z=np.zeros((g * self.patch_size, g * self.patch_size, 3), np.uint8),
                               x0=-0.5 + step / 2, dx=step, y0=-0.5 + step / 2, dy=step, hoverinfo="skip"),
                      row=1, col=1)
        cells = list(range(g))
        hover = "row %{y}, col %{x}<br>codes: %{customdata}<extra></extra>"
        fig.add_trace(go.Heatmap(x=cells, y=cells, z=np.zeros((g, g)), zmin=0, zmax=K - 1, opacity=0.0,
                                 colorscale="Turbo", showscale=False, hovertemplate=hover), row=1, col=1)
        fig.add_trace(go.Heatmap(x=cells, y=cells, z=np.zeros((g, g)), zmin=0, zmax=K - 1, colorscale="Turbo",
                                 texttemplate="%{z}", textfont=dict(size=10 if g <= 16 else 7),
                                 colorbar=dict(title=dict(text="code id", side="right"), len=0.9),
                                 hovertemplate=hover), row=1, col=2)
        for col in (1, 2):
            fig.update_xaxes(range=[-0.5, g - 0.5], showgrid=False, zeroline=False, dtick=1 if g <= 16 else 4,
                             constrain="domain", row=1, col=col)
            fig.update_yaxes(range=[g - 0.5, -0.5], showgrid=False, zeroline=False, dtick=1 if g <= 16 else 4,
                             scaleanchor="x" if col == 1 else "x2", constrain="domain", row=1, col=col)
        # grid lines between tokens (left panel), drawn once
        lines = [dict(type="line", xref="x", yref="y", x0=v - 0.5, x1=v - 0.5, y0=-0.5, y1=g - 0.5,
                      line=dict(color="rgba(255,255,255,0.55)", width=1)) for v in range(1, g)]
        lines += [dict(type="line", xref="x", yref="y", y0=v - 0.5, y1=v - 0.5, x0=-0.5, x1=g - 0.5,
                       line=dict(color="rgba(255,255,255,0.55)", width=1)) for v in range(1, g)]
        self._grid_shapes = lines
        fig.update_layout(**figure_layout("", 2 * self.px + 110, self.px + 70), shapes=lines)
        self.figure = go.FigureWidget(fig)
        self.image_trace, self.overlay, self.heatmap = self.figure.data
        self.overlay.on_click(self._on_click)
        self.heatmap.on_click(self._on_click)
        self.codebook.observe(lambda _: self._draw_codebook(), names="value")
        self.opacity.observe(lambda _: setattr(self.overlay, "opacity", self.opacity.value), names="value")
        self.row.observe(lambda _: self._draw_selection(), names="value")
        self.col.observe(lambda _: self._draw_selection(), names="value")
        header = W.HTML(title_html("Token grid", f"{g} × {g} tokens of {self.patch_size} × {self.patch_size} px, "
                                                 f"each with k = {k} codes (one per sub-codebook, K = {K}); "
                                                 "click a cell or use the sliders"))
        side = W.VBox([W.HTML("<b>selected patch</b> (and its surroundings)"), self.patch_image, self.table],
                      layout=W.Layout(margin="0 0 0 12px", width="250px"))
        self.widget = W.VBox([pixelated_css(), header,
                              hbox([self.codebook, self.opacity]),
                              hbox([self.row, self.col]),
                              W.HBox([self.figure, side])])

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
        with self.figure.batch_update():
            self.heatmap.z = z
            self.overlay.z = z
            self.figure.layout.annotations[1].text = f"code ids of sub-codebook {i}"

    def _draw_selection(self) -> None:
        r, c = self.row.value, self.col.value
        box = dict(type="rect", x0=c - 0.5, x1=c + 0.5, y0=r - 0.5, y1=r + 0.5, line=dict(color="#e15759", width=3))
        self.figure.layout.shapes = self._grid_shapes + [dict(box, xref="x", yref="y"),
                                                         dict(box, xref="x2", yref="y2")]
        codes = self.codes[r, c]
        k = self.num_codebooks
        rows = []
        for i in range(k):
            same = int((self.codes[..., i] == codes[i]).sum()) - 1      # other tokens of this image with that code
            rows.append([f"<span style='color:{codebook_colour(i)}'>■</span> {i}", f"<b>{int(codes[i])}</b>", same])
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
        ax.imshow(z, cmap="turbo", vmin=0, vmax=self.codebook_size - 1, interpolation="nearest")
        if g <= 16:
            for rr in range(g):
                for cc in range(g):
                    ax.text(cc, rr, str(z[rr, cc]), ha="center", va="center", fontsize=7, color="white",
                            fontweight="bold")
        ax.add_patch(_rect(c, r))
        ax.set_title(f"code ids, sub-codebook {i}", fontsize=10)
        ax = fig.add_subplot(1, 3, 3)
        ax.axis("off")
        cell = [[str(j), str(int(v))] for j, v in enumerate(self.codes[r, c])]
        table = ax.table(cellText=cell, colLabels=["sub-codebook", "code"], loc="center", cellLoc="center")
        table.scale(1, 1.3)
        ax.set_title(f"token (row {r}, col {c})", fontsize=10)
        fig.subplots_adjust(left=0.03, right=0.98, top=0.88, bottom=0.06, wspace=0.15)
        return fig


def _rect(col: int, row: int):
    from matplotlib.patches import Rectangle

    return Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="#e15759", lw=2.5)
