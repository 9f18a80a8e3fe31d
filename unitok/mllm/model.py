"""A miniature unified multimodal model: one causal transformer that reads *and* writes images as UniTok tokens.

Three tasks share one model, one vocabulary of text tokens, one image-token interface and one next-token loss:
text-to-image (t2i), captioning (i2t) and visual question answering (vqa), each a sequence laid out by
`unitok.mllm.sequence` (special tokens, left-padded prompts, fixed image slots: one layout per task, so a batch of
prompts is one tensor and KV-cached decoding needs no attention masks).

Pieces (docs/mllm.md):
- text: `unitok.mllm.text.TextTokenizer`, a byte-level BPE trained on the dataset's captions and questions;
- image in, `image_input`:
    "codebook"    codes -> the tokenizer's unit-norm codebook vectors (a frozen copy) -> the tokenizer's
                  `post_quant_proj` with *causal* attention (initialised from the tokenizer, trained here) ->
                  projector LayerNorm -> Linear -> GELU -> Linear (the Liquid way, `unitok.transformer.code_input`);
    "embedding"   the sum of k learned sub-code embeddings (the generator's input);
    "continuous"  the tokenizer's pre-quantization features, input only: `continuous_source="latent"` sends the
                  per-chunk normalised latent through the same causal post_quant_proj + projector; "encoder" sends
                  the encoder's full-width tokens straight to the projector (the CLIP-style baseline);
- image out: the generator's depth head (`unitok.transformer.depth_head.DepthHead`: a small causal transformer
  drawing the k sub-codes of a position one after another, one shared classifier), with the shared sampling
  (`unitok.transformer.sampling`: temperature, top-k, top-p, classifier-free guidance, seeded inverse-CDF draws);
- the backbone is the generator's `CausalTransformer` with its `KVCache` (`unitok.transformer.causal`).

Positions: a learned absolute table over sequence slots, plus learned row/column embeddings on image slots, plus a
"next image position" embedding on every slot whose successor is an image token (the generator's convention that a
slot carries the position it predicts). All are added at the input, so the KV cache works unchanged.

    >>> tok = UniTok.from_pretrained("data/tiny-shapes")
    >>> text = TextTokenizer.train(corpus)                       # or TextTokenizer.from_json(...)
    >>> model = UnifiedModel(MLLMConfig.for_tokenizer(tok, text), tok, text)
    >>> out = model(model.build_batch(items))                    # out.loss, out.text_loss, out.image_loss
    >>> model.caption(codes)                                     # ["a large red star in the centre, on ...", ...]
    >>> model.answer(codes, ["what colour is the shape?"])       # ["red"]
    >>> model.generate(prompts=["a red star"], num=4, cfg_scale=3.0)   # (4, H, W, k) codes
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from ..tokenizer.codes import check_codes
from ..tokenizer.projection import build_projection
from ..tokenizer.quantizers import sub_code_dim
from ..checkpoint import atomic_write, load_state_dict_checked
from ..transformer.causal import CausalTransformer
from ..transformer.code_input import code_vectors, image_projector
from ..transformer.depth_head import DepthHead
from ..transformer.folders import linked_tokenizer, require_files, save_weights, warn_if_tokenizer_changed, write_config
from ..transformer.sampling import PositionStep, check_rerank, check_sampling, draw, keep_best_aligned, seeded_uniforms
from . import sequence
from .config import MLLMConfig
from .sequence import SPECIALS
from .text import TextTokenizer


@dataclass
class MLLMOutput:
    loss: torch.Tensor                    # () text_loss + image_loss_weight * image_loss
    text_loss: torch.Tensor               # () mean over text tasks of each task's mean target-token CE (nats)
    image_loss: torch.Tensor              # () mean cross-entropy over target image sub-codes (nats), 0 if none
    text_logits: torch.Tensor             # (B, L, V): slot j predicts token j + 1
    image_logits: Optional[torch.Tensor]  # (B_t2i, N, k, K) for the items with an image target, else None
    text_tokens: int                      # number of target text tokens
    image_subcodes: int                   # number of target image sub-codes


@dataclass
class TextStep:
    """One decoding step of text: the chosen ids (B,), their probabilities (B,), whether each item had finished."""
    index: int
    ids: torch.Tensor
    probs: torch.Tensor
    done: torch.Tensor


class UnifiedModel(nn.Module):
    """One causal transformer over mixed text / image-token sequences. See the module docstring.

    Args:
        config: an MLLMConfig whose grid and codebooks match the tokenizer.
        tokenizer: the frozen UniTok (kept outside this module's parameters; needed to encode pictures, decode
            codes, and — once, at construction — to copy its codebooks and post_quant_proj).
        text: the TextTokenizer (its size must equal config.vocab_size).
    """

    def __init__(self, config: MLLMConfig, tokenizer=None, text: Optional[TextTokenizer] = None):
        super().__init__()
        config.validate()
        self.config = cfg = config
        if text is not None and len(text) != cfg.vocab_size:
            raise ValueError(f"the text tokenizer has {len(text)} ids but config.vocab_size={cfg.vocab_size}")
        self.text = text
        D, k, K, N = cfg.width, cfg.num_codebooks, cfg.codebook_size, cfg.num_positions
        self.text_embed = nn.Embedding(cfg.vocab_size, D)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.max_length, D))
        self.row_embed = nn.Parameter(torch.zeros(cfg.grid_size, D))
        self.col_embed = nn.Parameter(torch.zeros(cfg.grid_size, D))
        self.next_embed = nn.Parameter(torch.zeros(N, D))          # on the slot whose successor is image pos t
        # image input
        if cfg.image_input == "embedding":
            self.code_embed = nn.Embedding(k * K, D)
            self.register_buffer("code_offsets", torch.arange(k) * K, persistent=False)
        else:
            if cfg.image_input == "codebook":   # a frozen copy of the tokenizer's code vectors (k, K, d): codes -> latent
                self.register_buffer("codebooks", torch.zeros(k, K, sub_code_dim(cfg.quantizer, cfg.latent_dim, k)))
            in_dim = cfg.tokenizer_width
            if not (cfg.image_input == "continuous" and cfg.continuous_source == "encoder"):
                self.post_quant_proj = build_projection(cfg.projection, cfg.latent_dim, cfg.tokenizer_width,
                                                        causal=True)
            self.projector = image_projector(in_dim, D)
        self.backbone = CausalTransformer(D, cfg.depth, cfg.num_heads, cfg.mlp_ratio, cfg.dropout)
        self.text_head = nn.Linear(D, cfg.vocab_size)
        if cfg.can_generate:
            self.image_head = DepthHead(D, k, K, cfg.depth_width, cfg.depth_layers, cfg.depth_heads, cfg.mlp_ratio,
                                        cfg.dropout, code_dim=sub_code_dim(cfg.quantizer, cfg.latent_dim, k),
                                        geometry=cfg.code_logits == "codebook")
        self._init_weights()
        self._tokenizer = [None]
        if tokenizer is not None:
            self.attach_tokenizer(tokenizer, copy_weights=True)

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                trunc_normal_(m.weight, std=0.02)
        for p in (self.pos_embed, self.row_embed, self.col_embed, self.next_embed):
            trunc_normal_(p, std=0.02)
        if self.config.can_generate:   # as the generator: every sub-code starts at the uniform ln K loss
            self.image_head.classifier.reset_parameters()

    # ------------------------------------------------------------------ tokenizer
    @property
    def tokenizer(self):
        return self._tokenizer[0]

    def attach_tokenizer(self, tokenizer, copy_weights: bool = False) -> None:
        """Use `tokenizer` to encode pictures and decode codes. copy_weights: initialise the codebook copy and the
        causal post_quant_proj from it (done at construction; a loaded model keeps its own trained copies)."""
        cfg, c = self.config, tokenizer.config
        want = dict(grid_size=c.grid_size, num_codebooks=c.num_codebooks, codebook_size=c.codebook_size,
                    latent_dim=c.latent_dim, tokenizer_width=c.width, quantizer=c.quantizer)
        own = {key: getattr(cfg, key) for key in want}
        if want != own:
            raise ValueError(f"tokenizer does not match the unified model: tokenizer {want}, model {own}")
        self._tokenizer[0] = tokenizer.eval().requires_grad_(False)
        if copy_weights:
            with torch.no_grad():
                books = tokenizer.quantizer.codebook_vectors()
                if hasattr(self, "codebooks"):
                    self.codebooks.copy_(books.to(self.codebooks))
                if cfg.can_generate:
                    self.image_head.classifier.set_codebooks(books)
                if hasattr(self, "post_quant_proj"):
                    self.post_quant_proj.load_state_dict(tokenizer.post_quant_proj.state_dict())
        if hasattr(self, "post_quant_proj"):
            self.post_quant_proj.requires_grad_(cfg.tune_post_quant_proj)

    @property
    def device(self) -> torch.device:
        return self.pos_embed.device

    # ------------------------------------------------------------------ image input
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pictures (B, 3, S, S) in [-1, 1] -> what `embed_image` takes: codes (B, N, k) for the discrete modes,
        continuous features (B, N, F) for "continuous" (pre-quantization latent or encoder tokens)."""
        tok = self.tokenizer
        if tok is None:
            raise ValueError("encoding pictures needs the tokenizer: pass tokenizer= or call attach_tokenizer()")
        images = tok.check_images(images.to(tok.logit_scale.device))
        with torch.no_grad():
            if self.config.image_input != "continuous":
                return tok.encode(images).flatten(1, 2).to(self.device)
            if self.config.continuous_source == "encoder":
                return tok.encoder(images).float().to(self.device)
            return tok.encode_latent(images).float().to(self.device)

    def embed_image(self, image: torch.Tensor, cache: Optional[dict] = None) -> torch.Tensor:
        """(B, T, k) codes or (B, T, F) features of image positions 0..T-1 -> (B, T, D). Causal: output t depends
        only on positions <= t (the projection's attention is causal). cache: the projection's keys and values of
        the positions before these (decoding one position at a time; `ProjectionAttention.forward`)."""
        cfg = self.config
        if cfg.image_input == "embedding":
            return self.code_embed(image.long() + self.code_offsets).sum(-2)
        if cfg.image_input == "codebook":
            return self.projector(self.post_quant_proj(code_vectors(self.codebooks, image, cfg.latent_dim), cache))
        x = image.float()
        if cfg.continuous_source == "encoder":
            return self.projector(x)
        # the quantizer's view of the latent: each chunk normalised to unit length (what its codes approximate)
        x = F.normalize(x.unflatten(-1, (cfg.num_codebooks, -1)), dim=-1).flatten(-2)
        return self.projector(self.post_quant_proj(x))

    def image_pos(self) -> torch.Tensor:
        g = self.config.grid_size
        return (self.row_embed[:, None] + self.col_embed[None]).reshape(g * g, -1)

    # ------------------------------------------------------------------ sequences
    def prompt_tokens(self, task: str, caption: Optional[str] = None, question: Optional[str] = None) -> List[int]:
        """The prompt slots of one sequence (image slots hold <pad> placeholders), up to the first target token
        (`unitok.mllm.sequence.prompt_tokens`)."""
        return sequence.prompt_tokens(self.config, self.text, task, caption, question)

    def build_batch(self, items: Sequence[dict], drop_caption: Optional[Sequence[bool]] = None) -> dict:
        """Training / scoring sequences for a list of items -> a batch dict (`unitok.mllm.sequence.build_batch`)."""
        return sequence.build_batch(self.config, self.text, items, drop_caption)

    def embed_sequence(self, tokens: torch.Tensor, image: torch.Tensor, image_start: torch.Tensor,
                       offset: int = 0, image_cache: Optional[dict] = None) -> torch.Tensor:
        """tokens (B, T) of slots offset..offset+T-1, image (B, N, ...) -> input embeddings (B, T, D). image_cache
        (decoding; a dict kept across calls): positions embedded before are not embedded again, the causal
        projection reads their keys and values from it (each drawn position is embedded once, not the prefix)."""
        cfg = self.config
        B, T = tokens.shape
        N = cfg.num_positions
        x = self.text_embed(tokens) + self.pos_embed[offset:offset + T]
        slots = torch.arange(offset, offset + T, device=tokens.device)
        rel = slots[None] - image_start[:, None]                          # (B, T) image position of each slot
        is_img = (rel >= 0) & (rel < N)
        if is_img.any() and image is not None:
            n_img = int(rel.clamp(max=N - 1).max()) + 1   # image positions needed: 0..n_img-1 (causal embedding)
            first = 0 if image_cache is None else image_cache.get("positions", 0)   # embedded by earlier calls
            if first and int(rel[is_img].min()) < first:
                raise ValueError(f"image positions before {first} are cached, not embedded again: decode in order")
            emb = self.embed_image(image[:, first:n_img], image_cache) + self.image_pos()[first:n_img]
            if image_cache is not None:
                image_cache["positions"] = n_img
            index = (rel - first).clamp(0, n_img - first - 1)
            gathered = emb.gather(1, index[..., None].expand(-1, -1, emb.shape[-1]))
            x = torch.where(is_img[..., None], gathered, x)
        nxt = rel + 1                                                     # slot whose successor is image pos nxt
        has_next = (nxt >= 0) & (nxt < N)
        if has_next.any():
            # F.embedding, not next_embed[index]: the backward of advanced indexing accumulates in an order that
            # varies from run to run on a multi-core CPU; the embedding's backward is repeatable
            nxt_embed = F.embedding(nxt.clamp(0, N - 1), self.next_embed)
            x = x + torch.where(has_next[..., None], nxt_embed, x.new_zeros(()))
        return x

    def forward(self, batch: dict) -> MLLMOutput:
        """Teacher-forced pass over a `build_batch` batch -> MLLMOutput (one next-token loss on the targets)."""
        cfg = self.config
        dev = self.device
        tokens, targets = batch["tokens"].to(dev), batch["text_targets"].to(dev)
        image, start, is_t2i = batch["image"].to(dev), batch["image_start"].to(dev), batch["image_target"].to(dev)
        sequence.check_image(self.config, image)
        h = self.backbone(self.embed_sequence(tokens, image, start))     # (B, L, D)
        logits = self.text_head(h)
        mask = targets != -100
        n_text = int(mask.sum())
        text_loss = logits.new_zeros(())
        if n_text:
            # each text task weighs the same, whatever its length: a caption has ~15 target tokens, an answer ~2;
            # a mean over all tokens would leave the answers a tenth of the gradient
            ce = F.cross_entropy(logits.float()[mask], targets[mask], reduction="none")           # (n_text,)
            task = batch.get("task")
            if task is None:
                text_loss = ce.mean()
            else:
                per_token_task = task.to(dev)[:, None].expand_as(targets)[mask]
                means = [ce[per_token_task == t].mean() for t in per_token_task.unique()]
                text_loss = torch.stack(means).mean()
        image_logits, image_loss, n_sub = None, logits.new_zeros(()), 0
        if cfg.can_generate and bool(is_t2i.any()):
            N, k, K = cfg.num_positions, cfg.num_codebooks, cfg.codebook_size
            sel = is_t2i.nonzero()[:, 0]
            slots = start[sel][:, None] - 1 + torch.arange(N, device=dev)          # slot predicting position t
            hs = h[sel].gather(1, slots[..., None].expand(-1, -1, h.shape[-1]))    # (b, N, D)
            codes = image[sel].long()
            image_logits = self.image_head.depth_logits(hs.reshape(-1, hs.shape[-1]), codes.reshape(-1, k))
            image_logits = image_logits.view(len(sel), N, k, K)
            image_loss = F.cross_entropy(image_logits.float().reshape(-1, K), codes.reshape(-1))
            n_sub = codes.numel()
        loss = text_loss + cfg.image_loss_weight * image_loss
        return MLLMOutput(loss, text_loss, image_loss, logits, image_logits, n_text, n_sub)

    # ------------------------------------------------------------------ reading: captions and answers
    def _as_image(self, image) -> torch.Tensor:
        """Codes (B, H, W, k) / (B, N, k), features (B, N, F) or pictures (B, 3, S, S) -> the model's image input."""
        if not isinstance(image, torch.Tensor):
            raise ValueError(f"expected a tensor of codes, features or pictures, got {type(image).__name__}")
        if image.ndim == 4 and image.is_floating_point() and image.shape[1] == 3:
            return self.image_features(image)
        if image.ndim == 4:
            image = image.flatten(1, 2)
        sequence.check_image(self.config, image)
        if not image.is_floating_point():
            check_codes(image, self.config.codebook_size, self.config.num_codebooks)
        return image.to(self.device)

    @torch.no_grad()
    def text_steps(self, task: str, image, questions: Optional[Sequence[str]] = None, max_new_tokens: int = None,
                   temperature: float = 0.0, seed: int = 0, use_cache: bool = True) -> Iterator[TextStep]:
        """Decode text after an image (i2t) or an image and a question (vqa), one TextStep per token.

        temperature 0 = greedy. All items share one layout (the prompt is left-padded), so the batch is decoded
        in lock-step; an item that produced <eos> keeps producing <pad> (marked done).
        """
        cfg = self.config
        image = self._as_image(image)
        B = image.shape[0]
        if task == "vqa":
            if isinstance(questions, str):
                questions = [questions] * B
            if questions is None or len(questions) != B:
                raise ValueError(f"expected one question per image ({B}), got "
                                 f"{0 if questions is None else len(questions)}")
            rows = [self.prompt_tokens("vqa", question=q) for q in questions]
        elif task == "i2t":
            rows = [self.prompt_tokens("i2t")] * B
        else:
            raise ValueError(f"text decoding is for 'i2t' or 'vqa', got {task!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        max_new = cfg.target_tokens if max_new_tokens is None else int(max_new_tokens)
        if not 1 <= max_new <= cfg.target_tokens:
            raise ValueError(f"max_new_tokens must lie in [1, {cfg.target_tokens}], got {max_new}")
        tokens = torch.tensor(rows, device=self.device)
        start = torch.full((B,), cfg.image_start(task), device=self.device)
        u = seeded_uniforms((B, max_new), seed, self.device)
        eos, pad = SPECIALS.index("<eos>"), SPECIALS.index("<pad>")
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        was_training = self.training
        self.eval()
        try:
            cache = self.backbone.new_cache() if use_cache else None
            h = self.backbone(self.embed_sequence(tokens, image, start), cache)[:, -1]
            for i in range(max_new):
                logits = self.text_head(h).float()
                logits[:, :len(SPECIALS)] = torch.where(
                    torch.arange(len(SPECIALS), device=self.device) == eos, logits[:, :len(SPECIALS)], -math.inf)
                if temperature == 0:
                    logp = logits.log_softmax(-1)
                    ids = logp.argmax(-1)
                else:
                    logp = (logits / temperature).log_softmax(-1)
                    ids = draw(logp, u[:, i])
                probs = logp.gather(1, ids[:, None])[:, 0].exp()
                ids = torch.where(done, torch.full_like(ids, pad), ids)
                yield TextStep(i, ids, torch.where(done, torch.ones_like(probs), probs), done.clone())
                done = done | (ids == eos)
                tokens = torch.cat([tokens, ids[:, None]], 1)
                if bool(done.all()) or i + 1 == max_new:
                    break
                if use_cache:
                    x = self.embed_sequence(ids[:, None], image, start, offset=tokens.shape[1] - 1)
                    h = self.backbone(x, cache)[:, -1]
                else:
                    h = self.backbone(self.embed_sequence(tokens, image, start))[:, -1]
        finally:
            self.train(was_training)

    @torch.no_grad()
    def read(self, task: str, image, questions=None, with_probs: bool = False, **kw):
        """Decode whole texts: list of strings (or, with_probs, list of [(token text, probability), ...] too)."""
        texts, details = sequence.read_texts(list(self.text_steps(task, image, questions, **kw)), self.text)
        return (texts, details) if with_probs else texts

    def caption(self, image, **kw) -> List[str]:
        """Captions of images (codes (B, H, W, k), features, or pictures (B, 3, S, S) in [-1, 1])."""
        return self.read("i2t", image, **kw)

    def answer(self, image, questions, **kw) -> List[str]:
        """Answers to one question per image (or one question for all)."""
        return self.read("vqa", image, questions, **kw)

    # ------------------------------------------------------------------ writing: images
    @torch.no_grad()
    def image_steps(self, prompts: Sequence[str], num: int = 1, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0, cfg_scale: float = 1.0, seed: int = 0, use_cache: bool = True,
                    codes: Optional[torch.Tensor] = None) -> Iterator[PositionStep]:
        """Draw code grids for prompts position by position (row-major), yielding the generator's PositionStep
        after each; fills `codes` (B, H, W, k) in place (B = len(prompts) * num, item-major).

        cfg_scale: classifier-free guidance against the empty prompt (1 = off). Deterministic for a seed, and the
        KV-cached and recomputing paths draw the same codes.
        """
        cfg = self.config
        if not cfg.can_generate:
            raise ValueError("this model reads images but cannot write them (image_input='continuous')")
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts or [])
        if not prompts:
            raise ValueError("expected at least one prompt, got none")
        if not isinstance(num, int) or isinstance(num, bool) or num < 1:
            raise ValueError(f"num must be an int >= 1 (samples per prompt), got {num!r}")
        head = self.image_head
        check_sampling(temperature, top_k, top_p, cfg_scale)
        rows = [self.prompt_tokens("t2i", p) for p in prompts for _ in range(num)]
        B, N, k = len(rows), cfg.num_positions, cfg.num_codebooks
        guided = cfg_scale != 1.0
        if guided:
            rows = rows + [self.prompt_tokens("t2i", None)] * B
        reps = 2 if guided else 1
        tokens = torch.tensor(rows, device=self.device)
        P = tokens.shape[1]
        start = torch.full((B * reps,), cfg.image_start("t2i"), device=self.device)
        if codes is None:
            codes = torch.zeros(B, cfg.grid_size, cfg.grid_size, k, dtype=torch.long, device=self.device)
        flat = codes.view(B, N, k)
        u = seeded_uniforms((B, N, k), seed, self.device)
        settings = dict(temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale)
        was_training = self.training
        self.eval()
        try:
            cache, image_cache = (self.backbone.new_cache(), {}) if use_cache else (None, None)
            h = self.backbone(self.embed_sequence(tokens, None, start), cache)[:, -1]
            for t in range(N):
                c, p, e = head.sample(h, u[:, t], guided, use_cache, **settings)
                flat[:, t] = c
                yield PositionStep(t, c, p, e)
                if t + 1 == N:
                    break
                image = flat[:, :t + 1].repeat(reps, 1, 1)
                if use_cache:   # one new slot: image token t (embedded alone; the projection caches 0..t-1)
                    x = self.embed_sequence(tokens.new_zeros(B * reps, 1), image, start, P + t, image_cache)
                    h = self.backbone(x, cache)[:, -1]
                else:
                    seq = torch.cat([tokens, tokens.new_zeros(B * reps, t + 1)], 1)
                    h = self.backbone(self.embed_sequence(seq, image, start))[:, -1]
        finally:
            self.train(was_training)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], num: int = 1, rerank: int = 1, **sampling) -> torch.Tensor:
        """Sample code grids -> (len(prompts) * num, H, W, k) int64. Sampling options as in `image_steps`;
        rerank: best of this many draws per sample by the tokenizer's image-text match (`keep_best_aligned`)."""
        if check_rerank(rerank) > 1:
            texts = [prompts] if isinstance(prompts, str) else list(prompts)
            candidates = self.generate(prompts, num * rerank if isinstance(num, int) else num, **sampling)
            return keep_best_aligned(self.tokenizer, candidates, texts, num)
        cfg = self.config
        n = (1 if isinstance(prompts, str) else len(prompts)) * (num if isinstance(num, int) else 1)
        codes = torch.zeros(max(n, 1), cfg.grid_size, cfg.grid_size, cfg.num_codebooks, dtype=torch.long,
                            device=self.device)
        for _ in self.image_steps(prompts, num, codes=codes, **sampling):
            pass
        return codes

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, H, W, k) -> pictures (B, 3, S, S) in [-1, 1] through the frozen tokenizer's decoder."""
        if self.tokenizer is None:
            raise ValueError("decoding needs the tokenizer: pass tokenizer= or call attach_tokenizer()")
        tok = self.tokenizer
        return tok.decode(codes.to(tok.logit_scale.device)).float().clamp(-1, 1)

    # ------------------------------------------------------------------ saving and loading
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, directory: Union[str, os.PathLike], tokenizer_path: Optional[str] = None,
                        dtype: Optional[torch.dtype] = None, extra: Optional[dict] = None) -> Path:
        """config.json (MLLMConfig, tokenizer path and weight hash) + text_tokenizer.json + model.safetensors."""
        directory = save_weights(self, directory, dtype)
        atomic_write(directory / "text_tokenizer.json",
                     lambda p: Path(p).write_text(json.dumps(self.text.to_json())))
        write_config(directory, {"mllm": dataclasses.asdict(self.config)}, self.tokenizer, tokenizer_path, extra)
        return directory

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike], tokenizer=None,
                        map_location: str = "cpu") -> "UnifiedModel":
        """Load what `save_pretrained` wrote; without `tokenizer`, load the one its config.json points at."""
        from safetensors.torch import load_file

        directory = Path(directory)
        require_files(directory, ("config.json", "text_tokenizer.json", "model.safetensors"),
                      "UnifiedModel.save_pretrained (or `unitok train-mllm`)")
        try:
            meta = json.loads((directory / "config.json").read_text())
            config = MLLMConfig(**meta["mllm"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{directory / 'config.json'} is not a unified-model config ({e})") from None
        text = TextTokenizer.from_json(json.loads((directory / "text_tokenizer.json").read_text()))
        if tokenizer is None:
            tokenizer = linked_tokenizer(directory, meta, map_location)
        model = cls(config, text=text)
        state = {k: v.float() if v.is_floating_point() else v
                 for k, v in load_file(str(directory / "model.safetensors"), device="cpu").items()}
        load_state_dict_checked(model, state)
        model = model.to(map_location)
        if tokenizer is not None:
            model.attach_tokenizer(tokenizer)
            warn_if_tokenizer_changed(meta, tokenizer, directory, "its answers and pictures may be meaningless")
        model.meta = meta
        return model.eval()
