"""ZeroShotPanel: type class names and prompt templates, pick an image, see the ranked zero-shot predictions.

    >>> panel = ZeroShotPanel(model, ShapesDataset(32, split="test", max_objects=1))
    >>> panel.classes.value = "circle\\nsquare\\ntriangle"     # one class name (or prompt) per line
    >>> panel.templates.value = "a photo of a {}.\\na drawing of a {}."
    >>> panel.index.value = 5
    >>> panel.ranking                                         # [(class, probability), ...] best first

Scores follow CLIP: each class's text feature is the normalised mean over templates of
`model.encode_text(template.format(name))` (`unitok.metrics.zero_shot_classifier`), and the probabilities are
softmax(100 · cos(image feature, class feature)) over the classes.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

import ipywidgets as W
import plotly.graph_objects as go

from unitok import metrics as M

from ._common import (IMAGE_PX, figure_layout, image_widget, inference, model_device, new_figure,
                      pixelated_css, set_image, take_items, title_html, to_uint8, View)

DEFAULT_TEMPLATES = ("a photo of a {}.",)
FALLBACK_CLASSES = ("circle", "square", "triangle", "star", "heart")


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


class ZeroShotPanel(View):
    """Zero-shot classification of chosen images against editable class names and prompt templates.

    Args:
        model: a UniTok model (`encode_image`, `encode_text`, `tokenize`).
        images: a dataset, images (B, 3, S, S) in [-1, 1], a list of items, or None (then upload your own).
        classnames: initial class names; default: the dataset's first zero-shot task (e.g. the shapes' "shape"
            task) when it has `zero_shot_tasks`, else a few shape names.
        templates: initial prompt templates, each with one "{}" (use "{}" alone for full prompts per line).
        num_images: how many of the dataset's first images can be picked.
        top: bars shown (the most probable classes).
        scale: logit multiplier before the softmax (100, as CLIP's zero-shot evaluation).

    Drivable: `classes` and `templates` (Textareas; applied on blur or with `apply_button`), `index` (IntSlider),
    `upload` (FileUpload). Read: `classnames`, `template_list`, `classifier` ((E, C)), `probabilities` ((N, C)),
    `ranking` (current image), `predict(indices)`, `figure` (FigureWidget), `error` (HTML).
    """

    def __init__(self, model, images=None, classnames: Optional[Sequence[str]] = None,
                 templates: Sequence[str] = DEFAULT_TEMPLATES, num_images: int = 64, top: int = 10,
                 scale: float = 100.0):
        self.model, self.top, self.scale = model, int(top), float(scale)
        self.label_key: Optional[str] = None
        task_classes = None
        tasks_of = getattr(images, "zero_shot_tasks", None)
        if callable(tasks_of):            # e.g. ShapesDataset: class names and the label key of its first task
            names, _, self.label_key = next(iter(tasks_of().values()))
            task_classes = list(names)
        self.task_classes = task_classes
        self.classnames = list(classnames) if classnames is not None else list(task_classes or FALLBACK_CLASSES)
        self.template_list = list(templates)
        if images is not None:
            self.images, self.captions, self.labels = take_items(images, num_images)
        else:
            S = model.config.image_size
            self.images, self.captions, self.labels = torch.empty(0, 3, S, S), [], []
        self.image_features = self._encode(self.images)                                   # (N, E)
        self.classifier = self._classifier(self.classnames, self.template_list)           # (E, C)
        self._build_widgets()
        self._update_probabilities()
        self.update()

    # ------------------------------------------------------------------ computation
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        if len(images) == 0:
            return torch.empty(0, self.model.config.embed_dim)
        with inference(self.model):
            return self.model.encode_image(images.to(model_device(self.model))).float().cpu()

    def _classifier(self, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        if not classnames:
            raise ValueError("expected at least one class name (one per line)")
        if not templates:
            raise ValueError("expected at least one template, e.g. 'a photo of a {}.'")
        bad = [t for t in templates if t.count("{}") != 1]
        if bad:
            raise ValueError(f"every template needs exactly one '{{}}' for the class name; check {bad[0]!r} "
                             "(use '{}' alone to take each line as a full prompt)")
        with inference(self.model):
            return M.zero_shot_classifier(self.model, list(classnames), list(templates)).float().cpu()

    def _update_probabilities(self) -> None:
        logits = self.scale * self.image_features @ self.classifier                      # (N, C)
        self.probabilities = logits.softmax(dim=-1)

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
    def _build_widgets(self) -> None:
        n = len(self.images)
        self.classes = W.Textarea(value="\n".join(self.classnames), rows=9, continuous_update=False,
                                  description="classes", layout=W.Layout(width="300px"))
        self.templates = W.Textarea(value="\n".join(self.template_list), rows=3, continuous_update=False,
                                    description="templates", layout=W.Layout(width="300px"))
        self.apply_button = W.Button(description="Apply", icon="refresh", layout=W.Layout(width="100px"))
        self.index = W.IntSlider(value=0, min=0, max=max(0, n - 1), description="image",
                                 disabled=n == 0, layout=W.Layout(width=f"{IMAGE_PX + 120}px"))
        self.upload = W.FileUpload(accept="image/*", multiple=False, description="your image")
        self.image_view = image_widget(px=IMAGE_PX)
        self.caption = W.HTML(layout=W.Layout(width=f"{IMAGE_PX + 40}px"))
        self.error = W.HTML()
        self.figure = go.FigureWidget(layout=figure_layout("", 520, 380))
        self.figure.add_bar(x=[], y=[], orientation="h", marker_color=[], text=[], textposition="outside",
                            hovertemplate="%{y}: %{x:.2%}<extra></extra>", cliponaxis=False)
        self.figure.update_xaxes(range=[0, 1.12], tickformat=".0%", title_text="softmax(100 · cos)")
        self.figure.update_yaxes(autorange="reversed")
        self.figure.update_layout(margin=dict(l=140))
        self.bars = self.figure.data[0]
        self.classes.observe(lambda _: self.apply(), names="value")
        self.templates.observe(lambda _: self.apply(), names="value")
        self.apply_button.on_click(lambda _: self.apply())
        self.index.observe(lambda _: self.update(), names="value")
        self.upload.observe(lambda _: self._on_upload(), names="value")
        header = W.HTML(title_html("Zero-shot classification",
                                   "class names (one per line) × templates → text features; the image feature "
                                   "is compared with each by cosine"))
        left = W.VBox([self.classes, self.templates, W.HBox([self.apply_button]), self.error])
        middle = W.VBox([self.index, self.upload, self.image_view, self.caption],
                        layout=W.Layout(align_items="center", margin="0 10px"))
        self.widget = W.VBox([pixelated_css(), header, W.HBox([left, middle, self.figure])])

    def apply(self) -> None:
        """Re-read the class and template boxes, rebuild the classifier and redraw (errors shown, not raised)."""
        classnames, templates = _lines(self.classes.value), _lines(self.templates.value)
        try:
            classifier = self._classifier(classnames, templates)
        except ValueError as error:
            self.error.value = f"<span style='color:#c33'>{error}</span>"
            return
        self.error.value = ""
        self.classnames, self.template_list, self.classifier = classnames, templates, classifier
        self._update_probabilities()
        self.update()

    def _on_upload(self) -> None:
        import io

        from PIL import Image

        from unitok.data import pil_to_tensor

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
        set_image(self.image_view, self.images[i], IMAGE_PX)
        ranking = self.ranking[:self.top]
        truth = self.truth(i)
        names = [name for name, _ in ranking]
        probs = [p for _, p in ranking]
        colours = ["#59a14f" if name == truth else ("#4e79a7" if n == 0 else "#9fb8d3")
                   for n, name in enumerate(names)]
        with self.figure.batch_update():
            self.bars.x, self.bars.y = probs, names
            self.bars.marker.color = colours
            self.bars.text = [f"{100 * p:.1f} %" for p in probs]
            self.figure.layout.height = max(260, 70 + 28 * len(names))
            more = f" (top {self.top} of {len(self.classnames)})" if len(self.classnames) > self.top else ""
            self.figure.layout.title.text = f"image {i}: ranked classes{more}"
        text = f"<b>image {i}</b>"
        if self.captions[i]:
            text += f"<br><span style='color:#555'>“{self.captions[i]}”</span>"
        if truth is not None:
            mark = "✓" if names and names[0] == truth else "✗"
            text += f"<br>true class: <b>{truth}</b> {mark} (green bar)"
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
            ax.set_xlabel("softmax(100 · cos)", fontsize=8)
        fig.suptitle("Zero-shot predictions — templates: " + " | ".join(self.template_list), fontsize=9)
        fig.tight_layout()
        return fig
