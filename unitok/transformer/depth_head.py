"""The depth head: the k sub-codes of one grid position, drawn one after another by a small causal transformer.

    [h, emb(c_1), ..., emb(c_{k-1})]  ->  CausalTransformer  ->  one classifier over K shared by the k sub-codes

h is the main transformer's state at the slot that predicts the position; row i of the head's output predicts
sub-code i + 1 from h and sub-codes 1..i, so the head alone models how the k sub-codes of a token fit together.
The generator (head="depth") and the unified model's image output use this same head.

Its layers are registered under fixed names, `depth_in`, `depth_embed`, `depth_offsets`, `depth`, `classifier`:
the unified model keeps them in a module of their own (`DepthHead`, saved as `image_head.*`), while the generator
keeps them on itself (its saved folders name them `depth_in.*`, ...). So the head's computations are functions of
any module holding those layers (`depth_head_logits`, `depth_head_steps`), and `DepthHead` is a thin module over
them.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from .causal import CausalTransformer
from .code_head import CodeClassifier
from .sampling import sample_position


def add_depth_head(owner: nn.Module, in_dim: int, num_codebooks: int, codebook_size: int, width: int, layers: int,
                   heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0, code_dim: int = 4,
                   geometry: bool = False) -> None:
    """Register the depth head's layers on `owner` (in this order, which fixes their initialisation order):
    depth_in (in_dim -> width; identity when equal), depth_embed (k-1 tables of K rows for sub-codes 1..k-1, one
    (max(k-1, 1) * K, width) table indexed with depth_offsets), depth (a CausalTransformer) and classifier (a
    shared `CodeClassifier`; geometry: its codebook term, code_dim the tokenizer's per-sub-codebook latent size)."""
    k, K = num_codebooks, codebook_size
    owner.depth_in = nn.Linear(in_dim, width) if width != in_dim else nn.Identity()
    owner.depth_embed = nn.Embedding(max(k - 1, 1) * K, width)
    owner.register_buffer("depth_offsets", torch.arange(max(k - 1, 1)) * K, persistent=False)
    owner.depth = CausalTransformer(width, layers, heads, mlp_ratio, dropout)
    owner.classifier = CodeClassifier(width, k, K, code_dim, shared=True, geometry=geometry)


def depth_head_logits(head: nn.Module, h: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Teacher-forced head. head: a module holding the layers of `add_depth_head`; h (M, D) states, codes (M, k)
    -> logits (M, k, K)."""
    k = head.classifier.k
    x = head.depth_in(h)[:, None]
    if k > 1:
        prev = head.depth_embed(codes[:, :-1] + head.depth_offsets[:k - 1])
        x = torch.cat([x, prev], 1)
    return head.classifier(head.depth(x))


def depth_head_steps(head: nn.Module, h: torch.Tensor, guided: bool,
                     use_cache: bool = True) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """The `next_logits(i, drawn)` of `sample_position` for a depth head at states h (B or 2B with `guided`, D).

    use_cache: the head's own KV cache, one new slot per sub-code (calls must come in order i = 0, 1, ...);
    False: recompute the whole depth sequence for every sub-code (the no-cache baseline). Both draw the same codes.
    """
    x0 = head.depth_in(h)[:, None]                                   # (M, 1, Dd)
    reps = 2 if guided else 1
    if use_cache:
        cache = head.depth.new_cache()

        def next_logits(i: int, drawn: torch.Tensor) -> torch.Tensor:
            x = x0 if i == 0 else head.depth_embed((drawn[:, i - 1] + head.depth_offsets[i - 1]).repeat(reps))[:, None]
            return head.classifier(head.depth(x, cache)[:, -1], index=i)
    else:
        def next_logits(i: int, drawn: torch.Tensor) -> torch.Tensor:
            prev = drawn[:, :i] + head.depth_offsets[:i]
            x = torch.cat([x0, head.depth_embed(prev.repeat(reps, 1))], 1) if i else x0
            return head.classifier(head.depth(x)[:, -1], index=i)
    return next_logits


class DepthHead(nn.Module):
    """The depth head as a module of its own (the unified model's image output). See the module docstring.

    `depth_logits(h (M, D), codes (M, k)) -> (M, k, K)` (teacher forced); `sample(h, u, ...)` draws a position's
    k sub-codes with temperature / top-k / top-p / CFG and seeded inverse-CDF draws (`sample_position`).
    """

    def __init__(self, in_dim: int, num_codebooks: int, codebook_size: int, width: int, layers: int, heads: int,
                 mlp_ratio: float = 4.0, dropout: float = 0.0, code_dim: int = 4, geometry: bool = False):
        super().__init__()
        add_depth_head(self, in_dim, num_codebooks, codebook_size, width, layers, heads, mlp_ratio, dropout,
                       code_dim, geometry)

    def depth_logits(self, h: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """h (M, D), codes (M, k) -> logits (M, k, K), teacher forced."""
        return depth_head_logits(self, h, codes)

    def sample(self, h: torch.Tensor, u: torch.Tensor, guided: bool = False, use_cache: bool = True,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, cfg_scale: float = 1.0):
        """h (B or 2B, D), u (B, k) -> codes, probs, entropy (B, k), as `sample_position`."""
        return sample_position(depth_head_steps(self, h, guided, use_cache), u, guided, temperature, top_k, top_p,
                               cfg_scale)
