"""Scene descriptions and the text built from them, shared by the generator and the unified model: captions,
text-to-image prompts, questions and answers about a shapes scene, and a reader of generated captions.

    >>> rec = scene_record(ShapesDataset(32, "train").scene(0))   # objects [(colour, shape, size, position)], ...
    >>> canonical_caption(rec)        # "a large red star at the top left, on a black background"
    >>> make_question(rec, "colour")  # ("what colour is the shape?", "red")
    >>> parse_caption("a small blue circle at the right, on black")   # {"colour": "blue", "shape": "circle", ...}

- i2t targets are *canonical* captions that always name size, colour, shape and position of every object and the
  background ("a large red star at the top left, on a black background"; "two shapes: a small red star at the
  top left and a small blue circle at the right, on black"), so a generated caption can be scored attribute by
  attribute (`parse_caption`);
- t2i prompts are drawn from the dataset's own varied captions, the canonical caption and short "a red star"
  phrases;
- questions (`QUESTION_TYPES`): colour, shape, position, size, background, count, and yes/no ("is there a red
  star?", answers balanced, negatives differ from a present object in colour or in shape), several phrasings each.

Held-out colour x shape pairs (`HELDOUT`) never appear in training text: yes/no negatives skip them. Text is
compared after `normalize_text`, the text tokenizer's own normalisation (lower case, single spaces).
"""
from __future__ import annotations

import random
import re
from typing import List, Optional, Sequence

from .shapes_dataset import ShapesDataset

DS = ShapesDataset
HELDOUT = set(DS.heldout_pairs)
TRAIN_PAIRS = [(c, s) for c in DS.COLOURS for s in DS.SHAPES if (c, s) not in HELDOUT]
QUESTION_TYPES = ("colour", "shape", "position", "size", "background", "count", "yesno")


def normalize_text(text: str) -> str:
    """Lower case, runs of white space as one space: how `unitok.mllm` text is normalised before it is encoded or
    compared (the same as `TextTokenizer.normalize`)."""
    return " ".join(str(text).lower().split())


def scene_record(scene: dict) -> dict:
    """`ShapesDataset.scene` output -> the compact record kept in the cache: objects [(colour, shape, size,
    position)], background, caption."""
    return {"objects": [(o["colour"], o["shape"], o["size"], o["position"]) for o in scene["objects"]],
            "background": scene["background"], "caption": scene["caption"]}


def _obj_phrase(obj, size: bool = True) -> str:
    colour, shape, sz, position = obj
    return f"a {sz + ' ' if size else ''}{colour} {shape} at the {position}"


def canonical_caption(rec: dict) -> str:
    """The i2t target: every attribute of every object, and the background."""
    objs, bg = rec["objects"], rec["background"]
    if len(objs) == 1:
        return f"{_obj_phrase(objs[0])}, on a {bg} background"
    return f"two shapes: {_obj_phrase(objs[0])} and {_obj_phrase(objs[1])}, on {bg}"


def t2i_prompt(rec: dict, rng: random.Random) -> str:
    """A training prompt for text-to-image: the dataset's caption, the canonical one, or a short phrase."""
    objs = rec["objects"]
    r = rng.random()
    if r < 0.4:
        return rec["caption"]
    if r < 0.6 or len(objs) > 1:
        return canonical_caption(rec)
    colour, shape, size, _ = objs[0]
    return rng.choice([f"a {colour} {shape}", f"a {size} {colour} {shape}", f"{colour} {shape}"])


_TEMPLATES = {
    "colour": ["what colour is the shape?", "what color is the shape?", "what colour is it?",
               "which colour is the object?", "what is the colour of the shape?"],
    "shape": ["what shape is it?", "what shape is the object?", "which shape is this?", "what is the shape?",
              "what kind of shape is shown?"],
    "position": ["where is the shape?", "where is it?", "where is the object?", "where is the shape located?",
                 "in which part of the picture is the shape?"],
    "size": ["how big is the shape?", "is the shape small or large?", "what size is it?",
             "how large is the object?"],
    "background": ["what colour is the background?", "what is the background?", "which background is it?",
                   "what color is the background?"],
    "count": ["how many shapes are there?", "how many objects are in the picture?", "how many shapes?",
              "how many things are there?"],
    "yesno": ["is there a {}?", "is there a {} in the picture?", "do you see a {}?", "can you see a {}?"],
}
_NAMED = {  # two-object scenes name the object the question is about
    "colour": ["what colour is the {shape}?", "what color is the {shape}?"],
    "shape": ["what shape is the {colour} one?", "which shape is {colour}?"],
    "position": ["where is the {pair}?", "where is the {pair} located?"],
    "size": ["how big is the {pair}?", "what size is the {pair}?"],
}


def make_question(rec: dict, qtype: str, rng: Optional[random.Random] = None, answer_yes: Optional[bool] = None,
                  heldout_ok: bool = False) -> Optional[tuple]:
    """(question, answer) of type `qtype` about a scene, or None when it would be ambiguous.

    rng None: the first phrasing (evaluation). answer_yes: for "yesno", which answer to ask for (default: random).
    heldout_ok: yes/no negatives may name held-out pairs (never in training).
    """
    pick = (lambda xs: xs[0]) if rng is None else rng.choice
    objs, bg = rec["objects"], rec["background"]
    first = objs[0]
    colour, shape, size, position = first
    if qtype == "background":
        return pick(_TEMPLATES["background"]), bg
    if qtype == "count":
        return pick(_TEMPLATES["count"]), "one" if len(objs) == 1 else "two"
    if qtype == "yesno":
        yes = (rng.random() < 0.5 if rng is not None else True) if answer_yes is None else answer_yes
        present = {(o[0], o[1]) for o in objs}
        if yes:
            c, s = pick(objs)[:2]
        else:
            base = pick(objs)
            choices = ([(c, base[1]) for c in DS.COLOURS] + [(base[0], s) for s in DS.SHAPES])
            choices = [p for p in choices if p not in present and (heldout_ok or p not in HELDOUT)]
            if not choices:
                return None
            c, s = pick(sorted(choices))
        return pick(_TEMPLATES["yesno"]).format(f"{c} {s}"), "yes" if yes else "no"
    answers = {"colour": colour, "shape": shape, "position": position, "size": size}
    if qtype not in answers:
        raise ValueError(f"question type must be one of {QUESTION_TYPES}, got {qtype!r}")
    if len(objs) == 1:
        return pick(_TEMPLATES[qtype]), answers[qtype]
    other = objs[1]
    if qtype == "colour" and other[1] == shape or qtype == "shape" and other[0] == colour:
        return None   # "the star" / "the red one" would not say which object
    return pick(_NAMED[qtype]).format(shape=shape, colour=colour, pair=f"{colour} {shape}"), answers[qtype]


def question_type(question: str) -> Optional[str]:
    """The type of a question the unified model was trained on (one of QUESTION_TYPES), or None for a question
    outside them ("is there a dog?", "why is the heart purple?"), whose answer is a guess among trained answers."""
    q = normalize_text(question)
    colours, shapes = "|".join(DS.COLOURS), "|".join(DS.SHAPES)
    fill = {"{}": f"(?:{colours}) (?:{shapes})", "{shape}": f"(?:{shapes})", "{colour}": f"(?:{colours})",
            "{pair}": f"(?:{colours}) (?:{shapes})"}
    for qtype, templates in [*_TEMPLATES.items(), *_NAMED.items()]:
        for template in templates:
            pattern = re.escape(template)
            for slot, words in fill.items():
                pattern = pattern.replace(re.escape(slot), words)
            if re.fullmatch(pattern, q):
                return qtype
    return None


def eval_questions(rec: dict, heldout_ok: bool = True) -> List[tuple]:
    """Every question type once (yes/no twice: one yes, one no) in its first phrasing -> [(type, q, a)]."""
    out = []
    for qtype in QUESTION_TYPES:
        for yes in ((True, False) if qtype == "yesno" else (None,)):
            qa = make_question(rec, qtype, None, answer_yes=yes, heldout_ok=heldout_ok)
            if qa is not None:
                out.append((qtype, *qa))
    return out


def text_corpus(records: Sequence[dict], seed: int = 0) -> List[str]:
    """What the text tokenizer is trained on: captions (dataset and canonical), prompts, questions, answers."""
    rng = random.Random(f"corpus/{seed}")
    out = []
    for rec in records:
        out += [rec["caption"], canonical_caption(rec), t2i_prompt(rec, rng)]
        for qtype in QUESTION_TYPES:
            qa = make_question(rec, qtype, rng)
            if qa:
                out += list(qa)
    for templates in list(_TEMPLATES.values()) + list(_NAMED.values()):
        out += templates
    return out


def fit_prompt(text, limit: int, rec: dict, prompt: str) -> str:
    """`prompt` if it fits in `limit` text tokens, else the canonical caption, else "colour shape" (a few of the
    dataset's two-object captions are longer than the t2i prompt slots). `text`: anything with `encode(str) -> ids`, the
    unified model's `TextTokenizer`."""
    for candidate in (prompt, canonical_caption(rec)):
        if len(text.encode(candidate)) <= limit:
            return candidate
    return " ".join(rec["objects"][0][:2])


def parse_caption(text: str) -> dict:
    """A generated caption -> {"colour", "shape", "size", "position", "count"} of the first-mentioned object
    (None for what it does not say). Understands the canonical captions and the dataset's own phrasings."""
    t = " " + normalize_text(text).replace(",", " ,") + " "
    count = 2 if t.startswith(" two ") or " and a" in t else 1
    first = t.split(" and ")[0].split(" , on ")[0].split(" over ")[0].split(" against ")[0]
    first = first.replace("two shapes:", " ") + " "

    def find(words):
        hits = [(first.find(f" {w} "), w) for w in words if f" {w} " in first]
        return min(hits)[1] if hits else None

    position = None
    for name in sorted(DS.POSITIONS, key=len, reverse=True):   # "top left" before "top"
        phrases = [f" at the {name} ", f" {DS.POSITION_PHRASES[name]} "]
        if any(p in first for p in phrases):
            position = name
            break
    return {"colour": find(DS.COLOURS), "shape": find(DS.SHAPES), "size": find(DS.SIZES), "position": position,
            "count": count}
