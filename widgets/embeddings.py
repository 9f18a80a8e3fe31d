"""TokenEmbeddingExplorer: one sub-codebook's K code vectors in 2-D, coloured by use, and the patches behind a code.

    >>> explorer = TokenEmbeddingExplorer(model, ShapesDataset(32, split="test"), num_images=256)
    >>> explorer.codebook.value = 3          # which sub-codebook
    >>> explorer.code.value = 17             # (or click a point) -> gallery of patches that use code 17

The map appears at once as a PCA projection; UMAP (which costs seconds: numba compiles on first import) is computed
in a background thread and replaces the preview when ready. Projections are cached per sub-codebook and method.
`method="pca"` never imports UMAP.
"""
from __future__ import annotations

import threading
import warnings
from typing import Optional

import numpy as np

import ipywidgets as W
import plotly.graph_objects as go

from ._common import (code_counts, draw_box, encode_images, figure_layout, hbox, inference, new_figure,
                      png_bytes, take_images, tile_grid, title_html, to_uint8, upscale, View)

METHODS = ("PCA", "UMAP")
GALLERY_PX = 48        # one patch in the gallery (a 4 px patch -> x12)
GALLERY_COLUMNS = 8


def pca_2d(vectors: np.ndarray) -> np.ndarray:
    """(K, d) -> (K, 2): projection on the two leading principal axes (zero-padded when d < 2 or K < 3)."""
    x = vectors.astype(np.float64) - vectors.mean(0, keepdims=True)
    if x.shape[0] < 2 or not np.any(x):
        return np.zeros((x.shape[0], 2))
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    out = x @ vt[:2].T
    # SVD signs are arbitrary: fix them so the picture does not flip between runs or platforms
    out *= np.where(out[np.abs(out).argmax(0), range(out.shape[1])] < 0, -1.0, 1.0)
    return np.pad(out, ((0, 0), (0, 2 - out.shape[1])))


def umap_2d(vectors: np.ndarray, seed: int = 0, **kwargs) -> np.ndarray:
    """(K, d) -> (K, 2) with UMAP (cosine metric: the codes are compared by cosine in the quantizer)."""
    import umap  # slow first import (numba); only ever called from the background thread or on request

    n = vectors.shape[0]
    if n < 4:
        return pca_2d(vectors)
    params = dict(n_neighbors=min(15, n - 1), min_dist=0.1, metric="cosine", random_state=seed, n_jobs=1)
    params.update(kwargs)
    with warnings.catch_warnings():   # a fixed random_state makes UMAP single-threaded, and it says so; we know
        warnings.simplefilter("ignore", UserWarning)
        return umap.UMAP(**params).fit_transform(vectors.astype(np.float32)).astype(np.float64)


class TokenEmbeddingExplorer(View):
    """Scatter of a sub-codebook's code vectors (PCA preview, then UMAP), coloured by how often each code is used
    on `num_images` images; selecting a code shows the image patches whose token uses it.

    Args:
        model: a UniTok model (its `quantizer.codebook_vectors()` are the points).
        data: images to count code use on and to cut patches from (dataset, tensor or list); None = no counts,
            no gallery.
        num_images: how many of the dataset's first images to encode.
        method: "umap" (PCA preview, UMAP in a background thread) or "pca" (PCA only; UMAP only if asked for).
        max_patches: at most this many patches in the gallery.
        context: 0 = the patch alone; 1 = the patch with one patch of surroundings, the patch outlined.

    Drivable: `codebook` (Dropdown), `method` (ToggleButtons "PCA"/"UMAP"), `code` (BoundedIntText),
    `show_context` (Checkbox); clicking a point in `figure` sets `code`. Read: `counts` ((k, K)), `projection()`,
    `gallery_positions` ((b, row, col) of shown patches), `gallery_count`, `gallery_total`, `gallery` (Image).
    `wait()` joins the UMAP thread.
    """

    def __init__(self, model, data=None, *, num_images: int = 256, method: str = "umap", max_patches: int = 48,
                 context: int = 0, seed: int = 0, umap_kwargs: Optional[dict] = None):
        dataset = data
        if method.lower() not in ("umap", "pca"):
            raise ValueError(f"method must be 'umap' or 'pca', got {method!r}")
        cfg = model.config
        self.model = model
        self.num_codebooks, self.codebook_size = cfg.num_codebooks, cfg.codebook_size
        self.patch_size, self.grid_size = cfg.patch_size, cfg.grid_size
        self.max_patches, self.seed, self.umap_kwargs = int(max_patches), int(seed), dict(umap_kwargs or {})
        with inference(model):        # the model's lock: a dashboard may be updating these codebooks right now
            self.vectors = model.quantizer.codebook_vectors().detach().float().cpu().numpy()   # (k, K, d)
        if dataset is not None:
            self.images = take_images(dataset, num_images)                                         # (B, 3, S, S)
            self.codes = encode_images(model, self.images)                                         # (B, H, W, k)
            self.counts = code_counts(self.codes, self.codebook_size)                              # (k, K)
        else:
            self.images = self.codes = None
            self.counts = np.zeros((self.num_codebooks, self.codebook_size), dtype=np.int64)
        self.window_tokens = 0 if self.codes is None else int(self.codes[..., 0].numel())
        self._cache: dict[tuple[str, int], np.ndarray] = {}
        self._cache_lock = threading.Lock()
        self._umap_thread: Optional[threading.Thread] = None
        self.umap_error: Optional[BaseException] = None
        self.gallery_positions: list[tuple[int, int, int]] = []
        self.gallery_count = self.gallery_total = 0
        self._build_widgets(context, "UMAP" if method.lower() == "umap" else "PCA")
        self._redraw_map()
        self._draw_gallery()

    # ------------------------------------------------------------------ projections
    def projection(self, codebook: Optional[int] = None, method: Optional[str] = None) -> Optional[np.ndarray]:
        """(K, 2) coordinates for a sub-codebook: PCA at once; UMAP if cached (None while it is being computed)."""
        i = self.codebook.value if codebook is None else codebook
        method = (method or self.method.value).upper()
        with self._cache_lock:
            if (method, i) in self._cache:
                return self._cache[(method, i)]
        if method == "PCA":
            xy = pca_2d(self.vectors[i])
            with self._cache_lock:
                self._cache[("PCA", i)] = xy
            return xy
        return None

    def compute_umap(self, codebook: int) -> np.ndarray:
        """UMAP coordinates for one sub-codebook, computed here (blocking) and cached."""
        xy = umap_2d(self.vectors[codebook], seed=self.seed, **self.umap_kwargs)
        with self._cache_lock:
            self._cache[("UMAP", codebook)] = xy
        return xy

    def _ensure_umap(self) -> None:
        """Start the background UMAP for the selected sub-codebook unless cached or already running."""
        if self._umap_thread is not None and self._umap_thread.is_alive():
            return                        # the running thread picks up the current selection when it finishes
        # (pandas, which `import umap` pulls in, is already imported by _common: see the note there)
        self._umap_thread = threading.Thread(target=self._umap_worker, name="unitok-umap", daemon=True)
        self._umap_thread.start()

    def _umap_worker(self) -> None:
        # Keep going while the selection asks for a UMAP we do not have yet (the user may switch meanwhile).
        while not self.closed and self.method.value == "UMAP" and self.projection() is None:
            i = self.codebook.value
            try:
                self.compute_umap(i)
            except Exception as error:   # e.g. umap-learn missing: stay on PCA and say why
                self.umap_error = error
                self.status.value = f"<span style='color:#c33'>UMAP failed ({error}); showing PCA</span>"
                return
            if not self.closed and self.codebook.value == i and self.method.value == "UMAP":
                self._redraw_map()

    def wait(self, timeout: Optional[float] = None) -> None:
        """Join the background UMAP thread (if any)."""
        if self._umap_thread is not None:
            self._umap_thread.join(timeout)

    def close(self) -> None:
        """Stop redrawing from the UMAP thread (it finishes its current fit in the background) and close the
        widgets."""
        super().close()

    # ------------------------------------------------------------------ widgets
    def _build_widgets(self, context: int, method: str) -> None:
        k, K = self.num_codebooks, self.codebook_size
        self.codebook = W.Dropdown(options=[(f"sub-codebook {i}", i) for i in range(k)], value=0,
                                   description="codebook", layout=W.Layout(width="240px"))
        self.method = W.ToggleButtons(options=list(METHODS), value=method, style={"button_width": "70px"})
        self.code = W.BoundedIntText(value=int(self.counts[0].argmax()), min=0, max=K - 1, description="code",
                                     layout=W.Layout(width="170px"))
        self.show_context = W.Checkbox(value=bool(context), description="show surroundings", indent=False)
        self.status = W.HTML()
        self.figure = go.FigureWidget(layout=figure_layout("", 560, 500))
        self.figure.add_scatter(x=[], y=[], mode="markers", name="codes",
                                marker=dict(size=8, colorscale="Viridis", cmin=0, showscale=True,
                                            line=dict(width=0.5, color="#333"),
                                            colorbar=dict(title=dict(text="tokens", side="right"))),
                                hovertemplate="code %{customdata[0]}<br>%{customdata[1]} tokens "
                                              "(%{customdata[2]:.2%})<extra></extra>")
        self.figure.add_scatter(x=[], y=[], mode="markers", name="selected", hoverinfo="skip",
                                marker=dict(size=18, color="rgba(0,0,0,0)", line=dict(width=3, color="#e15759")))
        self.figure.update_layout(showlegend=False, xaxis=dict(zeroline=False, title=""),
                                  yaxis=dict(zeroline=False, title="", scaleanchor="x"), dragmode="pan")
        self.points, self.highlight = self.figure.data[0], self.figure.data[1]
        self.points.on_click(self._on_click)
        self.gallery = W.Image(format="png")
        self.gallery.add_class("unitok-pixelated")
        self.gallery_label = W.HTML()
        self.codebook.observe(lambda _: self._on_codebook(), names="value")
        self.method.observe(lambda _: self._redraw_map(), names="value")
        self.code.observe(lambda _: self._draw_gallery(), names="value")
        self.show_context.observe(lambda _: self._draw_gallery(), names="value")
        note = (f"colour = tokens using the code among {self.window_tokens:,} tokens of "
                f"{0 if self.images is None else len(self.images)} images" if self.images is not None
                else "no images given: no usage colours, no gallery")
        header = W.HTML(title_html("Token embeddings", f"each point is one of the K = {K} code vectors of the "
                                                      f"chosen sub-codebook; {note}"))
        gallery_box = W.VBox([hbox([self.code, self.show_context]),
                              self.gallery_label, self.gallery],
                             layout=W.Layout(width=f"{GALLERY_COLUMNS * (GALLERY_PX + 3) + 20}px", margin="0 0 0 12px"))
        self.widget = self._root([header, hbox([self.codebook, self.method, self.status]),
                                  W.HBox([self.figure, gallery_box], layout=W.Layout(flex_flow="row wrap"))])

    def _on_codebook(self) -> None:
        # a fresh sub-codebook: start on its most used code
        self.code.value = int(self.counts[self.codebook.value].argmax())
        self._redraw_map()
        self._draw_gallery()

    def _on_click(self, trace, points, selector) -> None:
        if points.point_inds:
            self.code.value = int(points.point_inds[0])

    def select_code(self, code: int) -> None:
        """Same as clicking the point of `code`."""
        self.code.value = int(code)

    def _redraw_map(self) -> None:
        i, method = self.codebook.value, self.method.value
        xy = self.projection(i, method)
        shown = method
        if xy is None and self.umap_error is not None:      # UMAP failed once: do not retry on every redraw
            xy, shown = self.projection(i, "PCA"), "PCA"
            self.status.value = f"<span style='color:#c33'>UMAP failed ({self.umap_error}); showing PCA</span>"
        elif xy is None:                  # UMAP not ready: PCA preview now, the thread redraws later
            xy, shown = self.projection(i, "PCA"), "PCA"
            self.status.value = "<span style='color:#c80'>computing UMAP in the background… showing PCA</span>"
            self._ensure_umap()
        else:
            self.status.value = f"<span style='color:#555'>{method} of {self.vectors.shape[-1]}-d code vectors</span>"
        counts = self.counts[i]
        total = max(1, self.window_tokens)
        with self.figure.batch_update():
            self.points.x, self.points.y = xy[:, 0], xy[:, 1]
            self.points.marker.color = counts
            self.points.marker.cmax = max(1, int(counts.max()))
            self.points.customdata = np.stack([np.arange(self.codebook_size), counts, counts / total], 1)
            used = int((counts > 0).sum())
            self.figure.layout.title.text = (f"sub-codebook {i}: {self.codebook_size} codes, {shown}"
                                             + (f" · {used} used" if self.images is not None else ""))
            self._draw_highlight(xy)
        self.shown_method = shown

    def _draw_highlight(self, xy: Optional[np.ndarray] = None) -> None:
        xy = xy if xy is not None else (self.projection() if self.projection() is not None
                                        else self.projection(method="PCA"))
        c = self.code.value
        self.highlight.x, self.highlight.y = [xy[c, 0]], [xy[c, 1]]

    # ------------------------------------------------------------------ gallery
    def patch_positions(self, codebook: int, code: int) -> list[tuple[int, int, int]]:
        """(image, row, col) of every token whose sub-codebook `codebook` code is `code` (row-major order)."""
        if self.codes is None:
            return []
        return [tuple(int(v) for v in p) for p in (self.codes[..., codebook] == code).nonzero().tolist()]

    def _patch_tile(self, b: int, r: int, c: int, context: int) -> np.ndarray:
        p = self.patch_size
        image = to_uint8(self.images[b])                                       # (S, S, 3)
        if context:
            padded = np.pad(image, ((p * context,) * 2, (p * context,) * 2, (0, 0)), constant_values=128)
            size = p * (2 * context + 1)
            crop = padded[r * p:r * p + size, c * p:c * p + size]           # centred on the patch
            tile = upscale(crop, size=GALLERY_PX)
            f = tile.shape[0] // size
            return draw_box(tile, context * p * f, context * p * f, p * f, width=max(2, f // 3))
        return upscale(image[r * p:(r + 1) * p, c * p:(c + 1) * p], size=GALLERY_PX)

    def _draw_gallery(self) -> None:
        i, j = self.codebook.value, self.code.value
        positions = self.patch_positions(i, j)
        shown = positions[:self.max_patches]
        self.gallery_total, self.gallery_count, self.gallery_positions = len(positions), len(shown), shown
        context = int(self.show_context.value)
        tiles = [self._patch_tile(b, r, c, context) for b, r, c in shown]
        if self.images is None:
            self.gallery_label.value = "<i>no images given</i>"
        else:
            self.gallery_label.value = (f"<b>code {j}</b> of sub-codebook {i}: used by <b>{len(positions)}</b> of "
                                        f"{self.window_tokens:,} tokens" +
                                        (f"; showing the first {len(shown)}" if len(shown) < len(positions) else ""))
        self.gallery.value = png_bytes(tile_grid(tiles, ncol=GALLERY_COLUMNS, pad=3)) if tiles else png_bytes(
            np.full((GALLERY_PX, GALLERY_PX, 3), 245, np.uint8))
        self.highlight_code = j
        with self.figure.batch_update():
            self._draw_highlight()

    # ------------------------------------------------------------------ static picture
    def static_figure(self):
        i = self.codebook.value
        xy = self.projection(i) if self.projection(i) is not None else self.projection(i, "PCA")
        fig = new_figure(10, 4.6)
        ax = fig.add_subplot(1, 2, 1)
        counts = self.counts[i]
        order = np.argsort(counts)   # draw frequent codes last, on top
        points = ax.scatter(xy[order, 0], xy[order, 1], c=counts[order], cmap="viridis", s=18, edgecolors="#333",
                            linewidths=0.3)
        c = self.code.value
        ax.scatter([xy[c, 0]], [xy[c, 1]], s=160, facecolors="none", edgecolors="#e15759", linewidths=2)
        fig.colorbar(points, ax=ax, label="tokens", fraction=0.046)
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_title(f"sub-codebook {i}: {self.codebook_size} code vectors ({self.shown_method})", fontsize=10)
        ax = fig.add_subplot(1, 2, 2)
        tiles = [self._patch_tile(b, r, cc, int(self.show_context.value)) for b, r, cc in self.gallery_positions]
        ax.imshow(tile_grid(tiles, ncol=6), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"patches using code {c} ({self.gallery_total} tokens, {self.gallery_count} shown)", fontsize=10)
        fig.subplots_adjust(left=0.05, right=0.98, top=0.9, bottom=0.05, wspace=0.15)
        return fig
