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

Conditioning: a prefix of condition tokens, of the kind `GeneratorConfig.condition` names (`unitok.generator.config`).
Every kind has a learned null condition (label dropout in training; the unconditional branch of classifier-free
guidance at sampling). With `condition_at_every_position` (the default) a linear map of the mean prefix token is
also added to every image position's input, so no position has to find the prompt through attention.

Positions: learned 2D embeddings (a row table plus a column table, summed). The grid size is fixed by the tokenizer,
so nothing needs to extrapolate to other sizes (RoPE's advantage); the factorised tables keep the 2D neighbourhood
structure with H + W vectors, and they are added once at the input, so the KV cache and PyTorch's fused attention
are used unchanged. Each slot carries the position it *predicts*: slot P-1+t holds emb(codes[t-1]) (or the last
condition token for t = 0) plus pos(t).

Sampling (`unitok.transformer`: shared with the unified model, as are the network and the depth head) is
deterministic for a seed: the uniform numbers behind every draw are taken up front from one seeded generator
(B, N, k), and a draw is an inverse-CDF lookup, so the KV-cached and the recomputing paths draw the same codes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from ..tokenizer.projection import build_projection
from ..tokenizer.quantizers import sub_code_dim
from ..checkpoint import load_state_dict_checked
from ..transformer.causal import CausalTransformer
from ..transformer.code_head import CodeClassifier
from ..transformer.code_input import code_vectors, embed_codebooks, image_projector
from ..transformer.depth_head import add_depth_head, depth_head_logits, depth_head_steps
from ..transformer.folders import linked_tokenizer, require_files, save_weights, warn_if_tokenizer_changed, write_config
from ..transformer.sampling import (PositionStep, check_rerank, check_sampling, keep_best_aligned,
                                    sample_position, seeded_uniforms)
from .config import GeneratorConfig, tokenizer_fields
from .inputs import check_code_grid, check_labels, item_texts, labels_from_prompts, prompt_ids, text_tower_states


@dataclass
class GeneratorOutput:
    logits: torch.Tensor        # (B, N, k, K)
    loss: torch.Tensor          # () mean cross-entropy over all B*N*k sub-codes, in nats
    bits_per_subcode: float     # loss / ln 2 (a Python float: one host sync)


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
        d = sub_code_dim(cfg.quantizer, cfg.latent_dim, k)   # one sub-code's vector in the tokenizer
        if cfg.image_input == "embedding":   # one table of K rows per sub-codebook, as one (k*K, D) table + offsets
            self.code_embed = nn.Embedding(k * K, D)
            self.register_buffer("code_offsets", torch.arange(k) * K, persistent=False)
        else:
            # copies of the tokenizer's code vectors (k, K, d) and of its post_quant_proj, made causal (filled from it)
            self.register_buffer("codebooks", torch.zeros(k, K, d))
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
        # output head, its layers on the generator itself (their saved key names): the depth head's, with one classifier
        # shared by the k sub-codes (`add_depth_head`); parallel: k independent heads in one matrix
        geometry = cfg.code_logits == "codebook"
        if cfg.head == "depth":
            add_depth_head(self, D, k, K, cfg.depth_width, cfg.depth_layers, cfg.depth_heads, cfg.mlp_ratio,
                           cfg.dropout, code_dim=d, geometry=geometry)
        else:
            self.classifier = CodeClassifier(D, k, K, d, shared=False, geometry=geometry)
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
        embed_init="codebook" start every sub-code embedding table, the input's and the depth head's, from its
        codebooks (`unitok.transformer.code_input.embed_codebooks`: codes the tokenizer placed near each other
        start near each other)."""
        cfg = self.config
        codebooks = tokenizer.quantizer.codebook_vectors().detach().float().cpu()   # (k, K, d)
        k, K, _ = codebooks.shape
        if (k, K) != (cfg.num_codebooks, cfg.codebook_size):
            raise ValueError(f"the tokenizer has {k} x {K} codes but the generator expects "
                             f"{cfg.num_codebooks} x {cfg.codebook_size}")

        self.classifier.set_codebooks(codebooks)
        if cfg.image_input == "codebook":
            self.codebooks.copy_(codebooks.to(self.codebooks))
            self.post_quant_proj.load_state_dict(tokenizer.post_quant_proj.state_dict())
        if cfg.embed_init != "codebook":
            return
        if cfg.image_input == "embedding":
            embed_codebooks(self.code_embed, codebooks, std, noise)
        if cfg.head == "depth" and k > 1:
            embed_codebooks(self.depth_embed, codebooks[:-1], std, noise)   # table i embeds sub-code i (0..k-2)

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
        check_code_grid(codes, self.config.grid_size, self.config.num_codebooks, self.config.codebook_size)

    def labels_from_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """A class-conditional generator also accepts prompts naming a class: "a red star" -> "red star"'s index."""
        return labels_from_prompts(prompts, self.config.class_names)

    # ------------------------------------------------------------------ conditions
    def text_states(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> the frozen text tower's output for this config's condition kind:
        "text_tokens": per-token states (B, context_length, text_width); "text": pooled feature (B, text_dim)."""
        return self.text_states_from_ids(prompt_ids(self.tokenizer, prompts))

    @torch.no_grad()
    def text_states_from_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, context_length) -> the text tower's states (see `text_states`), on this model's device."""
        return text_tower_states(self.tokenizer, ids, self.config.condition).to(self.device)

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
            return check_labels(labels, self.config.num_classes).to(self.device)
        if prompts is None:
            raise ValueError(f"this generator is conditioned on text ({cfg.condition}): expected prompts, got "
                             f"{'class labels' if labels is not None else 'none'}")
        return self.text_states(prompts)

    def _condition_for(self, batch: int, prompts=None, labels=None) -> Optional[torch.Tensor]:
        """`encode_condition` for `batch` items (one prompt / label is used for all); None without either."""
        if prompts is None and labels is None:
            return None
        cond = self.encode_condition(prompts, labels)
        return cond.expand(batch, *cond.shape[1:]) if cond.shape[0] == 1 else cond

    def _guided_prefix(self, cond: Optional[torch.Tensor], batch: int, guided: bool) -> torch.Tensor:
        """The prefix (B, P, D); guided: the null condition's appended (2B, P, D), the unguided branch of CFG."""
        prefix = self.condition_prefix(cond, batch=batch)
        return torch.cat([prefix, self.condition_prefix(None, batch=batch)]) if guided else prefix

    # ------------------------------------------------------------------ pieces of the forward pass
    def embed_codes(self, codes: torch.Tensor, cache: Optional[dict] = None) -> torch.Tensor:
        """(B, T, k) -> (B, T, D): the sum of the k sub-code embeddings of each position ("embedding"), or the
        projected code vectors ("codebook"; causal: position t depends on positions <= t only). cache: the causal
        projection's keys and values of the positions before `codes` (decoding; `ProjectionAttention.forward`)."""
        if self.config.image_input == "embedding":
            return self.code_embed(codes + self.code_offsets).sum(-2)
        return self.projector(self.post_quant_proj(code_vectors(self.codebooks, codes, self.config.latent_dim), cache))

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

    def _spatial_inputs(self, prefix: torch.Tensor, codes: torch.Tensor,
                        projection_cache: Optional[dict] = None) -> torch.Tensor:
        """prefix (B, P, D), codes (B, T, k) of positions 0..T-1 (T < N) -> sequence (B, P + T, D) whose slot
        P-1+t carries pos(t): the last slot asks for position T. projection_cache: see `embed_codes`."""
        P, T = prefix.shape[1], codes.shape[1]
        seq = (torch.cat([prefix, self.embed_codes(codes, projection_cache) + self.position_condition(prefix)], 1)
               if T else prefix)
        pos = torch.cat([seq.new_zeros(P - 1, seq.shape[-1]), self.pos_embed(0, T + 1)])
        return seq + pos

    def depth_logits(self, h: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced head. h (M, D) spatial states, codes (M, k) -> logits (M, k, K)."""
        return self.classifier(h) if self.config.head == "parallel" else depth_head_logits(self, h, codes)

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
    def _draw_position(self, h: torch.Tensor, u: torch.Tensor, guided: bool, use_cache: bool, **sampling):
        """Draw the k sub-codes of one position from spatial states h (B, or 2B with `guided`: the unconditional
        branch second), u (B, k) -> codes, probs, entropy (B, k): `unitok.transformer.sampling.sample_position`."""
        if self.config.head == "parallel":  # sub-codes independent given h
            logits = self.classifier(h)
            return sample_position(lambda i, drawn: logits[:, i], u, guided, **sampling)
        return sample_position(depth_head_steps(self, h, guided, use_cache), u, guided, **sampling)

    @torch.no_grad()
    def sample_steps(self, cond=None, num: Optional[int] = None, temperature: float = 1.0, top_k: int = 0,
                     top_p: float = 1.0, cfg_scale: float = 1.0, seed: int = 0, codes: Optional[torch.Tensor] = None,
                     first_n: int = 0, use_cache: bool = True) -> Iterator[PositionStep]:
        """Sample position by position, yielding a PositionStep after each; fills `codes` in place.

        cond: as for `condition_prefix` (B items; labels (B,) or text states). codes: (B, H, W, k) to write into
        (positions < first_n are kept: completion). Everything else as in `generate`.
        """
        cfg = self.config
        check_sampling(temperature, top_k, top_p, cfg_scale)
        B = int(cond.shape[0]) if cond is not None else int(num)
        N, k = cfg.num_positions, cfg.num_codebooks
        if not 0 <= first_n <= N:
            raise ValueError(f"first_n must lie in [0, {N}] (positions of the {cfg.grid_size}x{cfg.grid_size} "
                             f"grid), got {first_n}")
        if codes is None:
            codes = torch.zeros(B, cfg.grid_size, cfg.grid_size, k, dtype=torch.long, device=self.device)
        flat = codes.view(B, N, k)
        u = seeded_uniforms((B, N, k), seed, self.device)   # every draw's uniform, fixed by the seed
        guided = cond is not None and cfg_scale != 1.0
        prefix = self._guided_prefix(cond, B, guided)
        reps = 2 if guided else 1
        settings = dict(temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale)
        was_training = self.training
        self.eval()
        try:
            everywhere = self.position_condition(prefix)
            cache, projection_cache = (self.spatial.new_cache(), {}) if use_cache else (None, None)   # see embed_codes
            for t in range(first_n, N):
                if not use_cache:
                    h = self.spatial(self._spatial_inputs(prefix, flat[:, :t].repeat(reps, 1, 1)))[:, -1]
                elif t == first_n:   # prefill: the prefix and the kept positions in one pass (filling both caches)
                    x = self._spatial_inputs(prefix, flat[:, :t].repeat(reps, 1, 1), projection_cache)
                    h = self.spatial(x, cache)[:, -1]
                else:                # one new slot: emb(codes[t-1]) + pos(t), the projection reading its cache
                    x = self.embed_codes(flat[:, t - 1:t].repeat(reps, 1, 1), projection_cache)
                    x = x + self.pos_embed(t, t + 1) + everywhere
                    h = self.spatial(x, cache)[:, -1]
                c, p, e = self._draw_position(h, u[:, t], guided, use_cache, **settings)
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
            texts = item_texts(prompts, labels, self.config.class_names, self.config.num_classes)
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
        default) expects `unitok.generator.codes.blank_plain_codes(tokenizer, images, tokenizer.encode(images))`."""
        self.check_codes(codes)
        out = codes.clone().long().to(self.device)
        cond = self._condition_for(out.shape[0], prompts, labels)
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
        check_sampling(temperature, top_k, top_p, cfg_scale)
        out = codes.clone().long().to(self.device)
        B, t, k = out.shape[0], row * g + col, self.config.num_codebooks
        cond = self._condition_for(B, prompts, labels)
        guided = cond is not None and cfg_scale != 1.0
        prefix = self._guided_prefix(cond, B, guided)
        flat = out.view(B, -1, k)
        was_training = self.training
        self.eval()
        h = self.spatial(self._spatial_inputs(prefix, flat[:, :t].repeat(2 if guided else 1, 1, 1)))[:, -1]
        u = seeded_uniforms((B, k), seed, self.device)
        settings = dict(temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale)
        flat[:, t] = self._draw_position(h, u, guided, True, **settings)[0]
        self.train(was_training)
        return out

    @torch.no_grad()
    def position_maps(self, codes: torch.Tensor, prompts=None, labels=None) -> dict:
        """Teacher-forced per-position maps (B, H, W) in bits: "nll" of the given codes and "entropy", the sum over
        the k sub-codes of each sub-code distribution's entropy given the sub-codes before it."""
        self.check_codes(codes)
        cond = self._condition_for(codes.shape[0], prompts, labels)
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
        directory = save_weights(self, directory, dtype)
        write_config(directory, {"generator": dataclasses.asdict(self.config)}, self.tokenizer, tokenizer_path, extra)
        return directory

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike], tokenizer=None,
                        map_location: str = "cpu") -> "TokenGenerator":
        """Load what `save_pretrained` wrote; without `tokenizer`, load the one its config.json points at."""
        from safetensors.torch import load_file

        directory = Path(directory)
        require_files(directory, ("config.json", "model.safetensors"),
                      "TokenGenerator.save_pretrained (or `unitok train-generator`)")
        meta = json.loads((directory / "config.json").read_text())
        config = GeneratorConfig.from_saved(meta["generator"])
        if tokenizer is None:
            tokenizer = linked_tokenizer(directory, meta, map_location)
        model = cls(config)
        load_state_dict_checked(model, load_file(str(directory / "model.safetensors"), device="cpu"))
        model = model.to(map_location)
        model.sampling = dict(meta.get("sampling", {}))   # the settings its trainer recommends (may be empty)
        if tokenizer is not None:
            model.attach_tokenizer(tokenizer)
            warn_if_tokenizer_changed(meta, tokenizer, directory, "samples may be meaningless")
        return model.eval()
