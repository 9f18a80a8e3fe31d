"""Projections between the transformer width and the small quantizer latent.

UniTok's "attention factorisation" replaces the usual linear down/up projection around the quantizer with a
small attention block, so each token's latent can draw on its neighbours (docs/method.md, "AttnProjection"):

    y = Linear(LN_a(x)) + Attn(LN_b(x));   y = y + GeGLU_MLP(LN_c(y))        (MLP hidden = 2 x out)

The attention has head_dim = min(in, out) and heads = max(in, out) // head_dim. Going *down* (in > out) the heads'
outputs are averaged into one head_dim = out vector; going *up* (in < out) they are concatenated to heads x
head_dim = out. q and v have biases, k has none. A Linear(out, out) closes the attention.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import GluMlp


class ProjectionAttention(nn.Module):
    """Self-attention mapping (B, N, in_dim) -> (B, N, out_dim) by averaging (down) or concatenating (up) heads."""

    def __init__(self, in_dim: int, out_dim: int, causal: bool = False):
        super().__init__()
        self.head_dim = min(in_dim, out_dim)
        if max(in_dim, out_dim) % self.head_dim:
            raise ValueError(f"AttnProjection needs one size to divide the other, got {in_dim} -> {out_dim}")
        self.num_heads = max(in_dim, out_dim) // self.head_dim
        self.down = out_dim < in_dim
        self.causal = causal
        inner = self.num_heads * self.head_dim
        self.qkv = nn.Linear(in_dim, 3 * inner, bias=False)
        # The reference puts biases on q and v only: a bias on k adds the same score to every key (softmax ignores it).
        self.q_bias = nn.Parameter(torch.zeros(inner))
        self.v_bias = nn.Parameter(torch.zeros(inner))
        self.proj = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor, cache: Optional[dict] = None) -> torch.Tensor:
        """x (B, N, in_dim) -> (B, N, out_dim). cache (causal only): a dict keeping the keys and values of the
        positions seen so far; x are then the next N positions, and the output is what a pass over all positions
        would give for them (decoding one position at a time costs O(positions), not a pass over the prefix)."""
        B, N, _ = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                       # (B, heads, N, head_dim)
        past = 0
        if cache is not None:
            if not self.causal:
                raise ValueError("a projection cache needs causal attention (a later position changes earlier ones)")
            if "k" in cache:
                past = cache["k"].shape[2]
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        elif N == 1:   # one new position sees every cached one
            y = F.scaled_dot_product_attention(q, k, v)
        else:          # N new positions after `past` cached ones
            mask = torch.ones(N, past + N, dtype=torch.bool, device=x.device).tril(past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.mean(1) if self.down else y.transpose(1, 2).reshape(B, N, -1)
        return self.proj(y)


class AttnProjection(nn.Module):
    """(B, N, in_dim) -> (B, N, out_dim): linear shortcut + projection attention, then a GeGLU MLP."""

    def __init__(self, in_dim: int, out_dim: int, causal: bool = False):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.norm_shortcut = nn.LayerNorm(in_dim)
        self.shortcut = nn.Linear(in_dim, out_dim)
        self.norm_attn = nn.LayerNorm(in_dim)
        self.attn = ProjectionAttention(in_dim, out_dim, causal)
        self.norm_mlp = nn.LayerNorm(out_dim)
        # timm's GluMlp halves fc1's output into value and gate: hidden_features = 2 * (2 * out) gives GeGLU
        # with a hidden size of 2 x out, as in the reference.
        self.mlp = GluMlp(out_dim, hidden_features=4 * out_dim, act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, cache: Optional[dict] = None) -> torch.Tensor:
        """cache: see `ProjectionAttention.forward` (everything else here acts on each position alone)."""
        y = self.shortcut(self.norm_shortcut(x)) + self.attn(self.norm_attn(x), cache)
        return y + self.mlp(self.norm_mlp(y))


class LinearProjection(nn.Module):
    """The plain alternative: LayerNorm + Linear, (B, N, in_dim) -> (B, N, out_dim)."""

    def __init__(self, in_dim: int, out_dim: int, causal: bool = False):  # causal: accepted for a uniform signature
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.norm = nn.LayerNorm(in_dim)
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor, cache: Optional[dict] = None) -> torch.Tensor:   # cache: nothing to keep
        return self.linear(self.norm(x))


def build_projection(kind: str, in_dim: int, out_dim: int, causal: bool = False) -> nn.Module:
    if kind == "attn":
        return AttnProjection(in_dim, out_dim, causal)
    if kind == "linear":
        return LinearProjection(in_dim, out_dim)
    raise ValueError(f"projection must be 'attn' or 'linear', got {kind!r}")
