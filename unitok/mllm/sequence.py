"""The unified model's sequence format, in one place: the special tokens, the three tasks and how each lays out.

    t2i   <t2i> [pad..] caption <boi> img_0 .. img_{N-1}                      target: the N image tokens
    i2t   <i2t> <boi> img_0 .. img_{N-1} <eoi> caption <eos>                  target: caption <eos>
    vqa   <vqa> <boi> img_0 .. img_{N-1} <eoi> [pad..] question <sep> answer <eos>   target: answer <eos>

The prompt parts (t2i caption, vqa question) are *left*-padded to a fixed number of tokens, so every sequence of a
task has the same layout: a batch of prompts is one tensor, the image always starts at the same slot, and KV-cached
decoding needs no attention masks (pads come before the text they pad and are ordinary tokens the model learns to
skip). Targets come after the prompt and are right-padded; pads after the end are never attended by a target.

The functions take the model's config (an `MLLMConfig`, for its sizes) and its text tokenizer (a `TextTokenizer`);
`MLLMConfig` and `UnifiedModel` expose them as methods (`config.image_start(task)`, `config.max_length`,
`model.prompt_tokens(...)`, `model.build_batch(items)`, ...). `check_image` checks the image part of sequences,
`read_texts` turns decoded targets back into strings.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

SPECIALS = ("<pad>", "<t2i>", "<i2t>", "<vqa>", "<boi>", "<eoi>", "<sep>", "<eos>")   # text ids 0..7, <pad> = 0
TASKS = ("t2i", "i2t", "vqa")


def image_start(config, task: str) -> int:
    """The slot of image position 0 in a `task` sequence."""
    return 1 + config.caption_tokens + 1 if task == "t2i" else 2


def prompt_length(config, task: str) -> int:
    """Slots before the first target token (the decoding prefill)."""
    N = config.num_positions
    return {"t2i": 2 + config.caption_tokens, "i2t": 3 + N, "vqa": 3 + N + config.question_tokens + 1}[task]


def max_length(config) -> int:
    """The longest sequence of any task (the size of the model's position table)."""
    N = config.num_positions
    return max(2 + config.caption_tokens + N, 3 + N + config.target_tokens,
               3 + N + config.question_tokens + 1 + config.target_tokens)


def text_ids(text_tokenizer, text: str, limit: int, what: str) -> List[int]:
    """Non-empty `text` -> its ids (no specials), at most `limit` of them; ValueError naming `what` otherwise."""
    if text_tokenizer is None:
        raise ValueError("this model has no text tokenizer attached")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"expected non-empty {what} text, got {text!r}")
    ids = text_tokenizer.encode(text)
    if len(ids) > limit:
        raise ValueError(f"the {what} is {len(ids)} text tokens long; this model takes at most {limit} "
                         f"({text[:60]!r})")
    return ids


def prompt_tokens(config, text_tokenizer, task: str, caption: Optional[str] = None,
                  question: Optional[str] = None) -> List[int]:
    """The prompt slots of one sequence (image slots hold <pad> placeholders), up to the first target token.
    t2i: caption None = the empty prompt (the unconditional branch of classifier-free guidance)."""
    sp = {s: i for i, s in enumerate(SPECIALS)}
    N, pad = config.num_positions, sp["<pad>"]
    if task == "t2i":
        ids = [] if caption is None else text_ids(text_tokenizer, caption, config.caption_tokens, "prompt")
        return [sp["<t2i>"]] + [pad] * (config.caption_tokens - len(ids)) + ids + [sp["<boi>"]]
    head = [sp[f"<{task}>"], sp["<boi>"]] + [pad] * N + [sp["<eoi>"]]
    if task == "i2t":
        return head
    if task == "vqa":
        ids = text_ids(text_tokenizer, question, config.question_tokens, "question")
        return head + [pad] * (config.question_tokens - len(ids)) + ids + [sp["<sep>"]]
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def check_image(config, image: torch.Tensor) -> None:
    """The image part of sequences, as the config's `image_input` expects it: codes (B, N, k) (integers), or for
    "continuous" features (B, N, F) (float; F the tokenizer's width for "encoder", its latent size for "latent")."""
    N, k = config.num_positions, config.num_codebooks
    if config.image_input == "continuous":
        F_ = config.tokenizer_width if config.continuous_source == "encoder" else config.latent_dim
        if not image.is_floating_point() or image.ndim != 3 or tuple(image.shape[1:]) != (N, F_):
            raise ValueError(f"image_input='continuous' expects features (B, {N}, {F_}) (float), got "
                             f"{tuple(image.shape)} {image.dtype}")
        return
    if image.is_floating_point() or image.ndim != 3 or tuple(image.shape[1:]) != (N, k):
        raise ValueError(f"expected codes (B, {N}, {k}) (integers), got {tuple(image.shape)} {image.dtype}")


def build_batch(config, text_tokenizer, items: Sequence[dict], drop_caption: Optional[Sequence[bool]] = None) -> dict:
    """Training / scoring sequences for a list of items {"task", "image" (codes (N, k) or features (N, F)),
    "caption" (t2i prompt or i2t target), "question", "answer" (vqa)} -> a batch dict:

    tokens (B, L) int64 (image slots hold <pad>), text_targets (B, L) int64 (the token slot j+1 must hold, or
    -100), image (B, N, ...) codes or features, image_start (B,) int64, image_target (B,) bool, task (B,) int64
    (the index in TASKS). drop_caption: per item, replace the t2i prompt by the empty one (classifier-free
    guidance training).
    """
    if not items:
        raise ValueError("expected at least one item, got none")
    sp_eos = SPECIALS.index("<eos>")
    rows, targets, starts, is_t2i = [], [], [], []
    for i, it in enumerate(items):
        task = it.get("task")
        if task == "t2i":
            if not config.can_generate:
                raise ValueError("a model with image_input='continuous' reads images but cannot write them; "
                                 "t2i items need 'codebook' or 'embedding'")
            drop = bool(drop_caption[i]) if drop_caption is not None else False
            row = prompt_tokens(config, text_tokenizer, "t2i", None if drop else it["caption"]) \
                + [0] * config.num_positions
            tgt = [-100] * len(row)
        else:
            row = prompt_tokens(config, text_tokenizer, task, question=it.get("question"))
            answer = it["caption"] if task == "i2t" else it["answer"]
            ids = text_ids(text_tokenizer, answer, config.target_tokens - 1, "caption" if task == "i2t" else "answer")
            ids = ids + [sp_eos]
            tgt = [-100] * (len(row) - 1) + ids        # slot j predicts token j + 1
            row = row + ids
            tgt = tgt + [-100]
        rows.append(row)
        targets.append(tgt)
        starts.append(image_start(config, task))
        is_t2i.append(task == "t2i")
    L = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), L, dtype=torch.long)
    text_targets = torch.full((len(rows), L), -100, dtype=torch.long)
    for i, (r, t) in enumerate(zip(rows, targets)):
        tokens[i, :len(r)] = torch.tensor(r)
        text_targets[i, :len(t)] = torch.tensor(t)
    image = torch.stack([torch.as_tensor(it["image"]) for it in items])
    return {"tokens": tokens, "text_targets": text_targets, "image": image,
            "image_start": torch.tensor(starts), "image_target": torch.tensor(is_t2i),
            "task": torch.tensor([TASKS.index(it["task"]) for it in items])}


def read_texts(steps: Sequence, text_tokenizer) -> Tuple[List[str], List[List[Tuple[str, float]]]]:
    """Decoded text targets back to strings. steps: one per decoded token, each with ids (B,), probs (B,) and done
    (B,) (`UnifiedModel.text_steps`); an item's text ends at its <eos> or once it is done. Returns each item's text
    and its [(token text, probability), ...]."""
    B = steps[0].ids.shape[0] if steps else 0
    texts, details = [], []
    eos = SPECIALS.index("<eos>")
    for b in range(B):
        ids, probs = [], []
        for s in steps:
            if bool(s.done[b]):
                break
            i = int(s.ids[b])
            if i == eos:
                break
            ids.append(i)
            probs.append(float(s.probs[b]))
        texts.append(text_tokenizer.decode(ids))
        details.append([(text_tokenizer.token_text(i), p) for i, p in zip(ids, probs)])
    return texts, details
