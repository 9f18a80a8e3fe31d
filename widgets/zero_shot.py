"""ZeroShotPanel: type class names and prompt templates, pick an image, see the ranked zero-shot predictions.

    >>> panel = ZeroShotPanel(model, ShapesDataset(32, split="test", max_objects=1))
    >>> panel.classes.value = "circle, square, triangle"      # one per line, or comma-separated on one line
    >>> panel.templates.value = "a photo of a {}.\\na drawing of a {}."
    >>> panel.index.value = 5
    >>> panel.ranking                                         # [(class, probability), ...] best first

Scores follow CLIP: each class's text feature is the normalised mean over templates of
`model.encode_text(template.format(name))` (`unitok.evaluation.zero_shot.zero_shot_classifier`), and the probabilities are
softmax(scale · cos(image feature, class feature)) over the classes, scale = 100 as in CLIP's zero-shot evaluation.
A scale of 100 turns small differences in cosine into near-certain probabilities (a cosine 0.05 higher is a factor
e^5 ≈ 148 in odds), so every bar also shows its cosine, and `scale` can be switched to the model's own learned
temperature exp(logit_scale) or to 10 or 1 to see how peaked "100 %" really is.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

import ipywidgets as W
import plotly.graph_objects as go

from unitok.evaluation import zero_shot as M

from ._common import (figure_layout, image_widget, inference, model_device, new_figure, set_image, take_items,
                      title_html, to_uint8, View)

DEFAULT_TEMPLATES = ("a photo of a {}.",)
FALLBACK_CLASSES = ("circle", "square", "triangle", "star", "heart")
PANEL_PX = 160          # the image panel: small enough that controls, image and bars fit in ~960 px


def parse_names(text: str) -> tuple[list[str], str]:
    """Class names from a text box -> (names, note).

    One name per line; a single line with commas is split at the commas ("circle, star, heart" is three classes,
    which is what people type). With several lines, commas stay inside a line, so full prompts such as
    "a red star, on the left" (with the template "{}") keep working. The note says what was read when that is
    not obvious ("" otherwise).
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) == 1 and "," in lines[0]:
        names = [part.strip() for part in lines[0].split(",") if part.strip()]
        return names, f"read {len(names)} comma-separated class names"
    return lines, ""


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


class ZeroShotPanel(View):
    """Zero-shot classification of chosen images against editable class names and prompt templates.

    Args:
        model: a UniTok model (`encode_image`, `encode_text`, `tokenize`).
        data: a dataset, images (B, 3, S, S) in [-1, 1], a list of items, or None (then upload your own).
        classnames: initial class names; default: the dataset's first zero-shot task (e.g. the shapes' "shape"
            task) when it has `zero_shot_tasks`, else a few shape names.
        templates: initial prompt templates, each with one "{}" (use "{}" alone for full prompts per line).
        num_images: how many of the dataset's first images can be picked.
        index: the image shown first.
        top: bars shown (the most probable classes).
        scale: logit multiplier before the softmax (100, as CLIP's zero-shot evaluation).
        px: on-screen size of the image.

    Layout: three columns (text boxes with the Apply button under them, the image, the bars) that wrap onto a
    second row when the output area is narrower than about 960 px, so nothing overlaps or scrolls away.

    Drivable: `classes` and `templates` (Textareas; applied on blur or with `apply_button`), `index`
    (IntSlider), `scale` (Dropdown), `upload` (FileUpload). Read: `classnames`, `template_list`, `classifier`
    ((E, C)), `cosines` ((N, C)), `probabilities` ((N, C)), `ranking` (current image), `predict(indices)`,
    `figure` (FigureWidget), `status` (HTML: errors and warnings, e.g. a single class).
    """

    def __init__(self, model, data=None, *, classnames: Optional[Sequence[str]] = None,
                 templates: Sequence[str] = DEFAULT_TEMPLATES, num_images: int = 64, index: int = 0, top: int = 10,
                 scale: float = 100.0, px: int = PANEL_PX):
        self.model, self.top, self.px = model, int(top), int(px)
        self.label_key: Optional[str] = None
        task_classes = None
        tasks_of = getattr(data, "zero_shot_tasks", None)
        if callable(tasks_of):            # e.g. ShapesDataset: class names and the label key of its first task
            names, _, self.label_key = next(iter(tasks_of().values()))
            task_classes = list(names)
        self.task_classes = task_classes
        self.classnames = list(classnames) if classnames is not None else list(task_classes or FALLBACK_CLASSES)
        self.template_list = list(templates)
        if data is not None:
            self.images, self.captions, self.labels = take_items(data, num_images)
        else:
            S = model.config.image_size
            self.images, self.captions, self.labels = torch.empty(0, 3, S, S), [], []
        with torch.no_grad():
            self.learned_scale = float(model.logit_scale.detach().float().exp())
        self.image_features = self._encode(self.images)                                   # (N, E)
        self.classifier = self._classifier(self.classnames, self.template_list)           # (E, C)
        self._build_widgets(float(scale), int(index))
        self._update_probabilities()
        self._warn_if_single(self.classnames, "")
        self.update()

    # ------------------------------------------------------------------ computation
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        if len(images) == 0:
            return torch.empty(0, self.model.config.embed_dim)
        with inference(self.model):
            return self.model.encode_image(images.to(model_device(self.model))).float().cpu()

    def _classifier(self, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        if not classnames:
            raise ValueError("expected at least one class name (one per line, or comma-separated)")
        if not templates:
            raise ValueError("expected at least one template, e.g. 'a photo of a {}.'")
        bad = [t for t in templates if t.count("{}") != 1]
        if bad:
            raise ValueError(f"every template needs exactly one '{{}}' for the class name; check {bad[0]!r} "
                             "(use '{}' alone to take each line as a full prompt)")
        with inference(self.model):
            return M.zero_shot_classifier(self.model, list(classnames), list(templates)).float().cpu()

    @property
    def scale_value(self) -> float:
        return float(self.scale.value)

    def _update_probabilities(self) -> None:
        self.cosines = self.image_features @ self.classifier                              # (N, C) in [-1, 1]
        self.probabilities = (self.scale_value * self.cosines).softmax(dim=-1)

    def predict(self, indices: Optional[Sequence[int]] = None) -> list[list[tuple[str, float]]]:
        """For each chosen image, [(class, probability), ...] sorted best first."""
        indices = range(len(self.images)) if indices is None else indices
        out = []
        for i in indices:
            p = self.probabilities[i]
            order = torch.argsort(p, descending=True, stable=True).tolist()
            out.append([(self.classnames[j], float(p[j])) for j in order])
        return out

    @property
    def ranking(self) -> list[tuple[str, float]]:
        return self.predict([self.index.value])[0] if len(self.images) else []

    def truth(self, index: int) -> Optional[str]:
        """The image's true class, when the class list is still the dataset task's (else None)."""
        if self.label_key is None or self.classnames != self.task_classes or index >= len(self.labels):
            return None
        label = self.labels[index].get(self.label_key)
        return None if label is None else self.task_classes[int(label)]

    # ------------------------------------------------------------------ widgets
    def _build_widgets(self, scale: float, index: int) -> None:
        n = len(self.images)
        column = "260px"
        # Text boxes a few px narrower than their column: ipywidgets adds a margin to a 100 % textarea, which would
        # push its right edge past the column (cut off by the next column at narrow widths).
        box_width = "252px"
        label = "<div style='font-size:12px;color:#444;margin:2px 0'>{}</div>"
        self.classes = W.Textarea(value="\n".join(self.classnames), rows=7, continuous_update=False,
                                  placeholder="circle\nsquare\n… (or: circle, square, …)",
                                  layout=W.Layout(width=box_width))
        self.templates = W.Textarea(value="\n".join(self.template_list), rows=3, continuous_update=False,
                                    layout=W.Layout(width=box_width))
        self.apply_button = W.Button(description="Apply", icon="refresh", button_style="primary",
                                     tooltip="read the class names and templates again",
                                     layout=W.Layout(width="100px"))
        learned = round(self.learned_scale, 4)
        if abs(learned - 100.0) < 0.05:   # trained to the clamp: the learned temperature is CLIP's 100
            scales = [("100 (CLIP's zero-shot = learned logit_scale)", 100.0)]
        else:
            scales = [("100 (CLIP's zero-shot)", 100.0), (f"{learned:.1f} (learned logit_scale)", learned)]
        scales += [("10", 10.0), ("1", 1.0)]
        if scale not in [v for _, v in scales]:
            scales.insert(0, (f"{scale:g}", scale))
        self.scale = W.Dropdown(options=scales, value=scale, description="scale",
                                style={"description_width": "40px"}, layout=W.Layout(width="100%"))
        self.status = W.HTML(layout=W.Layout(width="100%"))
        self.index = W.IntSlider(value=min(max(index, 0), max(0, n - 1)), min=0, max=max(0, n - 1),
                                 description="image", disabled=n == 0, style={"description_width": "40px"},
                                 layout=W.Layout(width=f"{self.px + 40}px"))
        self.upload = W.FileUpload(accept="image/*", multiple=False, description="your image",
                                   layout=W.Layout(width=f"{self.px}px"))
        self.image_view = image_widget(px=self.px)
        self.caption = W.HTML(layout=W.Layout(width=f"{self.px + 40}px"))
        self.figure = go.FigureWidget(layout=figure_layout("", 440, 320))
        self.figure.add_bar(x=[], y=[], orientation="h", marker_color=[], text=[], textposition="auto",
                            customdata=[], hovertemplate="%{y}: %{x:.2%} (cos %{customdata:.3f})<extra></extra>",
                            cliponaxis=False)
        self.figure.update_xaxes(range=[0, 1.3], tickformat=".0%")
        self.figure.update_yaxes(autorange="reversed", automargin=True)
        self.figure.update_layout(margin=dict(l=10, r=10))
        self.bars = self.figure.data[0]
        self.classes.observe(lambda _: self.apply(), names="value")
        self.templates.observe(lambda _: self.apply(), names="value")
        self.apply_button.on_click(lambda _: self.apply())
        self.index.observe(lambda _: self.update(), names="value")
        self.scale.observe(lambda _: self._on_scale(), names="value")
        self.upload.observe(lambda _: self._on_upload(), names="value")
        header = W.HTML(title_html("Zero-shot classification",
                                   "class names × templates → text features; the image feature is compared with "
                                   "each by cosine, then softmax(scale · cos)"))
        # The Apply button sits right under the class box: it must stay visible whatever the width.
        left = W.VBox([W.HTML(label.format("class names: one per line, or comma-separated")), self.classes,
                       W.HBox([self.apply_button], layout=W.Layout(margin="4px 0")), self.status,
                       W.HTML(label.format("templates: one per line, each with one {}")), self.templates,
                       self.scale],
                      layout=W.Layout(width=column, min_width=column, margin="0 16px 8px 0"))
        middle = W.VBox([self.index, self.upload, self.image_view, self.caption],
                        layout=W.Layout(align_items="center", width=f"{self.px + 48}px",
                                        min_width=f"{self.px + 48}px", margin="0 16px 8px 0"))
        body = W.HBox([left, middle, self.figure],
                      layout=W.Layout(flex_flow="row wrap", align_items="flex-start", width="100%"))
        self.columns = (left, middle, self.figure)
        for column, name in zip(self.columns, ("controls", "image", "bars")):   # names for the browser test
            column.add_class(f"unitok-zeroshot-{name}")
        self.widget = self._root([header, body])
        self.widget.add_class("unitok-zeroshot")

    def _warn_if_single(self, classnames: Sequence[str], note: str) -> None:
        if len(classnames) == 1:
            self.status.value = ("<span style='color:#b36b00'>only one class: softmax over one class is always "
                                 "100 %. Put class names on separate lines, or separate them with commas.</span>")
        elif note:
            self.status.value = f"<span style='color:#555'>{note}</span>"
        else:
            self.status.value = ""

    def apply(self) -> None:
        """Re-read the class and template boxes, rebuild the classifier and redraw (errors shown, not raised)."""
        classnames, note = parse_names(self.classes.value)
        templates = _lines(self.templates.value)
        try:
            classifier = self._classifier(classnames, templates)
        except ValueError as error:
            self.status.value = f"<span style='color:#c33'>{error}</span>"
            return
        self._warn_if_single(classnames, note)
        self.classnames, self.template_list, self.classifier = classnames, templates, classifier
        self._update_probabilities()
        self.update()

    def _on_scale(self) -> None:
        self._update_probabilities()
        self.update()

    def _on_upload(self) -> None:
        import io

        from PIL import Image

        from unitok.data.images import pil_to_tensor

        if not self.upload.value:
            return
        entry = self.upload.value[-1]
        with Image.open(io.BytesIO(bytes(entry["content"]))) as picture:
            image = pil_to_tensor(picture, self.model.config.image_size)
        self.images = torch.cat([self.images, image[None]])
        self.captions.append(entry.get("name", "uploaded image"))
        self.labels.append({})
        self.image_features = torch.cat([self.image_features, self._encode(image[None])])
        self._update_probabilities()
        self.index.disabled = False
        self.index.max = len(self.images) - 1
        self.index.value = len(self.images) - 1
        self.update()

    def update(self) -> None:
        """Redraw image, caption and bars for the current image."""
        if not len(self.images):
            self.caption.value = "<i>no images: upload one</i>"
            return
        i = self.index.value
        set_image(self.image_view, self.images[i], self.px)
        ranking = self.ranking[:self.top]
        truth = self.truth(i)
        names = [name for name, _ in ranking]
        probs = [p for _, p in ranking]
        cos = [float(self.cosines[i, self.classnames.index(name)]) for name in names]
        colours = ["#59a14f" if name == truth else ("#4e79a7" if n == 0 else "#9fb8d3")
                   for n, name in enumerate(names)]
        with self.figure.batch_update():
            self.bars.x, self.bars.y = probs, names
            self.bars.customdata = cos
            self.bars.marker.color = colours
            self.bars.text = [f"{100 * p:.1f} % · cos {c:.2f}" for p, c in zip(probs, cos)]
            self.figure.layout.height = max(240, 80 + 26 * len(names))
            self.figure.layout.xaxis.title.text = f"softmax({self.scale_value:g} · cos)"
            more = f" (top {self.top} of {len(self.classnames)})" if len(self.classnames) > self.top else ""
            self.figure.layout.title.text = f"image {i}: ranked classes{more}"
        text = f"<b>image {i}</b>"
        if self.captions[i]:
            text += f"<br><span style='color:#555'>“{self.captions[i]}”</span>"
        if truth is not None:
            mark = "✓" if names and names[0] == truth else "✗"
            text += f"<br>true class: <b>{truth}</b> {mark} (green bar)"
        if len(cos) >= 2:
            gap = cos[0] - cos[1]
            text += (f"<br><span style='color:#555;font-size:12px'>top cosine leads by {gap:.3f}: "
                     f"× {math.exp(self.scale_value * gap):.3g} in odds at scale {self.scale_value:g}</span>")
        self.caption.value = text

    # ------------------------------------------------------------------ static picture
    def static_figure(self, indices: Optional[Sequence[int]] = None):
        """Image and ranked bars for the current image (or for each of `indices`, one row each)."""
        indices = [self.index.value] if indices is None else list(indices)
        fig = new_figure(8.5, 2.7 * max(1, len(indices)))
        if not len(self.images):
            ax = fig.add_subplot(1, 1, 1)
            ax.text(0.5, 0.5, "no images", ha="center", va="center")
            ax.axis("off")
            return fig
        for row, i in enumerate(indices):
            ax = fig.add_subplot(len(indices), 2, 2 * row + 1)
            ax.imshow(to_uint8(self.images[i]), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            truth = self.truth(i)
            ax.set_title(f"image {i}" + (f" (true: {truth})" if truth else ""), fontsize=9)
            ax = fig.add_subplot(len(indices), 2, 2 * row + 2)
            ranking = self.predict([i])[0][:self.top]
            names = [n for n, _ in ranking][::-1]
            probs = [p for _, p in ranking][::-1]
            ax.barh(names, probs, color=["#59a14f" if n == truth else "#4e79a7" for n in names])
            ax.set_xlim(0, 1)
            ax.tick_params(labelsize=8)
            ax.set_xlabel(f"softmax({self.scale_value:g} · cos)", fontsize=8)
        fig.suptitle("Zero-shot predictions — templates: " + " | ".join(self.template_list), fontsize=9)
        fig.tight_layout()
        return fig
