"""GenerationExplorer: sample images from a token generator, watch one being drawn position by position, and poke it.

    >>> view = GenerationExplorer(generator)             # a TokenGenerator with its tokenizer attached
    >>> view.prompt.value = "a red star"                 # (a class picker instead, for class-conditional models)
    >>> view.cfg_scale.value = 3.0; view.sample()        # a grid of `num_images` samples
    >>> view.step()                                      # the focus image gains one position: its k sub-codes,
    >>> view.last_choices                                #   drawn one after another by the depth head
    >>> view.resample(3, 5)                              # (or click a cell) redraw that position only
    >>> view.entropy                                     # (H, W) bits: how unsure the model is at each position

Left: the sampled grid. Middle: the focus image (the first sample, or the one being stepped), with the token grid;
click a cell to resample it (positions after it keep their codes). Right: per-position entropy in bits, the sum
over the k sub-codes of each sub-code's entropy given the sub-codes before it (teacher-forced on the focus codes).
The table under the figure lists the depth head's k choices at the last drawn position.
"""
from __future__ import annotations

import numpy as np
import torch

import ipywidgets as W
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ._common import (WIDE_LABEL, View, figure_layout, hbox, html_table, image_widget, new_figure, set_image, tile_grid,
                      title_html, to_uint8, upscale)

GRID_TILE_PX = 96


class GenerationExplorer(View):
    """Sample, step through and edit generated images. See the module docstring.

    Args:
        generator: a `unitok.generator.model.TokenGenerator` with its tokenizer attached.
        data: unused (kept for the shared view signature).
        prompt: the first prompt (text models) or class index (class models).
        num_images: samples in the grid (a multiple of 4 reads best).
        seed: the first sampling seed.
        px: on-screen size of the focus image and of the entropy map.
        sampling: starting temperature / top_k / top_p / cfg_scale (default: the generator's recommendation
            in `generator.sampling`, else temperature 1, no top-k, CFG 3).

    Drivable: `prompt` (Text) or `label` (Dropdown), `temperature`, `top_k`, `cfg_scale`, `best_of` (sliders; best
    of n applies to Sample: each image is the candidate the tokenizer matches best to the prompt), `seed`
    (IntText); `sample()`, `step()`, `resample(row, col)`. Read: `codes` (B, H, W, k), `focus_codes` (H, W, k),
    `filled` (positions drawn in the focus image), `last_choices` (list of (code, probability, entropy bits)),
    `entropy` (H, W) numpy, `figure`, `status`.
    """

    def __init__(self, generator, data=None, *, prompt="a red circle", num_images: int = 8, seed: int = 0,
                 px: int = 260, sampling: dict | None = None):
        self.generator = generator
        cfg = generator.config
        self.grid_size, self.k, self.K = cfg.grid_size, cfg.num_codebooks, cfg.codebook_size
        self.image_size = generator.tokenizer.config.image_size
        self.num_images, self.px = int(num_images), int(px)
        start = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "cfg_scale": 3.0}
        start.update(getattr(generator, "sampling", None) or {})
        start.update(sampling or {})
        self.top_p = float(start["top_p"])
        self._build_widgets(prompt, seed, start)
        self.codes = None
        self.focus_codes = None
        self.filled = 0
        self.last_choices: list = []
        self.entropy = np.zeros((self.grid_size, self.grid_size))
        self._stepper = None
        self.sample()

    # ------------------------------------------------------------------ conditions and settings
    def _condition(self) -> dict:
        if self.generator.config.condition == "class":
            return {"labels": [int(self.label.value)]}
        return {"prompts": [self.prompt.value]}

    def settings(self) -> dict:
        return dict(temperature=float(self.temperature.value), top_k=int(self.top_k.value), top_p=self.top_p,
                    cfg_scale=float(self.cfg_scale.value))

    # ------------------------------------------------------------------ actions
    def sample(self, *_):
        """A fresh grid of samples for the current prompt and settings; the first one becomes the focus image."""
        try:
            with torch.no_grad():
                self.codes = self.generator.generate(**self._condition(), num=self.num_images,
                                                     seed=int(self.seed.value), rerank=int(self.best_of.value),
                                                     **self.settings()).cpu()
        except ValueError as error:   # an empty prompt, an unknown class: say so, keep the old picture
            self.status.value = f"<span style='color:#b00'>{error}</span>"
            return
        self.images = self.generator.decode(self.codes).cpu()
        self.focus_codes = self.codes[0].clone()
        self.filled = self.grid_size ** 2
        self._stepper = None
        self.last_choices = []
        best = f", each the best of {self.best_of.value} by the tokenizer's match" if self.best_of.value > 1 else ""
        self.status.value = (f"{self.num_images} samples, seed {self.seed.value}: "
                             + ", ".join(f"{k}={v}" for k, v in self.settings().items()) + best)
        self._draw_grid()
        self._refresh_focus()

    def step(self, *_):
        """Draw one more position of a new focus image (starting a new one after the last position)."""
        if self._stepper is None or self.filled >= self.grid_size ** 2:
            cond = self.generator.encode_condition(**self._condition())
            self.focus_codes = torch.zeros(1, self.grid_size, self.grid_size, self.k, dtype=torch.long,
                                           device=self.generator.device)
            self._stepper = self.generator.sample_steps(cond, seed=int(self.seed.value) + 1000,
                                                        codes=self.focus_codes, **self.settings())
            self.filled = 0
            self.entropy = np.full((self.grid_size, self.grid_size), np.nan)
        drawn = next(self._stepper)
        self.filled = drawn.position + 1
        self.last_choices = [(int(drawn.codes[0, i]), float(drawn.probs[0, i]), float(drawn.entropy[0, i]))
                             for i in range(self.k)]
        # while stepping, the map fills in as positions are drawn: each one's entropy summed over its k sub-codes
        self.entropy[divmod(drawn.position, self.grid_size)] = sum(e for _, _, e in self.last_choices)
        self._refresh_focus(drawn.position)
        if self.filled == self.grid_size ** 2:
            self.focus_codes = self.focus_codes[0].cpu()
            self._stepper = None
            self.status.value = "the focus image is complete; Step again starts a new one"

    def resample(self, row: int, col: int) -> None:
        """Redraw the k sub-codes at (row, col) of the focus image; later positions keep their codes."""
        if self.filled < self.grid_size ** 2:
            self.status.value = "finish stepping the focus image first (or press Sample)"
            return
        seed = int(self.seed.value) + 7919 * (row * self.grid_size + col) + int(np.random.randint(1 << 20))
        new = self.generator.resample_position(self.focus_codes[None], row, col, **self._condition(), seed=seed,
                                               **self.settings())
        changed = (new[0].cpu() != self.focus_codes).any(-1).sum().item()
        self.focus_codes = new[0].cpu()
        self.status.value = f"resampled row {row}, col {col} ({'new codes' if changed else 'the same codes again'})"
        self._refresh_focus(row * self.grid_size + col)

    # ------------------------------------------------------------------ drawing
    def _focus_image(self) -> np.ndarray:
        """(S, S, 3) uint8 of the focus codes; positions not yet drawn are shown as grey."""
        codes = self.focus_codes if self.focus_codes.ndim == 4 else self.focus_codes[None]
        with torch.no_grad():
            image = to_uint8(self.generator.decode(codes.to(self.generator.device))[0].cpu())
        if self.filled < self.grid_size ** 2:
            p = self.image_size // self.grid_size
            mask = np.zeros((self.grid_size ** 2,), bool)
            mask[self.filled:] = True
            mask = upscale(mask.reshape(self.grid_size, self.grid_size).astype(np.uint8), factor=p).astype(bool)
            image = image.copy()
            image[mask] = 128
        return image

    def _refresh_focus(self, position: int | None = None) -> None:
        codes = self.focus_codes if self.focus_codes.ndim == 4 else self.focus_codes[None]
        if self.filled == self.grid_size ** 2:
            maps = self.generator.position_maps(codes.to(self.generator.device), **self._condition())
            self.entropy = maps["entropy"][0].cpu().numpy()
        with self.figure.batch_update():
            self.image_trace.z = self._focus_image()
            ent = self.entropy.copy()
            self.entropy_trace.z = ent if np.isfinite(ent).all() else np.where(np.isfinite(ent), ent, None).tolist()
            if position is not None:
                r, c = divmod(position, self.grid_size)
                self.figure.layout.shapes = [dict(type="rect", xref="x", yref="y", x0=c - 0.5, x1=c + 0.5,
                                                  y0=r - 0.5, y1=r + 0.5, line=dict(color="#ff2828", width=2))]
            else:
                self.figure.layout.shapes = []
        self.table.value = self._choices_table()

    def _choices_table(self) -> str:
        if not self.last_choices:
            return "<i>press Step to watch the depth head draw one position's sub-codes</i>"
        rows = [(f"sub-code {i + 1}", code, f"{p:.3f}", f"{h:.2f}") for i, (code, p, h) in
                enumerate(self.last_choices)]
        r, c = divmod(self.filled - 1, self.grid_size)
        return html_table(["", "code", "probability", "entropy (bits)"], rows,
                          caption=f"position {self.filled - 1} (row {r}, col {c}): the depth head's k choices, "
                                  f"each given the ones above it")

    def _draw_grid(self) -> None:
        tiles = [upscale(to_uint8(img), size=GRID_TILE_PX) for img in self.images]
        set_image(self.grid_image, tile_grid(tiles, ncol=4), px=None)

    def _build_widgets(self, prompt, seed: int, start: dict) -> None:
        cfg = self.generator.config
        if cfg.condition == "class":
            names = cfg.class_names or [str(i) for i in range(cfg.num_classes)]
            value = prompt if isinstance(prompt, int) else 0
            self.label = W.Dropdown(options=[(n, i) for i, n in enumerate(names)], value=value, description="class",
                                    layout=W.Layout(width="260px"))
            self.prompt = None
            cond_widget = self.label
        else:
            self.prompt = W.Text(value=str(prompt), description="prompt", continuous_update=False,
                                 layout=W.Layout(width="320px"))
            self.label = None
            cond_widget = self.prompt
        self.temperature = W.FloatSlider(value=start["temperature"], min=0.1, max=2.0, step=0.05,
                                         description="temperature", style=WIDE_LABEL,
                                         layout=W.Layout(width="260px"))
        self.top_k = W.IntSlider(value=start["top_k"], min=0, max=self.K, step=1, description="top-k (0 = off)",
                                 style=WIDE_LABEL, layout=W.Layout(width="260px"))
        self.cfg_scale = W.FloatSlider(value=start["cfg_scale"], min=0.0, max=8.0, step=0.25, description="CFG",
                                       style=WIDE_LABEL, layout=W.Layout(width="250px"))
        # best of n (Sample only): the tokenizer's own CLIP side keeps the candidate closest to the prompt
        self.best_of = W.IntSlider(value=1, min=1, max=16, step=1, description="best of",
                                   layout=W.Layout(width="300px"))
        self.seed = W.IntText(value=int(seed), description="seed", layout=W.Layout(width="160px"))
        self.sample_button = W.Button(description="Sample", button_style="primary", layout=W.Layout(width="100px"))
        self.step_button = W.Button(description="Step", layout=W.Layout(width="100px"))
        self.sample_button.on_click(self.sample)
        self.step_button.on_click(self.step)
        self.status = W.HTML()
        self.table = W.HTML()
        self.grid_image = image_widget(px=4 * GRID_TILE_PX)
        self.grid_image.layout = W.Layout(width=f"{4 * GRID_TILE_PX}px", height="auto")
        g, p = self.grid_size, self.image_size // self.grid_size
        fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.08,
                            subplot_titles=("focus image (click a cell to resample it)", "entropy per position (bits)"))
        step = 1.0 / p
        fig.add_trace(go.Image(z=np.zeros((g * p, g * p, 3), np.uint8), x0=-0.5 + step / 2, dx=step,
                               y0=-0.5 + step / 2, dy=step, hoverinfo="skip"), row=1, col=1)
        cells = list(range(g))
        fig.add_trace(go.Heatmap(x=cells, y=cells, z=np.zeros((g, g)), opacity=0.0, showscale=False,
                                 hovertemplate="row %{y}, col %{x}: click to resample<extra></extra>"), row=1, col=1)
        fig.add_trace(go.Heatmap(x=cells, y=cells, z=np.zeros((g, g)), colorscale="Viridis", xgap=1, ygap=1,
                                 colorbar=dict(title="bits", len=0.8),
                                 hovertemplate="row %{y}, col %{x}: %{z:.2f} bits<extra></extra>"), row=1, col=2)
        for col in (1, 2):
            fig.update_xaxes(range=[-0.5, g - 0.5], showgrid=False, zeroline=False, constrain="domain", row=1, col=col)
            fig.update_yaxes(range=[g - 0.5, -0.5], showgrid=False, zeroline=False, constrain="domain",
                             scaleanchor="x" if col == 1 else "x2", row=1, col=col)
        fig.update_layout(**figure_layout("", 2 * self.px + 90, self.px + 70, margin=dict(l=30, r=10, t=40, b=30)))
        self.figure = go.FigureWidget(fig)
        self.image_trace, self.click_trace, self.entropy_trace = self.figure.data
        self.click_trace.on_click(self._on_click)
        controls = W.VBox([hbox([cond_widget, self.seed, self.sample_button, self.step_button]),
                           hbox([self.temperature, self.top_k, self.cfg_scale]), hbox([self.best_of])])
        body = W.HBox([W.VBox([W.HTML("<b>samples</b>"), self.grid_image]), self.figure],
                      layout=W.Layout(align_items="flex-start"))
        self.widget = self._root([W.HTML(title_html("Generation explorer",
                                                    "sample, step through one image, click a cell to resample")),
                                  controls, body, self.table, self.status])

    def _on_click(self, trace, points, state) -> None:
        if points.point_inds:
            self.resample(int(points.ys[0]), int(points.xs[0]))

    # ------------------------------------------------------------------ static
    def static_figure(self):
        """A matplotlib figure of the sampled grid, the focus image and its entropy map."""
        fig = new_figure(10, 3.6)
        ax = fig.add_subplot(1, 3, 1)
        ax.imshow(tile_grid([to_uint8(img) for img in self.images], ncol=4), interpolation="nearest")
        ax.set_title("samples: " + (self.prompt.value if self.prompt is not None else
                                    f"class {self.label.value}"), fontsize=9)
        ax.axis("off")
        ax = fig.add_subplot(1, 3, 2)
        ax.imshow(self._focus_image(), interpolation="nearest")
        ax.set_title("focus image", fontsize=9)
        ax.axis("off")
        ax = fig.add_subplot(1, 3, 3)
        im = ax.imshow(self.entropy, cmap="viridis")
        fig.colorbar(im, ax=ax, fraction=0.046, label="bits")
        ax.set_title("entropy per position", fontsize=9)
        fig.tight_layout()
        return fig

    def close(self) -> None:
        self._stepper = None
        super().close()
