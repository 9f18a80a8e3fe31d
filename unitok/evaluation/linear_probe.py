"""Linear probing: how much of a label a frozen feature carries, read by logistic regression.

The standard understanding measure for tokenizers: freeze the model, take one pooled feature per image, fit a
multinomial logistic regression (scikit-learn) on a *training* split and report top-1 on a *test* split.

    >>> feats = pooled_token_features(model, images)             # (B, width)
    >>> linear_probe(train_feats, train_labels, test_feats, test_labels)
    {'top1': 0.97, 'train_top1': 0.99, 'num_train': 2048, 'num_test': 1024, 'num_classes': 8}

What `unitok.evaluation.tokenizer` probes: the up-projected *quantized* tokens (`post_quant_proj` of the codes' embeddings),
pooled over the grid as the model's image head pools them (`ModelConfig.image_pool`: the mean, as in the
reference, or the max): the representation the decoder and the CLIP image head both read, before any
text-alignment layer. The probe is fitted on single-object scenes of the shapes *training* split (the tokenizer's
training distribution, never an evaluation image) and tested on the zero-shot test images.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

__all__ = ["pooled_token_features", "linear_probe"]


@torch.no_grad()
def pooled_token_features(model, images: torch.Tensor) -> torch.Tensor:
    """images (B, 3, S, S) in [-1, 1] -> (B, width): the up-projected quantized tokens, pooled over the grid as the
    model's image head pools them (mean or max)."""
    codes = model.quantize(images).codes                                             # (B, N, k)
    return model.pool_tokens(model.code_tokens(codes))                               # (B, width)


def linear_probe(train_features, train_labels, test_features, test_labels, max_iter: int = 1000,
                 C: float = 1.0) -> dict:
    """Fit a logistic regression on standardised train features; top-1 on the test features.

    Args:
        train_features (N, D), test_features (M, D): float arrays or tensors.
        train_labels (N,), test_labels (M,): integer class indices.
        max_iter, C: scikit-learn's LogisticRegression settings (L2, lbfgs; deterministic).
    Returns:
        {"top1": test accuracy, "train_top1": training accuracy, "num_train": N, "num_test": M,
         "num_classes": classes seen in training}.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def as_numpy(x, what, ndim):
        x = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        if x.ndim != ndim:
            raise ValueError(f"{what} must have {ndim} dimension(s), got shape {x.shape}")
        return x

    Xtr, Xte = as_numpy(train_features, "train_features", 2), as_numpy(test_features, "test_features", 2)
    ytr, yte = as_numpy(train_labels, "train_labels", 1), as_numpy(test_labels, "test_labels", 1)
    if len(Xtr) != len(ytr) or len(Xte) != len(yte):
        raise ValueError(f"features and labels disagree: {len(Xtr)} train features for {len(ytr)} labels, "
                         f"{len(Xte)} test features for {len(yte)} labels")
    if Xtr.shape[1] != Xte.shape[1]:
        raise ValueError(f"train and test features differ in size: {Xtr.shape[1]} vs {Xte.shape[1]}")
    classes = np.unique(ytr)
    if len(classes) < 2:
        raise ValueError(f"a linear probe needs at least two classes in its training labels, got {classes.tolist()}")
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    with warnings.catch_warnings():  # small evaluation sets (tests, smoke runs) have many classes per sample
        warnings.filterwarnings("ignore", message="The number of unique classes is greater than 50%")
        warnings.filterwarnings("ignore", category=ConvergenceWarning)  # a probe is a measurement, not a fit
        probe.fit(Xtr, ytr)
    return {"top1": float((probe.predict(Xte) == yte).mean()), "train_top1": float((probe.predict(Xtr) == ytr).mean()),
            "num_train": int(len(ytr)), "num_test": int(len(yte)), "num_classes": int(len(classes))}
