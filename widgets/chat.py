"""UnifiedChat: talk to a unified model in both directions — a picture in, words out; words in, a picture out.

    >>> chat = UnifiedChat(model, ShapesDataset(32, "test", length=64))   # a UnifiedModel with its tokenizer
    >>> chat.index.value = 5                       # pick a picture (or upload one): its tokens and a caption
    >>> chat.question.value = "what shape is it?"; chat.ask()
    >>> chat.last_answer                           # ("star", [("star", 0.97), ("<eos>", 0.99)])
    >>> chat.prompt.value = "a blue heart"; chat.draw()    # drawn token by token, row by row
    >>> chat.drawn_codes                           # (H, W, k) codes of the drawing

Left: the picture, its token grid (first sub-code of each position, one colour per code id), the caption with
each token shaded by its probability, and the question box with its answers. Right: the prompt box and the picture
being drawn; positions not drawn yet are greyed out, and the panel is redrawn after every row of tokens.
Everything fits in about 960 px of width.
"""
from __future__ import annotations

import html
import io
import math

import numpy as np
import torch

import ipywidgets as W

from unitok.data.scene_text import question_type

from ._common import WIDE_LABEL, View, hbox, image_widget, set_image, take_items, title_html, to_uint8, upscale


def _outside_note(question: str) -> str:
    """A line under an answer to a question the model never learned: it can only pick among trained answers."""
    if question_type(question) is not None:
        return ""
    return ("<div style='color:#a05a00'>This model learned only questions about a shape's colour, shape, position "
            "and size, the background, the count, and \"is there a {colour} {shape}?\" on pictures of coloured "
            "shapes. This question is outside them, so the answer is a guess among those answers.</div>")


def _token_html(pairs) -> str:
    """[(token text, probability)] -> tokens shaded from white (p = 1) to orange (p -> 0), probability on hover."""
    spans = []
    for text, p in pairs:
        shade = int(255 - 120 * (1 - float(p)))
        spans.append(f"<span title='p = {p:.3f}' style='background:rgb(255,{shade},{max(shade - 80, 0)});"
                     f"padding:1px 0;border-radius:2px'>{html.escape(text)}</span>")
    return "".join(spans) or "<i>(empty)</i>"


def _code_colours(codes: np.ndarray, K: int) -> np.ndarray:
    """(H, W) code ids -> (H, W, 3) uint8, one fixed colour per id (a hash of the id), so equal codes match."""
    ids = codes.astype(np.int64)
    rgb = np.stack([(ids * 73 + 41) % 256, (ids * 151 + 97) % 256, (ids * 199 + 13) % 256], -1)
    return (80 + rgb * 175 // 255).astype(np.uint8)


class UnifiedChat(View):
    """Caption, question answering and drawing with one model. See the module docstring.

    Args:
        model: a `unitok.mllm.model.UnifiedModel` with its tokenizer attached.
        data: pictures to pick from (a dataset, a batch (B, 3, S, S) in [-1, 1], or a list of items); default:
            64 test-split shapes pictures.
        index: the first picture shown. num_images: how many of `data` the picker offers.
        seed: sampling seed for drawing. px: on-screen size of each picture panel.

    Drivable: `index` (IntSlider), `upload` (FileUpload), `question` (Text) + `ask()`, `prompt` (Text) + `draw()`,
    `cfg_scale`, `temperature` (sliders), `seed` (IntText). Read: `picture` (3, S, S), `codes` (H, W, k),
    `caption_tokens` / `last_answer` (text with per-token probabilities), `drawn_codes`, `answers` (the log),
    `status`.
    """

    def __init__(self, model, data=None, *, index: int = 0, num_images: int = 64, seed: int = 0, px: int = 192):
        if getattr(model, "tokenizer", None) is None:
            raise ValueError("UnifiedChat needs a UnifiedModel with its tokenizer attached (attach_tokenizer)")
        self.model, self.px = model, int(px)
        cfg = model.config
        self.image_size = model.tokenizer.config.image_size
        if data is None:
            from unitok.data.shapes_dataset import ShapesDataset
            data = ShapesDataset(self.image_size, "test", length=num_images)
        self.images, self.captions, _ = take_items(data, num_images)
        self.answers: list = []
        self.caption_tokens: list = []
        self.last_answer = None
        self.drawn_codes = None
        self.picture = self.images[0]
        self.codes = None
        can_draw = cfg.can_generate
        self.index = W.IntSlider(value=int(index), min=0, max=len(self.images) - 1, description="picture",
                                 layout=W.Layout(width="300px"))
        self.upload = W.FileUpload(accept="image/*", multiple=False, description="Upload",
                                   layout=W.Layout(width="110px"))
        self.question = W.Text(value="what colour is the shape?", description="ask", continuous_update=False,
                               layout=W.Layout(width="330px"))
        self.ask_button = W.Button(description="Ask", button_style="primary", layout=W.Layout(width="70px"))
        self.prompt = W.Text(value="a red circle", description="prompt", continuous_update=False,
                             layout=W.Layout(width="300px"))
        self.draw_button = W.Button(description="Draw", button_style="primary", layout=W.Layout(width="70px"),
                                    disabled=not can_draw)
        self.cfg_scale = W.FloatSlider(value=3.0, min=0.0, max=8.0, step=0.25, description="CFG",
                                       layout=W.Layout(width="280px"))
        self.temperature = W.FloatSlider(value=1.0, min=0.1, max=2.0, step=0.05, description="temperature",
                                         style=WIDE_LABEL, layout=W.Layout(width="280px"))
        self.seed = W.IntText(value=int(seed), description="seed", layout=W.Layout(width="150px"))
        self.picture_image = image_widget(None, self.px)
        self.tokens_image = image_widget(None, self.px)
        self.drawing_image = image_widget(None, self.px + 48)
        self.caption_html = W.HTML(layout=W.Layout(width="420px"))
        self.answer_html = W.HTML(layout=W.Layout(width="420px"))
        self.status = W.HTML()
        self.index.observe(lambda change: self.show(int(change["new"])), names="value")
        self.upload.observe(self._on_upload, names="value")
        self.ask_button.on_click(lambda _: self.ask())
        self.question.observe(lambda _: self.ask(), names="value")
        self.draw_button.on_click(lambda _: self.draw())
        left = W.VBox([hbox([self.index, self.upload]),
                       hbox([W.VBox([W.HTML("<b>picture</b>"), self.picture_image]),
                             W.VBox([W.HTML("<b>its tokens</b> (sub-code 1)"), self.tokens_image])]),
                       W.HTML("<b>caption</b> <span style='color:#888'>(shade: token probability)</span>"),
                       self.caption_html, hbox([self.question, self.ask_button]), self.answer_html],
                      layout=W.Layout(width="470px"))
        right = W.VBox([hbox([self.prompt, self.draw_button]), self.cfg_scale, self.temperature, self.seed,
                        W.HTML("<b>drawing</b> <span style='color:#888'>(row by row)</span>"), self.drawing_image],
                       layout=W.Layout(width="440px"))
        subtitle = ("one causal transformer reads the picture's tokens and writes words, or reads words and writes "
                    "tokens" + ("" if can_draw else " (this model reads continuous features: it cannot draw)"))
        self.widget = self._root([W.HTML(title_html("Unified model: both directions", subtitle)),
                                  W.HBox([left, right], layout=W.Layout(align_items="flex-start")), self.status])
        self.show(int(index))

    # ------------------------------------------------------------------ reading
    def _set_picture(self, picture: torch.Tensor) -> None:
        model = self.model
        self.picture = picture
        with torch.no_grad():
            feats = model.image_features(picture[None])
            tok = model.tokenizer
            self.codes = tok.encode(picture[None].to(tok.logit_scale.device))[0].cpu()
            (_,), (details,) = model.read("i2t", feats, with_probs=True)
        self.caption_tokens = details
        set_image(self.picture_image, to_uint8(picture), self.px)
        colours = _code_colours(self.codes[..., 0].numpy(), model.config.codebook_size)
        set_image(self.tokens_image, colours, self.px)
        self.caption_html.value = _token_html(details)
        self._features = feats

    def show(self, index: int) -> None:
        """Show picture `index` of the data: its tokens and its caption."""
        if not 0 <= index < len(self.images):
            raise ValueError(f"index must lie in [0, {len(self.images)}), got {index}")
        if self.index.value != index:
            self.index.value = index   # the observer calls back into show()
            return
        self._set_picture(self.images[index])
        self.status.value = f"picture {index}" + (f": <i>{html.escape(self.captions[index])}</i>"
                                                   if self.captions[index] else "")

    def show_upload(self, data: bytes, name: str = "upload") -> None:
        """Any picture file's bytes (any size or mode): converted to RGB and resized to the tokenizer's size."""
        from PIL import Image, UnidentifiedImageError

        from unitok.data.images import pil_to_tensor

        try:
            with Image.open(io.BytesIO(bytes(data))) as image:
                size, mode = image.size, image.mode
                picture = pil_to_tensor(image, self.image_size)
        except (UnidentifiedImageError, OSError):
            self.status.value = f"<span style='color:#c00'>{html.escape(name)} is not a picture PIL can read</span>"
            return
        self._set_picture(picture)
        self.status.value = (f"{html.escape(name)}: {size[0]}x{size[1]} {mode} shown as {self.image_size}x"
                             f"{self.image_size} RGB")

    def _on_upload(self, change) -> None:
        files = change["new"]
        if files:
            f = files[0]
            self.show_upload(f["content"], f.get("name", "upload"))

    def ask(self, question: str | None = None):
        """Answer `question` (default: the text box) about the current picture -> (answer, [(token, p)])."""
        q = self.question.value if question is None else question
        try:
            (answer,), (details,) = self.model.read("vqa", self._features, [q], with_probs=True)
        except ValueError as e:
            self.status.value = f"<span style='color:#c00'>{html.escape(str(e))}</span>"
            return None
        self.last_answer = (answer, details)
        self.answers.append((q, answer))
        rows = "".join(f"<div><b>Q</b> {html.escape(qq)} &nbsp; <b>A</b> {html.escape(aa)}</div>"
                       for qq, aa in self.answers[-4:-1])
        probability = math.prod(p for _, p in details)            # of the whole answer, token by token
        self.answer_html.value = (f"<div style='color:#666'>{rows}</div><div><b>Q</b> {html.escape(q)} &nbsp; "
                                  f"<b>A</b> {_token_html(details)} <span style='color:#666'>"
                                  f"(p = {probability:.2f})</span></div>" + _outside_note(q))
        return self.last_answer

    # ------------------------------------------------------------------ writing
    def draw(self, prompt: str | None = None):
        """Draw a picture for `prompt` (default: the text box) position by position; the panel is redrawn after
        every row. Returns the codes (H, W, k)."""
        model = self.model
        if not model.config.can_generate:
            self.status.value = "this model cannot draw (it reads continuous features)"
            return None
        text = self.prompt.value if prompt is None else prompt
        g = model.config.grid_size
        codes = torch.zeros(1, g, g, model.config.num_codebooks, dtype=torch.long, device=model.device)
        try:
            steps = model.image_steps([text], codes=codes, cfg_scale=float(self.cfg_scale.value),
                                      temperature=float(self.temperature.value), seed=int(self.seed.value))
            for step in steps:
                if (step.position + 1) % g == 0:
                    self._show_partial(codes[0], step.position + 1)
        except ValueError as e:
            self.status.value = f"<span style='color:#c00'>{html.escape(str(e))}</span>"
            return None
        self.drawn_codes = codes[0].cpu()
        self.status.value = f"drew {html.escape(text)!s} (CFG {self.cfg_scale.value}, seed {self.seed.value})"
        return self.drawn_codes

    def _show_partial(self, codes: torch.Tensor, filled: int) -> None:
        g = self.model.config.grid_size
        with torch.no_grad():
            picture = to_uint8(self.model.decode(codes[None])[0].cpu()).copy()
        rows = filled // g
        if rows < g:   # grey out the rows not drawn yet (their codes are placeholders)
            cut = rows * picture.shape[0] // g
            picture[cut:] = (picture[cut:] * 0.25 + 96).astype(np.uint8)
        set_image(self.drawing_image, picture, self.px + 48)

    # ------------------------------------------------------------------ static
    def static_figure(self):
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(9.6, 3.4))
        axes[0].imshow(upscale(to_uint8(self.picture), factor=4))
        axes[0].set_title("picture", fontsize=9)
        if self.codes is not None:
            axes[1].imshow(_code_colours(self.codes[..., 0].numpy(), self.model.config.codebook_size))
        axes[1].set_title("its tokens (sub-code 1)", fontsize=9)
        if self.drawn_codes is not None:
            with torch.no_grad():
                axes[2].imshow(to_uint8(self.model.decode(self.drawn_codes[None].to(self.model.device))[0].cpu()))
        axes[2].set_title(f"drawn: {self.prompt.value}", fontsize=9)
        for ax in axes:
            ax.axis("off")
        caption = "".join(t for t, _ in self.caption_tokens)
        qa = "; ".join(f"{q} -> {a}" for q, a in self.answers[-3:])
        fig.suptitle(f"caption: {caption}\n{qa}", fontsize=9)
        fig.tight_layout()
        return fig
