"""Zero-shot classification and image-text retrieval.

They drive any model with `encode_image`, `encode_text` and `tokenize` (UniTok, or a fake in the tests):

    >>> classifier = zero_shot_classifier(model, ["circle", "square"], ["a photo of a {}."])   # (E, C)
    >>> zero_shot_accuracy(model.encode_image(images), labels, classifier)   # {"top1": ..., "num_images": N}
    >>> retrieval_recall(image_features, text_features, captions=captions)   # R@1 / R@5 both ways
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F

from ..training.machine import eval_mode, model_device

__all__ = ["zero_shot_classifier", "zero_shot_accuracy", "retrieval_recall"]


class _TextEncoderAdapter:
    """What open_clip's classifier builder calls: `encode_text(tokens, normalize=True)`. Our models' encode_text
    need not take `normalize`; their features are L2-normalised already, and normalising again is harmless."""

    def __init__(self, model):
        self.model = model

    def encode_text(self, tokens, normalize: bool = True):
        features = self.model.encode_text(tokens)
        return F.normalize(features, dim=-1) if normalize else features



def zero_shot_classifier(model, classnames: Sequence[str], templates: Sequence[Any],
                         device: Optional[Union[str, torch.device]] = None, num_classes_per_batch: int = 10,
                         use_tqdm: bool = False) -> torch.Tensor:
    """Zero-shot classifier weights (E, C): per class, the normalised mean of its prompts' text features.

    Uses open_clip's `build_zero_shot_classifier`, which formats every template with every class name
    (`"a photo of a {}."`.format(name), or a callable), tokenises with `model.tokenize` and calls
    `model.encode_text(tokens)`. The model is put in eval mode for the duration.

    Args:
        model: has `tokenize(list[str]) -> LongTensor (B, ctx)` and `encode_text(tokens) -> (B, E)` normalised.
        classnames: C class names; templates: format strings with one `{}` or callables str -> str.
        device: where the tokens go; default the model's parameters' device (CPU for a parameterless model).
    """
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    device = torch.device(device) if device is not None else model_device(model)
    with eval_mode(model):
        return build_zero_shot_classifier(_TextEncoderAdapter(model), model.tokenize, list(classnames),
                                          list(templates), num_classes_per_batch=num_classes_per_batch,
                                          device=device, use_tqdm=use_tqdm)


def zero_shot_accuracy(image_features: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor,
                       topk: Sequence[int] = (1, 5)) -> dict:
    """Top-k zero-shot accuracy.

    Args:
        image_features: (N, E) L2-normalised; labels: (N,) int in [0, C); classifier: (E, C) from
            `zero_shot_classifier`.
        topk: which k to report; k > C is skipped (top-5 of 3 classes means nothing).
    Returns:
        {"top1": fraction, "top5": fraction, "num_images": N}. Logits are 100 * cosine, as in the reference
        (the scale does not change the ranking).
    """
    if image_features.dim() != 2 or classifier.dim() != 2 or image_features.shape[1] != classifier.shape[0]:
        raise ValueError(f"expected image_features (N, E) and classifier (E, C), got {tuple(image_features.shape)} "
                         f"and {tuple(classifier.shape)}")
    labels = torch.as_tensor(labels, device=image_features.device).long()
    if labels.shape != (image_features.shape[0],):
        raise ValueError(f"labels must have shape ({image_features.shape[0]},), got {tuple(labels.shape)}")
    C = classifier.shape[1]
    ks = [k for k in topk if k <= C]
    result: dict = {}
    if ks:
        logits = 100.0 * image_features.float() @ classifier.to(image_features.device).float()      # (N, C)
        top = logits.topk(max(ks), dim=1).indices                                                  # (N, maxk)
        correct = top == labels[:, None]
        for k in ks:
            result[f"top{k}"] = float(correct[:, :k].any(1).float().mean())
    result["num_images"] = int(image_features.shape[0])
    return result


def retrieval_recall(image_features: torch.Tensor, text_features: torch.Tensor, ks: Sequence[int] = (1, 5),
                     captions: Optional[Sequence[str]] = None, chunk_size: int = 1024) -> dict:
    """Image->text and text->image recall@k for N paired images and captions (pair i <-> i is the match).

    Duplicate captions: with templated or small datasets several images share an identical caption, and their
    texts are indistinguishable, so ranking one above the other is not an error. When `captions` is given, a
    retrieved item is a hit if its caption is *identical* to the query's true caption (image->text: any copy of
    the caption; text->image: any image with that caption). Without `captions` only index i matches i.

    Args:
        image_features, text_features: (N, E) L2-normalised, row i of each belongs to the same pair.
        ks: recall cut-offs; k > N is skipped.
        captions: optional N strings, the captions of the pairs.
        chunk_size: queries scored at a time (the N x N similarity is never held whole).
    Returns:
        {"image_to_text_R@1": fraction, "text_to_image_R@1": ..., "image_to_text_R@5": ..., ..., "num_pairs": N}
    """
    if image_features.dim() != 2 or image_features.shape != text_features.shape:
        raise ValueError(f"expected image and text features of the same shape (N, E), got "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
    N = image_features.shape[0]
    device = image_features.device
    if captions is not None:
        if len(captions) != N:
            raise ValueError(f"captions must have {N} entries, got {len(captions)}")
        ids: dict[str, int] = {}
        group = torch.tensor([ids.setdefault(c, len(ids)) for c in captions], device=device)   # (N,) caption id
    else:
        group = torch.arange(N, device=device)
    ks = [k for k in ks if k <= N]
    img, txt = image_features.float(), text_features.to(device).float()

    def recall(queries: torch.Tensor, database: torch.Tensor) -> list[float]:
        hits = torch.zeros(len(ks), dtype=torch.int64, device=device)
        for s in range(0, N, chunk_size):
            top = (queries[s:s + chunk_size] @ database.T).topk(max(ks), dim=1).indices    # (c, maxk)
            match = group[top] == group[s:s + chunk_size, None]                           # same caption = hit
            hits += torch.stack([match[:, :k].any(1).sum() for k in ks])
        return (hits.double() / N).tolist()

    result: dict = {}
    if ks:
        for k, r_it, r_ti in zip(ks, recall(img, txt), recall(txt, img)):
            result[f"image_to_text_R@{k}"] = r_it
            result[f"text_to_image_R@{k}"] = r_ti
    result["num_pairs"] = N
    return result
