"""A multi-codebook autoregressive generator over a frozen UniTok tokenizer's (H, W, k) code grid.

    condition prefix (P tokens)  ->  causal *spatial* transformer over the H*W positions (row-major)
    position input  = sum of k sub-code embeddings (one table of K rows per sub-codebook)
    position output = a small causal *depth* transformer that draws sub-codes 1..k one after another from
                      [spatial hidden state, emb(c_1), ..., emb(c_{k-1})], with one shared zero-initialised
                      classifier over K (head="depth"); or k independent linear heads (head="parallel", baseline)

    >>> tok = UniTok.from_pretrained("data/tiny-shapes")
    >>> gen = TokenGenerator(GeneratorConfig.preset("tiny", tokenizer=tok), tokenizer=tok)
    >>> out = gen(codes, prompts=captions)          # out.loss (mean CE over all sub-codes), out.logits (B, N, k, K)
    >>> codes = gen.generate(prompts=["a red star"], num=4, temperature=0.9, cfg_scale=2.0, seed=0)  # (4, H, W, k)
    >>> images = gen.decode(codes)                 # (4, 3, S, S) in [-1, 1], through the tokenizer's decoder

Conditioning (GeneratorConfig.condition):
    "text_tokens"  the tokenizer's own text tower, its per-token states (B, context_length, text_width) as prefix
    "text"         the same tower's pooled, CLIP-aligned feature (B, embed_dim) as one prefix token
    "class"        a class-label embedding with one extra null row
Every kind has a learned null condition (label dropout in training; the unconditional branch of classifier-free
guidance at sampling). With `condition_at_every_position` (the default) a linear map of the mean prefix token is
also added to every image position's input, so no position has to find the prompt through attention.

Positions: learned 2D embeddings (a row table plus a column table, summed). The grid size is fixed by the tokenizer,
so nothing needs to extrapolate to other sizes (RoPE's advantage); the factorised tables keep the 2D neighbourhood
structure with H + W vectors, and they are added once at the input, so the KV cache and PyTorch's fused attention
are used unchanged. Each slot carries the position it *predicts*: slot P-1+t holds emb(codes[t-1]) (or the last
condition token for t = 0) plus pos(t).

Sampling is deterministic for a seed: the uniform numbers behind every draw are taken up front from one seeded
generator (B, N, k), and a draw is an inverse-CDF lookup, so the KV-cached and the recomputing paths draw the same
codes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_

from ..training.checkpoint import atomic_write, load_state_dict_checked
from ..tokenizer.codes import check_codes as _check_code_values

CONDITIONS = ("text_tokens", "text", "class")
HEADS = ("depth", "parallel")
CODE_LOGITS = ("codebook", "linear")


@dataclass
class GeneratorConfig:
    # the token grid (taken from the tokenizer)
    grid_size: int = 8
    num_codebooks: int = 8
    codebook_size: int = 256
    # spatial transformer
    width: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    # output head
    head: str = "depth"               # "depth" (the reference's) or "parallel" (k independent heads, a baseline)
    depth_width: int = 128
    depth_layers: int = 1
    depth_heads: int = 4
    # output logits: "linear" (a free classifier over K, zero-initialised: the reference's) or "codebook" (the same
    # plus <q_j(h), e_jc>, a learned query against the tokenizer's own unit-norm code vectors e_jc of sub-codebook j,
    # also zero-initialised): codes the tokenizer put near each other get near logits, so the head learns *where*
    # in code space a patch lies before it learns each of the K codes apart (see `CodeClassifier`)
    code_logits: str = "codebook"
    # image input: "embedding" (the reference's sum of k learned sub-code embeddings) or "codebook" (the Liquid way,
    # as in unitok.mllm.model: codes -> the tokenizer's own unit-norm code vectors -> its post_quant_proj made causal ->
    # a small MLP), which hands the model the tokenizer's geometry of the codes instead of 2048 random rows
    image_input: str = "embedding"
    latent_dim: int = 32              # tokenizer latent (codebook mode)
    tokenizer_width: int = 128        # tokenizer width after post_quant_proj (codebook mode)
    projection: str = "attn"          # the tokenizer's projection kind (codebook mode)
    # "codebook": sub-code embeddings start as random linear maps of the tokenizer's own (unit-norm) code vectors,
    # so codes that are close in the codebook start close; "random": trunc-normal tables (see `init_from_tokenizer`)
    embed_init: str = "codebook"
    # conditioning
    condition: str = "text_tokens"    # "text_tokens", "text" or "class"
    num_classes: int = 64
    class_names: List[str] = field(default_factory=list)   # class i's name, so prompts like "a red star" map to it
    label_dropout: float = 0.1        # probability of replacing a condition by the null one in training
    # also add a linear map of the mean prefix token to every image position's input: each position then holds the
    # condition in its own residual stream instead of having to find it through attention. False is the
    # reference's prefix alone; True drew the prompted colour 89 % of the time against 76 % (docs/generation.md)
    condition_at_every_position: bool = True
    text_dim: int = 64                # pooled text feature size (tokenizer embed_dim)
    text_width: int = 64              # per-token text state size (tokenizer text_width)
    context_length: int = 24          # text tokens (tokenizer context_length)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        problems = []
        if self.head not in HEADS:
            problems.append(f"head must be one of {HEADS}, got {self.head!r}")
        if self.code_logits not in CODE_LOGITS:
            problems.append(f"code_logits must be one of {CODE_LOGITS}, got {self.code_logits!r}")
        if self.condition not in CONDITIONS:
            problems.append(f"condition must be one of {CONDITIONS}, got {self.condition!r}")
        if self.width % self.num_heads:
            problems.append(f"width {self.width} must be divisible by num_heads {self.num_heads}")
        if self.depth_width % self.depth_heads:
            problems.append(f"depth_width {self.depth_width} must be divisible by depth_heads {self.depth_heads}")
        for name in ("grid_size", "num_codebooks", "codebook_size", "width", "depth", "num_classes"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.label_dropout < 1.0:
            problems.append(f"label_dropout must lie in [0, 1), got {self.label_dropout}")
        if self.image_input not in ("embedding", "codebook"):
            problems.append(f"image_input must be 'embedding' or 'codebook', got {self.image_input!r}")
        if self.image_input == "codebook" and self.projection not in ("attn", "linear"):
            problems.append(f"image_input='codebook' needs an 'attn' or 'linear' tokenizer projection, got "
                            f"{self.projection!r}")
        if self.embed_init not in ("codebook", "random"):
            problems.append(f"embed_init must be 'codebook' or 'random', got {self.embed_init!r}")
        if self.class_names and len(self.class_names) != self.num_classes:
            problems.append(f"class_names has {len(self.class_names)} names but num_classes={self.num_classes}")
        if problems:
            raise ValueError("invalid GeneratorConfig: " + "; ".join(problems))

    # options added after generators were first saved, with the value those generators were trained with
    SAVED_BEFORE = {"code_logits": "linear", "condition_at_every_position": False}

    @classmethod
    def from_saved(cls, values: dict) -> "GeneratorConfig":
        """A config dict from a saved folder or run -> the config it was trained with, whatever today's defaults."""
        return cls(**{**cls.SAVED_BEFORE, **values})

    @property
    def num_positions(self) -> int:
        return self.grid_size ** 2

    @property
    def prefix_length(self) -> int:
        return self.context_length if self.condition == "text_tokens" else 1

    @classmethod
    def preset(cls, name: str, tokenizer=None, **overrides) -> "GeneratorConfig":
        """"tiny": CPU minutes on the tiny tokenizer's 8x8x8 grid; "base": the reference's 16x16x8 grid, 4096 codes.

        With a tokenizer, the grid, codebooks and text sizes are taken from it (they must match it anyway).
        """
        presets = {
            # the depth head runs on B*N*k = 64x more tokens than the spatial transformer, so its width sets the
            # step cost; but it alone models how the k sub-codes of a token fit together, and a 64-wide head drew
            # incoherent patches (docs/generation.md): 128 wide costs 1.5x per step and learns far faster
            "tiny": dict(width=128, depth=4, num_heads=4, depth_width=128, depth_layers=1, depth_heads=4),
            "base": dict(grid_size=16, num_codebooks=8, codebook_size=4096, width=768, depth=12, num_heads=12,
                         depth_width=768, depth_layers=4, depth_heads=12, text_dim=512, text_width=512,
                         context_length=77),
        }
        if name not in presets:
            raise ValueError(f"unknown generator preset {name!r}; expected one of {sorted(presets)}")
        values = dict(presets[name])
        if tokenizer is not None:
            values.update(tokenizer_fields(tokenizer))
        values.update(overrides)
        return cls(**values)


def tokenizer_fields(tokenizer) -> dict:
    """The GeneratorConfig fields a tokenizer fixes: grid, codebooks and the text tower's sizes."""
    c = tokenizer.config
    return dict(grid_size=c.grid_size, num_codebooks=c.num_codebooks, codebook_size=c.codebook_size,
                text_dim=c.embed_dim, text_width=c.text_width, context_length=c.context_length,
                latent_dim=c.latent_dim, tokenizer_width=c.width, projection=c.projection)


def image_projector(in_dim: int, width: int) -> nn.Sequential:
    """Liquid's projector from the tokenizer's up-projected tokens into a model: LayerNorm -> Linear -> GELU ->
    Linear, (..., in_dim) -> (..., width). Shared by the generator's and the unified model's codebook input."""
    return nn.Sequential(nn.LayerNorm(in_dim, eps=1e-6), nn.Linear(in_dim, width), nn.GELU(), nn.Linear(width, width))


def code_vectors(codebooks: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """codebooks (k, K, d) unit-norm, codes (..., k) -> the quantized latent (..., k * d), as the tokenizer's
    `quantizer.lookup` gives it, from a copy of its codebooks."""
    k = codebooks.shape[0]
    return codebooks[torch.arange(k, device=codes.device), codes.long()].flatten(-2)


def tokenizer_hash(tokenizer) -> str:
    """sha256 over the tokenizer's state dict (names, shapes, dtypes, bytes): changes whenever its weights do."""
    h = hashlib.sha256()
    for name, tensor in sorted(tokenizer.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-d: 1-d first
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# best of n: the tokenizer reads what was drawn
# ---------------------------------------------------------------------------------------------------------------
def check_rerank(rerank) -> int:
    """rerank (candidates per sample, 1 = off) -> int, or a ValueError naming what was expected."""
    if not isinstance(rerank, int) or isinstance(rerank, bool) or rerank < 1:
        raise ValueError(f"rerank must be an int >= 1 (candidates per sample; 1 = off), got {rerank!r}")
    return rerank


@torch.no_grad()
def keep_best_aligned(tokenizer, candidates: torch.Tensor, prompts: Sequence[str], num: int) -> torch.Tensor:
    """Best-of-n by the tokenizer's own image-text alignment (CLIP-style re-ranking of samples).

    candidates (P * num * n, H, W, k): n draws for each of the `num` samples of each of the P prompts, item-major
    (prompt, then sample, then draw) -> (P * num, H, W, k): for each sample, the draw whose tokenizer image feature
    (`UniTok.code_features`, read straight from the codes) has the highest cosine with its prompt's text feature.
    The tokenizer is the model's own understanding side, not the classifier that scores the samples.
    """
    P = len(prompts)
    n = candidates.shape[0] // max(P * num, 1)
    if n < 1 or candidates.shape[0] != P * num * n:
        raise ValueError(f"expected P * num * n candidates for P = {P} prompts and num = {num}, got "
                         f"{candidates.shape[0]}")
    device = tokenizer.logit_scale.device
    image = torch.cat([tokenizer.code_features(c.to(device)) for c in candidates.split(256)])   # (P*num*n, E)
    text = tokenizer.encode_text(list(prompts))                                                   # (P, E)
    score = (image.view(P, num * n, -1) * text[:, None]).sum(-1).view(P * num, n)
    best = score.argmax(1).to(candidates.device)
    return candidates.view(P * num, n, *candidates.shape[1:])[torch.arange(P * num, device=candidates.device), best]


# ---------------------------------------------------------------------------------------------------------------
# the output classifier over each sub-codebook's K codes
# ---------------------------------------------------------------------------------------------------------------
class CodeClassifier(nn.Linear):
    """Logits over the K codes of each sub-codebook, from head states.

    A plain `nn.Linear(in_dim, outputs * K)` (outputs = 1: one classifier shared by the k sub-codes, the depth head;
    outputs = k: k independent heads, the parallel baseline), plus, with `geometry=True`, a term that knows the
    tokenizer's codebooks: logit_jc += <x W_j, e_jc>, with W_j (in_dim, d) learned per sub-codebook j and e_jc its
    unit-norm code vectors (a frozen copy, filled by `set_codebooks`). The tokenizer quantizes each chunk by cosine
    to the nearest code, so a flat patch of a slightly different colour lands on a *neighbouring* code; with the
    geometric term one query direction covers a whole neighbourhood (a von Mises-Fisher-like bump whose sharpness is
    the query's norm), where the free classifier must raise each of the K logits on its own. Both parts start at
    zero, so an untrained head still gives exactly log2 K bits per sub-code.

    forward(x (M, k, in_dim)) -> (M, k, K) for the shared head (x's j-th row predicts sub-code j), or
    forward(x (M, in_dim), index=j) -> (M, K); the parallel head takes x (M, in_dim) -> (M, k, K).
    """

    def __init__(self, in_dim: int, num_codebooks: int, codebook_size: int, code_dim: int, shared: bool,
                 geometry: bool):
        super().__init__(in_dim, codebook_size * (1 if shared else num_codebooks))
        self.k, self.K, self.shared = num_codebooks, codebook_size, shared
        self.geometry = geometry
        if geometry:
            self.query = nn.Parameter(torch.zeros(num_codebooks, in_dim, code_dim))
            self.register_buffer("code_vectors", torch.zeros(num_codebooks, codebook_size, code_dim))

    def reset_parameters(self) -> None:   # zero-initialised (the reference's classifier): uniform logits at start
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)

    @torch.no_grad()
    def set_codebooks(self, codebooks: torch.Tensor) -> None:
        """codebooks (k, K, d): the tokenizer's unit-norm code vectors."""
        if self.geometry:
            self.code_vectors.copy_(codebooks.to(self.code_vectors))

    def forward(self, x: torch.Tensor, index: Optional[int] = None) -> torch.Tensor:
        logits = super().forward(x)
        if not self.shared:
            logits = logits.view(*x.shape[:-1], self.k, self.K)
        if not self.geometry:
            return logits
        if index is not None:              # one sub-codebook: x (M, in_dim)
            q = x @ self.query[index].to(x.dtype)
            return logits + q @ self.code_vectors[index].to(x.dtype).T
        if self.shared:                    # x (M, k, in_dim): row j against sub-codebook j
            q = torch.einsum("mji,jid->mjd", x, self.query.to(x.dtype))
        else:                              # x (M, in_dim): every sub-codebook from the same state
            q = torch.einsum("mi,jid->mjd", x, self.query.to(x.dtype))
        return logits + torch.einsum("mjd,jcd->mjc", q, self.code_vectors.to(x.dtype))


# ---------------------------------------------------------------------------------------------------------------
# a small pre-norm causal transformer with a KV cache
# ---------------------------------------------------------------------------------------------------------------
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


@dataclass
class GeneratorOutput:
    logits: torch.Tensor        # (B, N, k, K)
    loss: torch.Tensor          # () mean cross-entropy over all B*N*k sub-codes, in nats
    bits_per_subcode: float     # loss / ln 2 (a Python float: one host sync)


@dataclass
class PositionStep:
    """What one sampling step drew: position t (row-major), codes (B, k), the probability of each drawn sub-code
    (B, k) and the entropy of each sub-code's distribution in bits (B, k), after temperature/top-k/top-p/CFG."""
    position: int
    codes: torch.Tensor
    probs: torch.Tensor
    entropy: torch.Tensor


# ---------------------------------------------------------------------------------------------------------------
# the generator
# ---------------------------------------------------------------------------------------------------------------
class TokenGenerator(nn.Module):
    """Autoregressive model of p(codes | condition) over (H, W, k) code grids. See the module docstring.

    Args:
        config: a GeneratorConfig (grid, codebooks and text sizes must match the tokenizer).
        tokenizer: the frozen UniTok whose text tower encodes prompts and whose decoder draws images. It is kept
            outside this module's parameters (not saved with it, never trained, not moved by `.to`).
    """

    def __init__(self, config: GeneratorConfig, tokenizer=None):
        super().__init__()
        config.validate()
        self.config = cfg = config
        k, K, D = cfg.num_codebooks, cfg.codebook_size, cfg.width
        if cfg.image_input == "embedding":
            # input: one table of K rows per sub-codebook, stored as one (k*K, D) table indexed with offsets
            self.code_embed = nn.Embedding(k * K, D)
            self.register_buffer("code_offsets", torch.arange(k) * K, persistent=False)
        else:
            # a copy of the tokenizer's unit-norm codebooks (k, K, d) and of its post_quant_proj, made causal so a
            # position's input never sees later positions; both are filled from the tokenizer at construction
            from ..tokenizer.projection import build_projection

            self.register_buffer("codebooks", torch.zeros(k, K, cfg.latent_dim // k))
            self.post_quant_proj = build_projection(cfg.projection, cfg.latent_dim, cfg.tokenizer_width, causal=True)
            self.projector = image_projector(cfg.tokenizer_width, D)
        self.row_embed = nn.Parameter(torch.zeros(cfg.grid_size, D))
        self.col_embed = nn.Parameter(torch.zeros(cfg.grid_size, D))
        # condition prefix
        P = cfg.prefix_length
        if cfg.condition == "class":
            self.class_embed = nn.Embedding(cfg.num_classes + 1, D)   # last row: the null class
        else:
            self.cond_proj = nn.Linear(cfg.text_width if cfg.condition == "text_tokens" else cfg.text_dim, D)
            self.null_cond = nn.Parameter(torch.zeros(P, D))
        self.prefix_pos = nn.Parameter(torch.zeros(P, D))
        if cfg.condition_at_every_position:
            self.condition_to_positions = nn.Linear(D, D)
        self.spatial = CausalTransformer(D, cfg.depth, cfg.num_heads, cfg.mlp_ratio, cfg.dropout)
        # output head
        if cfg.head == "depth":
            Dd = cfg.depth_width
            self.depth_in = nn.Linear(D, Dd) if Dd != D else nn.Identity()
            self.depth_embed = nn.Embedding(max(k - 1, 1) * K, Dd)  # k-1 tables for sub-codes 1..k-1
            self.register_buffer("depth_offsets", torch.arange(max(k - 1, 1)) * K, persistent=False)
            self.depth = CausalTransformer(Dd, cfg.depth_layers, cfg.depth_heads, cfg.mlp_ratio, cfg.dropout)
        # depth: one classifier shared by the k sub-codes; parallel: k independent heads in one matrix
        self.classifier = CodeClassifier(Dd if cfg.head == "depth" else D, k, K, cfg.latent_dim // k,
                                         shared=cfg.head == "depth", geometry=cfg.code_logits == "codebook")
        self._init_weights()
        self._tokenizer = [tokenizer]   # a list, so the frozen tokenizer is not registered as a submodule
        if tokenizer is not None:
            self.init_from_tokenizer(tokenizer)

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                trunc_normal_(m.weight, std=0.02)
        for p in (self.row_embed, self.col_embed, self.prefix_pos):
            trunc_normal_(p, std=0.02)
        # the reference zero-initialises the classifier: every sub-code starts at the uniform ln K loss
        self.classifier.reset_parameters()

    @torch.no_grad()
    def init_from_tokenizer(self, tokenizer, std: float = 0.02, noise: float = 0.005) -> None:
        """Fill what comes from the tokenizer (codebook mode: its codebooks and post_quant_proj), and with
        embed_init="codebook" start every sub-code embedding table from its codebooks.

        Row j of sub-codebook i's table becomes c_ij @ R_i + noise, with c_ij the unit-norm code vector (d,) and R_i a
        random (d, width) map with N(0, std^2) entries: the same scale as a random table, but codes that the
        tokenizer placed near each other start near each other, so the model does not have to discover from
        co-occurrence alone which of the K codes mean similar patches. The sum over the k sub-codes of a position
        is then a random linear map of the token's whole quantized latent: still exactly "one embedding per
        sub-codebook, summed". Applied to the input tables and to the depth head's tables.
        """
        cfg = self.config
        codebooks = tokenizer.quantizer.normalized_codebooks().detach().float().cpu()   # (k, K, d)
        k, K, d = codebooks.shape
        if (k, K) != (cfg.num_codebooks, cfg.codebook_size):
            raise ValueError(f"the tokenizer has {k} x {K} codes but the generator expects "
                             f"{cfg.num_codebooks} x {cfg.codebook_size}")

        def mapped(table: nn.Embedding, books: torch.Tensor) -> None:
            width = table.weight.shape[1]
            rows = torch.einsum("ikd,idw->ikw", books, torch.randn(len(books), d, width) * std)
            rows = rows.reshape(-1, width) + torch.randn(len(books) * K, width) * noise
            table.weight.copy_(rows.to(table.weight))

        self.classifier.set_codebooks(codebooks)
        if cfg.image_input == "codebook":
            self.codebooks.copy_(codebooks.to(self.codebooks))
            self.post_quant_proj.load_state_dict(tokenizer.post_quant_proj.state_dict())
        if cfg.embed_init != "codebook":
            return
        if cfg.image_input == "embedding":
            mapped(self.code_embed, codebooks)
        if cfg.head == "depth" and k > 1:
            mapped(self.depth_embed, codebooks[:-1])      # table i embeds sub-code i (0..k-2)

    # ------------------------------------------------------------------ tokenizer link
    @property
    def tokenizer(self):
        return self._tokenizer[0]

    def attach_tokenizer(self, tokenizer) -> None:
        """Use `tokenizer` for prompts and decoding; its grid and text sizes must match this generator's."""
        expected = tokenizer_fields(tokenizer)
        own = {k: getattr(self.config, k) for k in expected}
        if expected != own:
            raise ValueError(f"tokenizer does not match the generator: tokenizer {expected}, generator {own}")
        self._tokenizer[0] = tokenizer.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.row_embed.device

    # ------------------------------------------------------------------ input checks
    def check_codes(self, codes: torch.Tensor, positions: Optional[int] = None) -> None:
        """codes (B, H, W, k) integer in [0, K); ValueError naming what was expected otherwise."""
        cfg = self.config
        g, k, K = cfg.grid_size, cfg.num_codebooks, cfg.codebook_size
        expected = f"integer codes (B, {g}, {g}, {k}) in [0, {K})"
        if not isinstance(codes, torch.Tensor) or codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise ValueError(f"expected {expected}, got {type(codes).__name__} {getattr(codes, 'dtype', '')}")
        if codes.ndim != 4 or tuple(codes.shape[1:3]) != (g, g):
            raise ValueError(f"expected {expected}, got shape {tuple(codes.shape)}")
        if codes.shape[-1] != k:
            raise ValueError(f"expected {k} sub-codes per position ({expected}), got {codes.shape[-1]} "
                             f"(shape {tuple(codes.shape)})")
        _check_code_values(codes, K, k)   # the project's range check: "codes must lie in [0, K), got ..." 

    def _check_labels(self, labels) -> torch.Tensor:
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        n = self.config.num_classes
        if labels.numel() == 0:
            raise ValueError(f"expected at least one class label in [0, {n}), got none")
        bad = labels[(labels < 0) | (labels >= n)]
        if bad.numel():
            raise ValueError(f"unknown class {int(bad[0])}: expected a label in [0, {n})")
        return labels

    def _check_prompts(self, prompts) -> List[str]:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("expected at least one prompt, got an empty list")
        for p in prompts:
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"expected non-empty prompt text, got {p!r}")
        return prompts

    def labels_from_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """A class-conditional generator also accepts prompts naming a class: "a red star" -> "red star"'s index."""
        names = {n.lower(): i for i, n in enumerate(self.config.class_names)}
        out = []
        for p in self._check_prompts(prompts):
            key = p.strip().lower().rstrip(".")
            for article in ("a ", "an ", "the "):
                if key.startswith(article):
                    key = key[len(article):]
                    break
            if key not in names:
                raise ValueError(f"this generator is conditioned on class labels; prompt {p!r} names no class "
                                 f"(expected 'a <class>' with <class> one of {self.config.class_names[:6]}..., "
                                 f"or pass labels)")
            out.append(names[key])
        return torch.tensor(out)

    # ------------------------------------------------------------------ conditions
    def text_states(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> the frozen text tower's output for this config's condition kind:
        "text_tokens": per-token states (B, context_length, text_width); "text": pooled feature (B, text_dim)."""
        prompts = self._check_prompts(prompts)
        tok = self.tokenizer
        if tok is None:
            raise ValueError("text conditioning needs the tokenizer: pass tokenizer= or call attach_tokenizer()")
        return self.text_states_from_ids(tok.tokenize(prompts))

    @torch.no_grad()
    def text_states_from_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, context_length) -> the text tower's states (see `text_states`), on this model's device."""
        tok = self.tokenizer
        tower = tok.text_encoder
        ids = ids.to(tok.logit_scale.device)
        if self.config.condition == "text":
            out = tok.encode_text(ids)                      # (B, E) unit norm: the CLIP-aligned feature
        else:
            previous = tower.output_tokens
            tower.output_tokens = True                      # open_clip returns (pooled, per-token states)
            try:
                _, out = tower(ids)                          # (B, L, text_width) after the final LayerNorm
            finally:
                tower.output_tokens = previous
        return out.float().to(self.device)

    def condition_prefix(self, cond: Optional[torch.Tensor], drop: Optional[torch.Tensor] = None,
                         batch: Optional[int] = None) -> torch.Tensor:
        """The prefix (B, P, D).

        cond: class labels (B,) for "class", else text states from `text_states`; None = the null condition for
            `batch` items. drop: optional bool (B,) replacing some items by the null condition (label dropout).
        """
        cfg = self.config
        if cond is None:
            if cfg.condition == "class":
                prefix = self.class_embed.weight[cfg.num_classes].expand(batch, 1, -1)
            else:
                prefix = self.null_cond.expand(batch, -1, -1)
            return prefix + self.prefix_pos
        if cfg.condition == "class":
            labels = cond.to(self.device).long()
            if drop is not None:
                labels = torch.where(drop, torch.full_like(labels, cfg.num_classes), labels)
            prefix = self.class_embed(labels)[:, None]
        else:
            x = cond.to(self.device)
            prefix = self.cond_proj(x if x.ndim == 3 else x[:, None])
            if drop is not None:
                prefix = torch.where(drop[:, None, None], self.null_cond.expand_as(prefix), prefix)
        return prefix + self.prefix_pos

    def encode_condition(self, prompts=None, labels=None) -> torch.Tensor:
        """User-facing conditions -> what `condition_prefix` takes: labels (B,) or text states."""
        cfg = self.config
        if cfg.condition == "class":
            if labels is None:
                if prompts is None:
                    raise ValueError("this generator is class-conditional: expected labels (or prompts naming a "
                                     "class), got neither")
                return self.labels_from_prompts(prompts).to(self.device)
            return self._check_labels(labels).to(self.device)
        if prompts is None:
            raise ValueError(f"this generator is conditioned on text ({cfg.condition}): expected prompts, got "
                             f"{'class labels' if labels is not None else 'none'}")
        return self.text_states(prompts)

    # ------------------------------------------------------------------ pieces of the forward pass
    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, T, k) -> (B, T, D): the sum of the k sub-code embeddings of each position ("embedding"), or the
        projected code vectors ("codebook"; causal: position t depends on positions <= t only)."""
        if self.config.image_input == "embedding":
            return self.code_embed(codes + self.code_offsets).sum(-2)
        return self.projector(self.post_quant_proj(code_vectors(self.codebooks, codes)))

    def pos_embed(self, start: int = 0, end: Optional[int] = None) -> torch.Tensor:
        """(end - start, D) learned 2D embeddings of row-major positions start..end-1."""
        g = self.config.grid_size
        pos = (self.row_embed[:, None] + self.col_embed[None]).reshape(g * g, -1)
        return pos[start:end]

    def position_condition(self, prefix: torch.Tensor):
        """prefix (B, P, D) -> what every image slot adds (B, 1, D) with `condition_at_every_position`, else 0."""
        if not self.config.condition_at_every_position:
            return 0
        return self.condition_to_positions(prefix.mean(1, keepdim=True))

    def _spatial_inputs(self, prefix: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """prefix (B, P, D), codes (B, T, k) of positions 0..T-1 (T < N) -> sequence (B, P + T, D) whose slot
        P-1+t carries pos(t): the last slot asks for position T."""
        P, T = prefix.shape[1], codes.shape[1]
        seq = torch.cat([prefix, self.embed_codes(codes) + self.position_condition(prefix)], 1) if T else prefix
        pos = torch.cat([seq.new_zeros(P - 1, seq.shape[-1]), self.pos_embed(0, T + 1)])
        return seq + pos

    def depth_logits(self, h: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced head. h (M, D) spatial states, codes (M, k) -> logits (M, k, K)."""
        cfg = self.config
        if cfg.head == "parallel":
            return self.classifier(h)
        x = self.depth_in(h)[:, None]
        if cfg.num_codebooks > 1:
            prev = self.depth_embed(codes[:, :-1] + self.depth_offsets[:cfg.num_codebooks - 1])
            x = torch.cat([x, prev], 1)
        return self.classifier(self.depth(x))

    def forward(self, codes: torch.Tensor, cond=None, drop: Optional[torch.Tensor] = None,
                prompts=None, labels=None, input_codes: Optional[torch.Tensor] = None) -> GeneratorOutput:
        """Teacher-forced pass. codes (B, H, W, k); cond as for `condition_prefix` (or prompts / labels).

        input_codes (B, H, W, k): what the spatial transformer reads as the positions before each one (default:
        `codes`, the targets); training may pass a corrupted copy (`GeneratorTrainConfig.code_noise`).

        Returns logits (B, N, k, K) and the mean cross-entropy over all B*N*k sub-codes. Shapes are checked; values
        are checked only when prompts/labels are given (a range check costs a host sync per training step).
        """
        cfg = self.config
        B = codes.shape[0]
        if cond is None and (prompts is not None or labels is not None):
            self.check_codes(codes)
            cond = self.encode_condition(prompts, labels)
        flat = codes.reshape(B, -1, cfg.num_codebooks).to(self.device)
        prefix = self.condition_prefix(cond, drop, batch=B)
        P = prefix.shape[1]
        seen = flat if input_codes is None else input_codes.reshape(B, -1, cfg.num_codebooks).to(self.device)
        h = self.spatial(self._spatial_inputs(prefix, seen[:, :-1]))[:, P - 1:]      # (B, N, D)
        logits = self.depth_logits(h.reshape(-1, h.shape[-1]), flat.reshape(-1, cfg.num_codebooks))
        logits = logits.view(B, -1, cfg.num_codebooks, cfg.codebook_size)
        loss = F.cross_entropy(logits.float().reshape(-1, cfg.codebook_size), flat.reshape(-1))
        return GeneratorOutput(logits=logits, loss=loss, bits_per_subcode=float(loss.detach()) / math.log(2))

    @torch.no_grad()
    def nll(self, codes: torch.Tensor, cond=None, prompts=None, labels=None) -> torch.Tensor:
        """Negative log-likelihood in bits per position and sub-code (B, H, W, k), teacher-forced."""
        out = self.forward(codes, cond, prompts=prompts, labels=labels)
        B, g, k = codes.shape[0], self.config.grid_size, self.config.num_codebooks
        nll = F.cross_entropy(out.logits.float().flatten(0, 2), codes.to(self.device).reshape(-1), reduction="none")
        return (nll / math.log(2)).view(B, g, g, k)

    # ------------------------------------------------------------------ sampling
    @staticmethod
    def guided_logits(cond_logits: torch.Tensor, uncond_logits: Optional[torch.Tensor], cfg_scale: float):
        """Classifier-free guidance: u + s (c - u); exactly the conditional logits at s = 1 (no mixing done)."""
        if uncond_logits is None or cfg_scale == 1.0:
            return cond_logits
        return uncond_logits + cfg_scale * (cond_logits - uncond_logits)

    @staticmethod
    def filter_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0):
        """(M, K) logits -> log-probabilities after temperature, top-k and nucleus (top-p) filtering."""
        logits = logits.float() / temperature
        if top_k and top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        if top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            remove = cum - sorted_logits.softmax(-1) >= top_p     # keep the smallest set reaching top_p
            remove[:, 0] = False
            logits = logits.masked_fill(remove.scatter(1, order, remove), -math.inf)
        return logits.log_softmax(-1)

    @staticmethod
    def _draw(logp: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Inverse-CDF draw: logp (M, K), u (M,) in [0, 1) -> (M,) indices. Robust to tiny float differences."""
        cdf = logp.exp().cumsum(-1)
        idx = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1).contiguous()).squeeze(-1)
        return idx.clamp_(max=logp.shape[-1] - 1)

    def _check_sampling(self, temperature, top_k, top_p, cfg_scale):
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if not (isinstance(top_k, int) and 0 <= top_k):
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {top_p!r}")
        if cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0 (1 = no guidance), got {cfg_scale!r}")

    def _sample_position(self, h: torch.Tensor, u: torch.Tensor, B: int, guided: bool, settings: dict,
                         use_cache: bool):
        """Draw the k sub-codes of one position. h (B or 2B, D); u (B, k). Returns codes, probs, entropy (B, k)."""
        cfg = self.config
        k = cfg.num_codebooks
        codes = torch.zeros(B, k, dtype=torch.long, device=h.device)
        probs = torch.zeros(B, k, device=h.device)
        ent = torch.zeros(B, k, device=h.device)

        def choose(i, logits):
            c, un = (logits[:B], logits[B:]) if guided else (logits, None)
            logp = self.filter_logits(self.guided_logits(c, un, settings["cfg_scale"]), settings["temperature"],
                                      settings["top_k"], settings["top_p"])
            idx = self._draw(logp, u[:, i])
            p = logp.exp()
            codes[:, i] = idx
            probs[:, i] = p.gather(1, idx[:, None])[:, 0]
            ent[:, i] = -(p * logp.clamp(min=-1e30)).nan_to_num(0.0).sum(-1) / math.log(2)
            return idx

        if cfg.head == "parallel":  # sub-codes independent given h
            logits = self.classifier(h)
            for i in range(k):
                choose(i, logits[:, i])
            return codes, probs, ent
        x0 = self.depth_in(h)[:, None]                                   # (M, 1, Dd)
        reps = 2 if guided else 1
        if use_cache:
            cache = self.depth.new_cache()
            x = x0
            for i in range(k):
                out = self.depth(x, cache)[:, -1]
                idx = choose(i, self.classifier(out, index=i))
                if i + 1 < k:
                    x = self.depth_embed((idx + self.depth_offsets[i]).repeat(reps))[:, None]
        else:  # recompute the whole depth sequence for every sub-code (the no-cache baseline)
            for i in range(k):
                prev = codes[:, :i] + self.depth_offsets[:i]
                x = torch.cat([x0, self.depth_embed(prev.repeat(reps, 1))], 1) if i else x0
                choose(i, self.classifier(self.depth(x)[:, -1], index=i))
        return codes, probs, ent

    @torch.no_grad()
    def sample_steps(self, cond=None, num: Optional[int] = None, temperature: float = 1.0, top_k: int = 0,
                     top_p: float = 1.0, cfg_scale: float = 1.0, seed: int = 0, codes: Optional[torch.Tensor] = None,
                     first_n: int = 0, use_cache: bool = True) -> Iterator[PositionStep]:
        """Sample position by position, yielding a PositionStep after each; fills `codes` in place.

        cond: as for `condition_prefix` (B items; labels (B,) or text states). codes: (B, H, W, k) to write into
        (positions < first_n are kept: completion). Everything else as in `generate`.
        """
        cfg = self.config
        self._check_sampling(temperature, top_k, top_p, cfg_scale)
        B = int(cond.shape[0]) if cond is not None else int(num)
        N, k = cfg.num_positions, cfg.num_codebooks
        if not 0 <= first_n <= N:
            raise ValueError(f"first_n must lie in [0, {N}] (positions of the {cfg.grid_size}x{cfg.grid_size} "
                             f"grid), got {first_n}")
        if codes is None:
            codes = torch.zeros(B, cfg.grid_size, cfg.grid_size, k, dtype=torch.long, device=self.device)
        flat = codes.view(B, N, k)
        gen = torch.Generator().manual_seed(int(seed))
        u = torch.rand(B, N, k, generator=gen).to(self.device)   # every draw's uniform, fixed by the seed
        guided = cond is not None and cfg_scale != 1.0
        prefix = self.condition_prefix(cond, batch=B)
        if guided:
            prefix = torch.cat([prefix, self.condition_prefix(None, batch=B)])
        reps = 2 if guided else 1
        settings = dict(temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale)
        was_training = self.training
        self.eval()
        try:
            everywhere = self.position_condition(prefix)
            cache = self.spatial.new_cache() if use_cache else None
            for t in range(first_n, N):
                if not use_cache:
                    h = self.spatial(self._spatial_inputs(prefix, flat[:, :t].repeat(reps, 1, 1)))[:, -1]
                elif t == first_n:   # prefill: the prefix and the kept positions in one pass
                    h = self.spatial(self._spatial_inputs(prefix, flat[:, :t].repeat(reps, 1, 1)), cache)[:, -1]
                else:                # one new slot: emb(codes[t-1]) + pos(t)
                    if cfg.image_input == "embedding":   # a position's input is its own codes only
                        x = self.embed_codes(flat[:, t - 1:t].repeat(reps, 1, 1))
                    else:   # the causal projection reads the positions before it too: recompute, keep the last
                        x = self.embed_codes(flat[:, :t].repeat(reps, 1, 1))[:, -1:]
                    x = x + self.pos_embed(t, t + 1) + everywhere
                    h = self.spatial(x, cache)[:, -1]
                c, p, e = self._sample_position(h, u[:, t], B, guided, settings, use_cache)
                flat[:, t] = c
                yield PositionStep(t, c, p, e)
        finally:
            self.train(was_training)

    def _conditions(self, prompts, labels, num: int):
        """(cond for B = len(items) * num items, B); each prompt/label repeated num times, item-major."""
        if not isinstance(num, int) or isinstance(num, bool) or num < 1:
            raise ValueError(f"num must be an int >= 1 (samples per prompt or label), got {num!r}")
        if prompts is None and labels is None:
            return None, num   # unconditional
        cond = self.encode_condition(prompts, labels)
        return cond.repeat_interleave(num, 0), cond.shape[0] * num

    @torch.no_grad()
    def generate(self, prompts=None, labels=None, num: int = 1, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, cfg_scale: float = 1.0, seed: int = 0, use_cache: bool = True,
                 rerank: int = 1) -> torch.Tensor:
        """Sample code grids -> (len(prompts or labels) * num, H, W, k) int64 (num per item, item-major).

        prompts: str or list of str (text-conditioned model; a class model accepts "a <class name>");
        labels: class indices (class-conditional model); neither: unconditional (num samples).
        temperature > 0; top_k (0 = off); top_p in (0, 1]; cfg_scale: classifier-free guidance (1 = off).
        rerank: draw this many candidates per sample and keep the one the tokenizer's CLIP side finds closest to
        the prompt (`keep_best_aligned`; a class is read as "a <class name>"); 1 = off. n times the sampling cost.
        Deterministic for a seed (same codes with or without the KV cache).
        """
        if check_rerank(rerank) > 1:
            if prompts is None and labels is None:
                raise ValueError("rerank needs prompts or labels: candidates are ranked by their match to the text")
            if self.tokenizer is None:
                raise ValueError("rerank needs the tokenizer: pass tokenizer= or call attach_tokenizer()")
            if prompts is None:
                if not self.config.class_names:
                    raise ValueError("rerank with labels needs the config's class_names (to read class i as text)")
                texts = [f"a {self.config.class_names[i]}" for i in self._check_labels(labels).tolist()]
            else:
                texts = self._check_prompts(prompts)
            candidates = self.generate(prompts, labels, num * rerank if isinstance(num, int) else num, temperature,
                                       top_k, top_p, cfg_scale, seed, use_cache)
            return keep_best_aligned(self.tokenizer, candidates, texts, num)
        cond, B = self._conditions(prompts, labels, num)
        codes = torch.zeros(B, self.config.grid_size, self.config.grid_size, self.config.num_codebooks,
                            dtype=torch.long, device=self.device)
        for _ in self.sample_steps(cond, B, temperature, top_k, top_p, cfg_scale, seed, codes, 0, use_cache):
            pass
        return codes

    @torch.no_grad()
    def complete(self, codes: torch.Tensor, first_n: int, prompts=None, labels=None, **sampling) -> torch.Tensor:
        """Keep the first `first_n` positions (row-major) of each code grid (B, H, W, k) and sample the rest.
        prompts / labels: one per grid (or one for all). Returns new codes (B, H, W, k). Codes of a real image
        should be of the kind the generator learned: a generator trained with `plain_codes="background"` (the
        default) expects `unitok.generator.trainer.blank_plain_codes(tokenizer, images, tokenizer.encode(images))`."""
        self.check_codes(codes)
        out = codes.clone().long().to(self.device)
        cond = None
        if prompts is not None or labels is not None:
            cond = self.encode_condition(prompts, labels)
            if cond.shape[0] == 1:
                cond = cond.expand(out.shape[0], *cond.shape[1:])
        for _ in self.sample_steps(cond, out.shape[0], codes=out, first_n=first_n, **sampling):
            pass
        return out

    @torch.no_grad()
    def resample_position(self, codes: torch.Tensor, row: int, col: int, prompts=None, labels=None,
                          temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, cfg_scale: float = 1.0,
                          seed: int = 0) -> torch.Tensor:
        """Redraw the k sub-codes of one position given everything before it (row-major); the others are kept.
        Returns new codes (B, H, W, k)."""
        self.check_codes(codes)
        g = self.config.grid_size
        if not (0 <= row < g and 0 <= col < g):
            raise ValueError(f"position must lie in the {g}x{g} grid, got row {row}, col {col}")
        self._check_sampling(temperature, top_k, top_p, cfg_scale)
        out = codes.clone().long().to(self.device)
        B, t, k = out.shape[0], row * g + col, self.config.num_codebooks
        cond = None
        if prompts is not None or labels is not None:
            cond = self.encode_condition(prompts, labels)
            if cond.shape[0] == 1:
                cond = cond.expand(B, *cond.shape[1:])
        guided = cond is not None and cfg_scale != 1.0
        prefix = self.condition_prefix(cond, batch=B)
        if guided:
            prefix = torch.cat([prefix, self.condition_prefix(None, batch=B)])
        flat = out.view(B, -1, k)
        was_training = self.training
        self.eval()
        h = self.spatial(self._spatial_inputs(prefix, flat[:, :t].repeat(2 if guided else 1, 1, 1)))[:, -1]
        u = torch.rand(B, k, generator=torch.Generator().manual_seed(int(seed))).to(self.device)
        settings = dict(temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale)
        flat[:, t] = self._sample_position(h, u, B, guided, settings, True)[0]
        self.train(was_training)
        return out

    @torch.no_grad()
    def position_maps(self, codes: torch.Tensor, prompts=None, labels=None) -> dict:
        """Teacher-forced per-position maps (B, H, W) in bits: "nll" of the given codes and "entropy", the sum over
        the k sub-codes of each sub-code distribution's entropy given the sub-codes before it."""
        self.check_codes(codes)
        cond = None if prompts is None and labels is None else self.encode_condition(prompts, labels)
        if cond is not None and cond.shape[0] == 1 and codes.shape[0] > 1:
            cond = cond.expand(codes.shape[0], *cond.shape[1:])
        was_training = self.training
        self.eval()
        out = self.forward(codes.long().to(self.device), cond)
        self.train(was_training)
        logp = out.logits.float().log_softmax(-1)
        B, g, k = codes.shape[0], self.config.grid_size, self.config.num_codebooks
        nll = -logp.gather(-1, codes.long().to(self.device).view(B, -1, k, 1))[..., 0]
        ent = -(logp.exp() * logp).sum(-1)
        return {"nll": (nll.sum(-1) / math.log(2)).view(B, g, g), "entropy": (ent.sum(-1) / math.log(2)).view(B, g, g)}

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, H, W, k) -> images (B, 3, S, S) in [-1, 1] through the frozen tokenizer's decoder."""
        if self.tokenizer is None:
            raise ValueError("decoding needs the tokenizer: pass tokenizer= or call attach_tokenizer()")
        self.check_codes(codes)
        tok = self.tokenizer
        return tok.decode(codes.to(tok.logit_scale.device)).float().clamp(-1, 1)

    # ------------------------------------------------------------------ saving and loading
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, directory: Union[str, os.PathLike], tokenizer_path: Optional[str] = None,
                        dtype: Optional[torch.dtype] = None, extra: Optional[dict] = None) -> Path:
        """config.json (the GeneratorConfig, the tokenizer's path and weight hash) + model.safetensors, atomically.

        tokenizer_path: where `from_pretrained` finds the tokenizer (stored relative to `directory` when possible).
        """
        from safetensors.torch import save_file


        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu", dtype if dtype is not None and v.is_floating_point() else v.dtype)
                 .contiguous() for k, v in self.state_dict().items()}
        atomic_write(directory / "model.safetensors", lambda p: save_file(state, p, metadata={"format": "pt"}))
        meta = {"generator": dataclasses.asdict(self.config)}
        if tokenizer_path is not None:
            meta["tokenizer"] = os.path.relpath(Path(tokenizer_path).resolve(), directory.resolve())
        if self.tokenizer is not None:
            meta["tokenizer_sha256"] = tokenizer_hash(self.tokenizer)
        meta.update(extra or {})
        atomic_write(directory / "config.json", lambda p: Path(p).write_text(json.dumps(meta, indent=2)))
        return directory

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike], tokenizer=None,
                        map_location: str = "cpu") -> "TokenGenerator":
        """Load what `save_pretrained` wrote; without `tokenizer`, load the one its config.json points at."""
        from safetensors.torch import load_file

        from ..tokenizer.model import UniTok

        directory = Path(directory)
        for name in ("config.json", "model.safetensors"):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} not found; expected a folder written by "
                                        f"TokenGenerator.save_pretrained (or `unitok train-generator`)")
        meta = json.loads((directory / "config.json").read_text())
        config = GeneratorConfig.from_saved(meta["generator"])
        if tokenizer is None and meta.get("tokenizer"):
            tokenizer = UniTok.from_pretrained((directory / meta["tokenizer"]).resolve(), map_location=map_location)
        model = cls(config)
        load_state_dict_checked(model, load_file(str(directory / "model.safetensors"), device="cpu"))
        model = model.to(map_location)
        model.sampling = dict(meta.get("sampling", {}))   # the settings its trainer recommends (may be empty)
        if tokenizer is not None:
            model.attach_tokenizer(tokenizer)
            want = meta.get("tokenizer_sha256")
            if want and want != tokenizer_hash(tokenizer):
                import warnings
                warnings.warn(f"the tokenizer's weights differ from the ones {directory} was trained on "
                              f"(sha256 {want[:12]}...); samples may be meaningless", stacklevel=2)
        return model.eval()

