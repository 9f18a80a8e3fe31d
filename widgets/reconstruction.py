"""ReconstructionViewer: original | reconstruction | error map, image by image, with per-sub-codebook ablation.

    >>> viewer = ReconstructionViewer(model, ShapesDataset(32, split="test"), other_model=older_checkpoint)
    >>> viewer.index.value = 3                    # browse
    >>> viewer.ablate.value = 2                   # replace sub-codebook 2's codes ...
    >>> viewer.mode.value = "random codes"        # ... by random codes (or its most frequent code)
    >>> viewer.result["psnr"], viewer.result["psnr_ablated"]

Ablation shows what one chunk of the latent carries: every token keeps its other k - 1 codes, sub-codebook i's code
is replaced (by that sub-codebook's most frequent code over the dataset's first batch, or by random codes), and
`model.decode` renders the result. The PSNR drop says how much of the picture that chunk held.
"""
from __future__ import annotations

from typing import Optional

import torch

import ipywidgets as W
import plotly.graph_objects as go

from unitok.evaluation import image_metrics as M

from ._common import (HALF_WIDTH, IMAGE_PX, code_counts, codebook_colour, encode_images, error_map,
                      figure_layout, fmt_db, hbox, image_widget, inference, model_device, new_figure,
                      set_image, style_axes_image, take_items, title_html, to_uint8, View)

MODES = ("most frequent code", "random codes")


def _label(title: str, detail: str = "") -> str:
    """Two centred lines above an image panel (fixed height, so the panels stay aligned)."""
    return (f"<div style='text-align:center;line-height:1.35;font-size:13px'><b>{title}</b><br>"
            f"<span style='color:#444'>{detail or '&nbsp;'}</span></div>")


class ReconstructionViewer(View):
    """Browse reconstructions with PSNR, an error map, sub-codebook ablation and an optional second checkpoint.

    Args:
        model: a UniTok model.
        data: a dataset of items {"image", "caption", ...}, or images (B, 3, S, S) in [-1, 1].
        other_model: optional second UniTok (same image size) shown next to the first when `compare` is ticked.
        num_images: how many of the data's first images the `index` slider can pick (None: all).
        index: the image shown first.
        ablation_images: how many of the first images define each sub-codebook's most frequent code.
        seed: seeds the random replacement codes (same image, same sub-codebook -> same codes).
        error_vmax: absolute error mapped to the top of the colour map (pixels are in [-1, 1]).

    Drivable: `index` (IntSlider), `codebook` (Dropdown: None or the sub-codebook to ablate; `ablate` is the same
    widget under its older name), `mode` (ToggleButtons, MODES),
    `compare` (Checkbox), `drops_button` (Button: PSNR drop of every sub-codebook over the first batch).
    Read: `result` (dict: original, reconstruction, ablated, other, error_map and the PSNRs), `info` (HTML),
    `most_frequent` ((k,) codes), `panels` (name -> (label, image) widgets).
    """

    def __init__(self, model, data, *, other_model=None, num_images: Optional[int] = None, index: int = 0,
                 ablation_images: int = 64, seed: int = 0, error_vmax: float = 1.0, px: int = IMAGE_PX):
        self.model, self.other_model, self.dataset = model, other_model, data
        dataset = data
        cfg = model.config
        self.num_codebooks, self.codebook_size = cfg.num_codebooks, cfg.codebook_size
        if other_model is not None and other_model.config.image_size != cfg.image_size:
            raise ValueError(f"other_model works on {other_model.config.image_size} px images but model on "
                             f"{cfg.image_size} px; expected the same image size to compare reconstructions")
        self.seed, self.error_vmax, self.px = int(seed), float(error_vmax), int(px)
        self.num_images = len(dataset) if num_images is None else min(int(num_images), len(dataset))
        if self.num_images == 0:
            raise ValueError("ReconstructionViewer expected a non-empty dataset or image batch")

        # Most frequent code of each sub-codebook over the first batch: the "neutral" replacement for ablation.
        self.ablation_images = take_items(dataset, ablation_images)[0]
        self._batch_codes = encode_images(model, self.ablation_images)                   # (B, H, W, k)
        counts = code_counts(self._batch_codes, self.codebook_size)                     # (k, K)
        self.most_frequent = torch.from_numpy(counts.argmax(1))                         # (k,)
        self.result: dict = {}
        self.drops: Optional[dict] = None
        self._build_widgets(index)
        self.update()

    # ------------------------------------------------------------------ computation
    def _item(self, index: int) -> tuple[torch.Tensor, str]:
        images, captions, _ = take_items([self.dataset[index]] if not isinstance(self.dataset, torch.Tensor)
                                         else self.dataset[index])
        return images[0], captions[0]

    def ablate_codes(self, codes: torch.Tensor, codebook: int, mode: str, index: int = 0) -> torch.Tensor:
        """codes (B, H, W, k) with sub-codebook `codebook` replaced: its most frequent code, or random codes
        (seeded by (seed, index, codebook), so the picture is reproducible)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        out = codes.clone()
        if mode == MODES[0]:
            out[..., codebook] = self.most_frequent[codebook]
        else:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + index * 1009 + codebook)
            out[..., codebook] = torch.randint(0, self.codebook_size, out[..., codebook].shape, generator=g)
        return out

    def compute(self, index: int, ablate: Optional[int] = None, mode: str = MODES[0],
                compare: bool = False) -> dict:
        """Everything one view shows, for image `index`: tensors (3, S, S) in [-1, 1] and PSNRs in dB."""
        image, caption = self._item(index)
        device = model_device(self.model)
        x = image[None].to(device)
        with inference(self.model):
            codes = self.model.encode(x)
            recon = self.model.decode(codes).clamp(-1, 1)
            ablated = None
            if ablate is not None:
                ablated = self.model.decode(self.ablate_codes(codes, ablate, mode, index)).clamp(-1, 1)
        out = {"index": index, "caption": caption, "original": image, "codes": codes[0].cpu(),
               "reconstruction": recon[0].cpu(), "psnr": float(M.psnr(recon, x, reduction="none")[0]),
               "ablate": ablate, "mode": mode, "ablated": None, "psnr_ablated": None, "other": None,
               "psnr_other": None}
        if ablated is not None:
            out["ablated"] = ablated[0].cpu()
            out["psnr_ablated"] = float(M.psnr(ablated, x, reduction="none")[0])
        if compare and self.other_model is not None:
            with inference(self.other_model):
                xo = image[None].to(model_device(self.other_model))
                other = self.other_model.reconstruct(xo).clamp(-1, 1)
            out["other"] = other[0].cpu()
            out["psnr_other"] = float(M.psnr(other, xo, reduction="none")[0])
        shown = out["ablated"] if out["ablated"] is not None else out["reconstruction"]
        out["error_map"] = error_map(image, shown, vmax=self.error_vmax)
        return out

    def ablation_drops(self, mode: Optional[str] = None) -> dict:
        """Mean PSNR drop (dB) over the first batch when each sub-codebook in turn is ablated."""
        mode = mode or self.mode.value
        x = self.ablation_images.to(model_device(self.model))
        codes = self._batch_codes.to(x.device)
        with inference(self.model):
            base = M.psnr(self.model.decode(codes).clamp(-1, 1), x, reduction="none")
            drops = []
            for i in range(self.num_codebooks):
                # one generator per sub-codebook, as for single images (index -1 marks the batch)
                ablated = self.model.decode(self.ablate_codes(codes, i, mode, index=-1)).clamp(-1, 1)
                drops.append(float((base - M.psnr(ablated, x, reduction="none")).mean()))
        self.drops = {"mode": mode, "images": len(x), "psnr": float(base.mean()), "drops": drops}
        return self.drops

    # ------------------------------------------------------------------ widgets
    def _build_widgets(self, index: int = 0) -> None:
        k = self.num_codebooks
        self.index = W.IntSlider(value=min(max(index, 0), self.num_images - 1), min=0, max=self.num_images - 1,
                                 description="image",
                                 continuous_update=False, layout=W.Layout(width="420px"))
        self.ablate = W.Dropdown(options=[("none", None)] + [(f"sub-codebook {i}", i) for i in range(k)],
                                 value=None, description="ablate", layout=W.Layout(width="230px"))
        self.codebook = self.ablate          # the name every view gives its sub-codebook picker
        self.mode = W.ToggleButtons(options=list(MODES), value=MODES[0], style={"button_width": "150px"})
        self.compare = W.Checkbox(value=False, description="compare with other model", indent=False,
                                  disabled=self.other_model is None,
                                  tooltip="" if self.other_model is not None else "no other_model was given")
        self.drops_button = W.Button(description="PSNR drop per sub-codebook", icon="bar-chart",
                                     layout=W.Layout(width="240px"))
        self.info = W.HTML()
        names = [("original", "original"), ("reconstruction", "reconstruction"), ("ablated", "ablated"),
                 ("error", "|error|"), ("other", "other model")]
        self.panels = {}
        boxes = []
        for key, title in names:
            label = W.HTML(_label(title), layout=W.Layout(width=f"{self.px}px", height="40px"))
            image = image_widget(px=self.px)
            box = W.VBox([label, image], layout=W.Layout(align_items="center", margin="0 6px"))
            self.panels[key] = (label, image, box)
            boxes.append(box)
        self.error_legend = W.HTML(self._error_legend())
        self.panels["error"][2].children += (self.error_legend,)
        self.drops_area = W.VBox()
        for control in (self.index, self.ablate, self.mode, self.compare):
            control.observe(lambda _: self.update(), names="value")
        self.drops_button.on_click(lambda _: self._show_drops())
        header = W.HTML(title_html("Reconstructions",
                                   f"{self.num_images} images; ablation replaces one sub-codebook's codes "
                                   f"(most frequent code over the first {len(self.ablation_images)} images, "
                                   f"or random codes) and decodes"))
        self.status = self.info               # the name every view gives its message line
        self.widget = self._root([header, self.index, W.HBox([self.ablate, self.mode]),
                                  hbox([self.compare, self.drops_button], gap=20),
                                  W.HBox(boxes, layout=W.Layout(flex_flow="row wrap")), self.info, self.drops_area])

    def _error_legend(self) -> str:
        return (f"<div style='width:{self.px}px;height:10px;background:linear-gradient(to right,#000004,#420a68,"
                f"#932667,#dd513a,#fca50a,#fcffa4)'></div><div style='display:flex;justify-content:space-between;"
                f"width:{self.px}px;font-size:11px;color:#555'><span>0</span><span>|x − x̂| (mean over RGB)</span>"
                f"<span>≥ {self.error_vmax:g}</span></div>")

    def update(self) -> None:
        """Recompute and redraw for the current controls (called on every control change)."""
        r = self.result = self.compute(self.index.value, self.ablate.value, self.mode.value, self.compare.value)
        set_image(self.panels["original"][1], r["original"], self.px)
        set_image(self.panels["reconstruction"][1], r["reconstruction"], self.px)
        set_image(self.panels["error"][1], r["error_map"], self.px)
        self.panels["reconstruction"][0].value = _label("reconstruction", fmt_db(r["psnr"]))
        ablating = r["ablated"] is not None
        self.panels["ablated"][2].layout.display = None if ablating else "none"
        self.mode.disabled = not ablating
        parts = [f"<b>image {r['index']}</b>"]
        if r["caption"]:
            parts.append(f"“{r['caption']}”")
        parts.append(f"PSNR {fmt_db(r['psnr'])}")
        if ablating:
            set_image(self.panels["ablated"][1], r["ablated"], self.px)
            drop = r["psnr"] - r["psnr_ablated"]
            self.panels["ablated"][0].value = _label(f"sub-codebook {r['ablate']} ablated",
                                                     f"{fmt_db(r['psnr_ablated'])} (−{drop:.2f} dB)")
            what = (f"its most frequent code {int(self.most_frequent[r['ablate']])}" if r["mode"] == MODES[0]
                    else "random codes")
            parts.append(f"sub-codebook {r['ablate']} → {what}: {fmt_db(r['psnr_ablated'])} "
                         f"(<b>−{drop:.2f} dB</b>)")
            self.panels["error"][0].value = _label("|error|", "of the ablated reconstruction")
        else:
            self.panels["error"][0].value = _label("|error|", "of the reconstruction")
        showing_other = r["other"] is not None
        self.panels["other"][2].layout.display = None if showing_other else "none"
        if showing_other:
            set_image(self.panels["other"][1], r["other"], self.px)
            self.panels["other"][0].value = _label("other model", fmt_db(r["psnr_other"]))
            parts.append(f"other model {fmt_db(r['psnr_other'])}")
        self.info.value = "<div style='font-size:13px'>" + " · ".join(parts) + "</div>"

    def _show_drops(self) -> None:
        d = self.ablation_drops()
        k = self.num_codebooks
        fig = go.FigureWidget(
            [go.Bar(x=list(range(k)), y=d["drops"], marker_color=[codebook_colour(i) for i in range(k)],
                    hovertemplate="sub-codebook %{x}<br>−%{y:.2f} dB<extra></extra>")],
            layout=figure_layout(f"PSNR drop when one sub-codebook is ablated<br><sub>{d['mode']}, mean over "
                                 f"{d['images']} images; unablated {d['psnr']:.2f} dB</sub>", HALF_WIDTH + 200, 320,
                                 margin=dict(l=60, r=20, t=70, b=45)))
        fig.update_xaxes(title_text="sub-codebook", dtick=1)
        fig.update_yaxes(title_text="PSNR drop (dB)")
        self.drops_figure = fig
        self.drops_area.children = (fig,)

    # ------------------------------------------------------------------ static picture
    def static_figure(self):
        r = self.result
        panels = [("original", r["original"]), (f"reconstruction\n{fmt_db(r['psnr'])}", r["reconstruction"])]
        if r["ablated"] is not None:
            panels.append((f"sub-codebook {r['ablate']} ablated\n{fmt_db(r['psnr_ablated'])}", r["ablated"]))
        panels.append(("|error|", r["error_map"]))
        if r["other"] is not None:
            panels.append((f"other model\n{fmt_db(r['psnr_other'])}", r["other"]))
        fig = new_figure(2.3 * len(panels), 2.9)
        for n, (title, image) in enumerate(panels):
            ax = fig.add_subplot(1, len(panels), n + 1)
            ax.imshow(to_uint8(image), interpolation="nearest")
            style_axes_image(ax, title)
        caption = f"image {r['index']}" + (f": {r['caption']}" if r["caption"] else "")
        fig.suptitle(caption, fontsize=10)
        fig.subplots_adjust(left=0.02, right=0.98, bottom=0.03, top=0.75, wspace=0.08)
        return fig
