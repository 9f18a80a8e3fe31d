"""A small pre-norm causal transformer with a KV cache: the backbone of the generator (its spatial transformer and
its depth head) and of the unified model.

    >>> net = CausalTransformer(dim=128, layers=4, heads=4, mlp_ratio=4.0)
    >>> y = net(x)                                   # x (B, T, D) -> (B, T, D), causal
    >>> cache = net.new_cache()
    >>> y = net(prefix, cache); y = net(next_slot, cache)   # decoding: each call appends to the cache

PyTorch's fused `scaled_dot_product_attention` does the attention; with a cache, new queries see every cached
position and the causal part of themselves, so a cached decode computes what one full pass over the whole sequence
would.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp


class KVCache:
    """Keys and values of every layer for the positions seen so far: lists of (B, heads, T, head_dim)."""

    def __init__(self, layers: int):
        self.k: List[Optional[torch.Tensor]] = [None] * layers
        self.v: List[Optional[torch.Tensor]] = [None] * layers

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None, layer: int = 0) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D); causal over [cached positions, x]."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        past = 0
        if cache is not None:
            if cache.k[layer] is not None:
                past = cache.k[layer].shape[2]
                k, v = torch.cat([cache.k[layer], k], 2), torch.cat([cache.v[layer], v], 2)
            cache.k[layer], cache.v[layer] = k, v
        drop = self.dropout if self.training else 0.0
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, dropout_p=drop)
        elif T == 1:  # one new query sees everything before it
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        else:  # T new queries after `past` cached ones
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(LN(x)), then x + MLP(LN(x)). (B, T, D) -> (B, T, D)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=dropout)

    def forward(self, x, cache=None, layer=0):
        x = x + self.attn(self.norm1(x), cache, layer)
        return x + self.mlp(self.norm2(x))


class CausalTransformer(nn.Module):
    """Blocks + final LayerNorm: (B, T, D) -> (B, T, D), causal, optionally appending to a KVCache."""

    def __init__(self, dim: int, layers: int, heads: int, mlp_ratio: float, dropout: float = 0.0):
        super().__init__()
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio, dropout) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)

    def new_cache(self) -> KVCache:
        return KVCache(len(self.blocks))

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        return self.norm(x)
