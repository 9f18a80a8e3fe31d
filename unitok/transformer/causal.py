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


def append_keys_values(store: dict, k: torch.Tensor, v: torch.Tensor) -> tuple:
    """Append the keys and values (B, heads, T, head_dim) of T new positions to `store` (a dict) and return
    (all keys, all values, how many positions were there before).

    The keys live in buffers with room to spare (doubled when full), so appending one position writes one
    position: growing by `torch.cat` would copy the whole cache at every decoded position (a tenth of the time of
    drawing a picture). `store["k"]` / `store["v"]` are views of the filled part. For decoding without gradients:
    a later append writes into the buffer a view of which an earlier step may have kept for backward.
    """
    past, T = store.get("length", 0), k.shape[2]
    buffers = store.get("buffers")
    if buffers is None or past + T > buffers[0].shape[2] or buffers[0].shape[:2] != k.shape[:2] \
            or buffers[0].dtype != k.dtype:
        capacity = max(16, 2 * (past + T))
        grown = tuple(t.new_empty(t.shape[0], t.shape[1], capacity, t.shape[3]) for t in (k, v))
        if past:
            for new, old in zip(grown, buffers):
                new[:, :, :past] = old[:, :, :past]
        store["buffers"] = buffers = grown
    buffers[0][:, :, past:past + T] = k
    buffers[1][:, :, past:past + T] = v
    store["length"] = past + T
    store["k"], store["v"] = buffers[0][:, :, :past + T], buffers[1][:, :, :past + T]
    return store["k"], store["v"], past


class KVCache:
    """Keys and values of every layer for the positions seen so far (`append_keys_values`, one store per layer);
    `k[layer]` / `v[layer]` are (B, heads, T, head_dim) views of them."""

    def __init__(self, layers: int):
        self.stores: List[dict] = [{} for _ in range(layers)]

    @property
    def k(self) -> List[Optional[torch.Tensor]]:
        return [store.get("k") for store in self.stores]

    @property
    def v(self) -> List[Optional[torch.Tensor]]:
        return [store.get("v") for store in self.stores]

    @property
    def length(self) -> int:
        return self.stores[0].get("length", 0)


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
            k, v, past = append_keys_values(cache.stores[layer], k, v)
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
