"""What the generator is handed, checked and converted: code grids, prompts, class labels, text-tower states.

Every check raises a ValueError that names what was expected (the CLI and the widgets show it in one line).
`TokenGenerator` calls these with its config's sizes; they hold no weights.
"""
from __future__ import annotations

from typing import List, Sequence

import torch

from ..tokenizer.codes import check_codes as check_code_values


def check_code_grid(codes: torch.Tensor, grid_size: int, num_codebooks: int, codebook_size: int) -> None:
    """codes (B, H, W, k) integer in [0, K) with H = W = grid_size, k = num_codebooks, K = codebook_size."""
    g, k, K = grid_size, num_codebooks, codebook_size
    expected = f"integer codes (B, {g}, {g}, {k}) in [0, {K})"
    if not isinstance(codes, torch.Tensor) or codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"expected {expected}, got {type(codes).__name__} {getattr(codes, 'dtype', '')}")
    if codes.ndim != 4 or tuple(codes.shape[1:3]) != (g, g):
        raise ValueError(f"expected {expected}, got shape {tuple(codes.shape)}")
    if codes.shape[-1] != k:
        raise ValueError(f"expected {k} sub-codes per position ({expected}), got {codes.shape[-1]} "
                         f"(shape {tuple(codes.shape)})")
    check_code_values(codes, K, k)   # the project's range check: "codes must lie in [0, K), got ..."


def check_labels(labels, num_classes: int) -> torch.Tensor:
    """Class labels (anything `torch.as_tensor` takes) -> (B,) int64, each in [0, num_classes)."""
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    n = num_classes
    if labels.numel() == 0:
        raise ValueError(f"expected at least one class label in [0, {n}), got none")
    bad = labels[(labels < 0) | (labels >= n)]
    if bad.numel():
        raise ValueError(f"unknown class {int(bad[0])}: expected a label in [0, {n})")
    return labels


def check_prompts(prompts) -> List[str]:
    """A prompt or a list of prompts -> a non-empty list of non-empty strings."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("expected at least one prompt, got an empty list")
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"expected non-empty prompt text, got {p!r}")
    return prompts


def labels_from_prompts(prompts: Sequence[str], class_names: Sequence[str]) -> torch.Tensor:
    """Prompts naming a class -> their labels (B,): "a red star" -> the index of "red star" in class_names."""
    names = {n.lower(): i for i, n in enumerate(class_names)}
    out = []
    for p in check_prompts(prompts):
        key = p.strip().lower().rstrip(".")
        for article in ("a ", "an ", "the "):
            if key.startswith(article):
                key = key[len(article):]
                break
        if key not in names:
            raise ValueError(f"this generator is conditioned on class labels; prompt {p!r} names no class "
                             f"(expected 'a <class>' with <class> one of {class_names[:6]}..., "
                             f"or pass labels)")
        out.append(names[key])
    return torch.tensor(out)


def prompt_ids(tokenizer, prompts) -> torch.Tensor:
    """Prompts -> the tokenizer's text token ids (B, context_length); the prompts and the tokenizer are checked."""
    prompts = check_prompts(prompts)
    if tokenizer is None:
        raise ValueError("text conditioning needs the tokenizer: pass tokenizer= or call attach_tokenizer()")
    return tokenizer.tokenize(prompts)


@torch.no_grad()
def text_tower_states(tokenizer, ids: torch.Tensor, condition: str) -> torch.Tensor:
    """Token ids (B, context_length) -> the tokenizer's text tower output, on the tokenizer's device:
    condition "text": the pooled CLIP-aligned feature (B, embed_dim), unit norm; "text_tokens": the per-token
    states (B, context_length, text_width) after the final LayerNorm. Always float32."""
    tower = tokenizer.text_encoder
    ids = ids.to(tokenizer.logit_scale.device)
    if condition == "text":
        out = tokenizer.encode_text(ids)                # (B, E) unit norm: the CLIP-aligned feature
    else:
        previous = tower.output_tokens
        tower.output_tokens = True                      # open_clip returns (pooled, per-token states)
        try:
            _, out = tower(ids)                          # (B, L, text_width) after the final LayerNorm
        finally:
            tower.output_tokens = previous
    return out.float()


def item_texts(prompts, labels, class_names: Sequence[str], num_classes: int) -> List[str]:
    """The text of each item, for ranking samples by their match to it: the prompts, or "a <class name>" for each
    class label (which needs the config's class_names)."""
    if prompts is not None:
        return check_prompts(prompts)
    if not class_names:
        raise ValueError("rerank with labels needs the config's class_names (to read class i as text)")
    return [f"a {class_names[i]}" for i in check_labels(labels, num_classes).tolist()]
