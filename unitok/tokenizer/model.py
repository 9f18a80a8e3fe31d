"""UniTok: one tokenizer, two heads.

    images (B, 3, S, S) in [-1, 1]
      -> encoder (ViT from timm blocks, or a timm model such as ViTamin)      (B, N, width)
      -> quant_proj (AttnProjection down)                                     (B, N, latent_dim)
      -> quantizer (multi-codebook: k chunks, k codebooks)                    codes (B, N, k), z_q (B, N, latent_dim)
      -> post_quant_proj (AttnProjection up)                                  (B, N, width)
      -> decoder (ViT blocks + pixel head)       -> reconstruction            (B, 3, S, S)
      -> mean over tokens, LayerNorm, Linear     -> image feature             (B, embed_dim), unit norm
    captions -> open_clip text transformer       -> text feature              (B, embed_dim), unit norm

    >>> model = UniTok(get_preset("tiny").model)
    >>> codes = model.encode(images)          # (B, 8, 8, 8)  grid rows, grid cols, sub-codebooks
    >>> model.decode(codes).shape             # (B, 3, 32, 32)
    >>> model.encode_text(["a red circle"])   # (1, 64)

Module names follow the reference's state-dict prefixes (encoder, quant_proj, quantizer, post_quant_proj, decoder,
text_encoder, fc_norm, projection, logit_scale). The default blocks are a compact toy layout; the released
checkpoint's own layout (ViTamin encoder, convolutional decoder, its projections) is the config choice
`encoder="vitamin_large", decoder="vitamin", projection="attn_reference"` (`unitok.tokenizer.vitamin`), and
`unitok.tokenizer.reference.load_reference` loads that checkpoint into it (the reference file builds on this one,
never the other way round).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import GluMlp, Mlp, PatchEmbed, trunc_normal_
from timm.models.vision_transformer import Block

from ..checkpoint import atomic_write, load_state_dict_checked, read_safetensors
from .config import ModelConfig, from_dict, get_preset
from .projection import build_projection
from .quantizer import QuantizerOutput
from .quantizers import build_quantizer

Texts = Union[Sequence[str], torch.Tensor]
TOKEN_CACHE_SIZE = 1 << 17   # distinct captions kept tokenized (24 ids each: about 25 MB at most)


@dataclass
class UniTokOutput:
    reconstruction: torch.Tensor            # (B, 3, S, S)
    codes: torch.Tensor                     # (B, H, W, k) int64
    vq_loss: torch.Tensor                   # ()
    code_counts: torch.Tensor               # (k, K) int64, this batch
    image_features: torch.Tensor            # (B, E) unit norm
    text_features: Optional[torch.Tensor]   # (B, E) unit norm, or None without texts
    logit_scale: torch.Tensor               # () the multiplier exp(clamped logit_scale)
    entropy_loss: Optional[torch.Tensor] = None


def _mlp_layer(kind: str):
    # "geglu": timm's GluMlp splits fc1 into value and GELU gate (ViTamin's MLP); "gelu": the classic ViT MLP.
    return partial(GluMlp, act_layer=nn.GELU) if kind == "geglu" else Mlp


def _blocks(cfg: ModelConfig, depth: int) -> nn.Sequential:
    return nn.Sequential(*[
        Block(cfg.width, cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True, mlp_layer=_mlp_layer(cfg.mlp))
        for _ in range(depth)
    ])


class ViTEncoder(nn.Module):
    """Patch embedding + learned positions + timm transformer blocks: (B, C, S, S) -> (B, N, width)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.patch_embed = PatchEmbed(cfg.image_size, cfg.patch_size, cfg.in_chans, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.width))
        self.blocks = _blocks(cfg, cfg.encoder_depth)
        self.norm = nn.LayerNorm(cfg.width)
        trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.patch_embed(images) + self.pos_embed))


class TimmEncoder(nn.Module):
    """Any timm ViT-like model whose `forward_features` gives (B, N, width) tokens, e.g. ViTamin (the reference)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        import timm

        self.model = timm.create_model(cfg.encoder, pretrained=False, num_classes=0, img_size=cfg.image_size)
        width = getattr(self.model, "embed_dim", None) or getattr(self.model, "num_features")
        if width != cfg.width:
            raise ValueError(f"encoder {cfg.encoder!r} has width {width} but the config says width={cfg.width}")
        self.num_prefix_tokens = getattr(self.model, "num_prefix_tokens", 0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(images)[:, self.num_prefix_tokens:]


class ViTDecoder(nn.Module):
    """(B, N, width) -> (B, C, S, S): learned positions, timm blocks, then a per-token linear pixel head.

    The head maps each token to its patch_size x patch_size x C pixels (a 1x1 conv + pixel shuffle), the
    cheapest upsampling that keeps every token responsible for exactly its own patch.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.grid, self.patch, self.chans = cfg.grid_size, cfg.patch_size, cfg.in_chans
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.width))
        self.blocks = _blocks(cfg, cfg.decoder_depth)
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.patch_size ** 2 * cfg.in_chans)
        trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.head(self.norm(self.blocks(tokens + self.pos_embed)))          # (B, N, p*p*C)
        B, g, p, c = x.shape[0], self.grid, self.patch, self.chans
        return x.view(B, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(B, c, g * p, g * p)


def _projection(cfg: ModelConfig, in_dim: int, out_dim: int) -> nn.Module:
    """The projection around the quantizer: "attn" / "linear" (unitok.tokenizer.projection) or the released layout."""
    if cfg.projection == "attn_reference":
        from .vitamin import ReferenceAttnProjection

        return ReferenceAttnProjection(in_dim, out_dim, cfg.projection_causal)
    return build_projection(cfg.projection, in_dim, out_dim, cfg.projection_causal)


def _init_weights(module: nn.Module) -> None:
    """The reference's init for decoder and projections: trunc-normal(0.02) linears, zero biases."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class UniTok(nn.Module):
    """The unified tokenizer. See the module docstring for the data flow and shapes."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        from open_clip.transformer import TextTransformer

        config.validate()
        self.config = cfg = config
        from . import vitamin

        self.encoder = (ViTEncoder(cfg) if cfg.encoder == "vit" else vitamin.ViTaminEncoder(cfg)
                        if cfg.encoder in vitamin.VITAMIN_ENCODERS else TimmEncoder(cfg))
        self.quant_proj = _projection(cfg, cfg.width, cfg.latent_dim)
        self.quantizer = build_quantizer(cfg)   # MCQ, or a contender of unitok.tokenizer.quantizers
        self.post_quant_proj = _projection(cfg, cfg.latent_dim, cfg.width)
        self.decoder = vitamin.ViTaminDecoder(cfg) if cfg.decoder == "vitamin" else ViTDecoder(cfg)
        if cfg.image_head_depth:  # absent at depth 0, so the reference's state dict is unchanged
            # The pooled feature is a mean over tokens; blocks before the mean let the tokens of one object agree on
            # what it is (a mean of local patches is a bag of edges, which separates shapes poorly).
            self.image_blocks = _blocks(cfg, cfg.image_head_depth)
        self.fc_norm = nn.LayerNorm(cfg.width, eps=cfg.fc_norm_eps)
        self.projection = nn.Linear(cfg.width, cfg.embed_dim)
        self.text_encoder = TextTransformer(context_length=cfg.context_length, vocab_size=cfg.vocab_size,
                                            width=cfg.text_width, heads=cfg.text_heads, layers=cfg.text_layers,
                                            output_dim=cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
        for part in (self.quant_proj, self.post_quant_proj, self.decoder, self.fc_norm, self.projection,
                     getattr(self, "image_blocks", nn.Identity())):
            part.apply(_init_weights)
        if isinstance(self.encoder, ViTEncoder):
            self.encoder.blocks.apply(_init_weights)
        self._tokenizer = None
        self._token_rows: Dict[str, torch.Tensor] = {}   # caption -> its ids: see `tokenize`

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "UniTok":
        return cls(dataclasses.replace(get_preset(name).model, **overrides))

    @property
    def last_decoder_layer(self) -> nn.Parameter:
        """The decoder's last weight: where the adaptive GAN weight compares gradient norms."""
        last = getattr(self.decoder, "last_layer", None)
        return last if last is not None else self.decoder.head.weight

    # ------------------------------------------------------------------ input checks
    def check_images(self, images: torch.Tensor) -> torch.Tensor:
        """Shape, dtype, finiteness and range of an image batch; returns it in the model's float dtype.

        float64/float16/bfloat16 batches are converted (a copy); integer batches, values outside [-1, 1] (with a
        hint when they look like 0-255 pixels) and NaN/Inf are refused with a ValueError saying what was expected.
        """
        self._check_image_shape(images)
        images = images.to(self.logit_scale.dtype)
        if images.device.type == "meta":
            return images
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN or Inf values; expected finite values in [-1, 1]")
        low, high = float(images.min()), float(images.max())
        if low < -1.001 or high > 1.001:
            hint = ("looks like 0-255 pixel values: use images / 127.5 - 1" if low >= 0 and high > 2 else
                    "rescale them to [-1, 1], e.g. images * 2 - 1 for values in [0, 1]")
            raise ValueError(f"images must lie in [-1, 1]; got values in [{low:.3g}, {high:.3g}] ({hint})")
        return images

    def _check_image_shape(self, images: torch.Tensor) -> None:
        cfg = self.config
        expected = f"(B, {cfg.in_chans}, {cfg.image_size}, {cfg.image_size}) float images in [-1, 1]"
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            dtype = getattr(images, "dtype", "")
            hint = (" (integer pixels: use images.float() / 127.5 - 1)"
                    if isinstance(images, torch.Tensor) and not images.is_complex() and dtype != torch.bool else "")
            raise ValueError(f"expected {expected}, got {type(images).__name__} {dtype}{hint}")
        if images.ndim != 4 or images.shape[1] != cfg.in_chans:
            raise ValueError(f"expected {expected} ({cfg.in_chans} channels), got shape {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise ValueError(f"the image batch is empty (shape {tuple(images.shape)}); expected at least one image")
        h, w = images.shape[-2:]
        if h % cfg.patch_size or w % cfg.patch_size:
            raise ValueError(f"image size {h}x{w} is not divisible by the patch size {cfg.patch_size}; "
                             f"expected {expected}")
        if (h, w) != (cfg.image_size, cfg.image_size):
            raise ValueError(f"expected {expected}, got {h}x{w} images (resize them to {cfg.image_size} px)")

    def check_codes(self, codes: torch.Tensor) -> None:
        cfg = self.config
        if not isinstance(codes, torch.Tensor) or codes.ndim != 4 or codes.shape[1:3] != (cfg.grid_size,) * 2:
            raise ValueError(f"codes must have shape (B, {cfg.grid_size}, {cfg.grid_size}, {cfg.num_codebooks}), "
                             f"got {tuple(getattr(codes, 'shape', ()))}")
        self.quantizer.check_codes(codes)

    # ------------------------------------------------------------------ tokenizer side
    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, S, S) -> continuous latent before quantization (B, N, latent_dim)."""
        return self.quant_proj(self.encoder(images))

    def quantize(self, images: torch.Tensor) -> QuantizerOutput:
        """images -> QuantizerOutput with z_q (B, N, latent_dim) and codes (B, N, k)."""
        return self.quantizer(self.encode_latent(images))

    def _grid(self, codes: torch.Tensor) -> torch.Tensor:
        g = self.config.grid_size
        return codes.view(codes.shape[0], g, g, codes.shape[-1])

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, S, S) in [-1, 1] -> codes (B, H, W, k) int64, row-major over the token grid."""
        images = self.check_images(images)
        return self._grid(self.quantize(images).codes)

    def decode_latent(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantized latent (B, N, latent_dim) -> images (B, C, S, S)."""
        return self.decoder(self.post_quant_proj(z_q))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, H, W, k) -> images (B, C, S, S) in (roughly) [-1, 1]."""
        self.check_codes(codes)
        return self.decode_latent(self.quantizer.lookup(codes.flatten(1, 2)))

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """images -> decode(encode(images)), computed once (bit-identical to the two calls)."""
        images = self.check_images(images)
        codes = self.quantize(images).codes
        return self.decode_latent(self.quantizer.lookup(codes))

    # ------------------------------------------------------------------ CLIP side
    def image_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Up-projected quantized tokens (B, N, width) -> unit-norm image feature (B, E)."""
        if self.config.image_head_depth:
            tokens = self.image_blocks(tokens)
        return F.normalize(self.projection(self.fc_norm(self.pool_tokens(tokens))), dim=-1)

    def pool_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, width) -> (B, width) by the config's `image_pool`. The reference takes the mean; "max" keeps
        the strongest response of each channel wherever it occurs, so a small object is not averaged away by
        the background tokens around it (docs/cpu_recipe.md: on shapes it learns shape several times faster)."""
        if self.config.image_pool == "max":
            # in fp32: the same maximum (exact), and under bf16 autocast the compiled backward then finds the maximum
            # again (in bf16 its mask of "which token was the max" could come out empty: 0 / 0 = NaN gradients)
            return tokens.float().amax(1)
        return tokens.mean(1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images -> (B, E) unit-norm CLIP feature computed from the *quantized* tokens."""
        images = self.check_images(images)
        return self._code_features(self.quantize(images).codes)

    def code_features(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, H, W, k) -> (B, E) unit-norm CLIP feature: what `encode_image` gives for an image with these
        codes, without the decoder. This is how the tokenizer *reads* token grids drawn by a generator."""
        self.check_codes(codes)
        return self._code_features(codes.flatten(1, 2))

    def code_tokens(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, N, k) -> the up-projected quantized tokens (B, N, width): what the decoder, the image head and
        the linear probe read."""
        return self.post_quant_proj(self.quantizer.lookup(codes))

    def _code_features(self, codes: torch.Tensor) -> torch.Tensor:   # codes (B, N, k)
        return self.image_head(self.code_tokens(codes))

    @property
    def tokenizer(self):
        """open_clip's CLIP BPE tokenizer (ships in its wheel, works offline) at this model's context length."""
        if self._tokenizer is None:
            from open_clip.tokenizer import SimpleTokenizer

            self._tokenizer = SimpleTokenizer(context_length=self.config.context_length)
        return self._tokenizer

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """list of B strings -> token ids (B, context_length) int64 (long captions are truncated)."""
        if isinstance(texts, str):
            texts = [texts]
        if not len(texts) or any(not isinstance(t, str) or not t.strip() for t in texts):
            raise ValueError("expected a non-empty list of non-empty caption strings, got "
                             f"{[t for t in texts if not isinstance(t, str) or not t.strip()][:3] or 'an empty list'}")
        # BPE with its text clean-up costs ~0.1 ms a caption, 4 % of a tiny training step; a dataset repeats its
        # captions every epoch, so each distinct one is tokenized once (the cache is bounded, and emptied when full)
        missing = [t for t in dict.fromkeys(texts) if t not in self._token_rows]
        if missing:
            if len(self._token_rows) + len(missing) > TOKEN_CACHE_SIZE:
                self._token_rows.clear()
            self._token_rows.update(zip(missing, self.tokenizer(missing)))
        return torch.stack([self._token_rows[t] for t in texts])

    def encode_text(self, texts: Texts) -> torch.Tensor:
        """Captions (list of str) or token ids (B, context_length) -> (B, E) unit-norm text feature."""
        cfg = self.config
        ids = texts if isinstance(texts, torch.Tensor) else self.tokenize(texts)
        if ids.ndim != 2 or ids.shape[1] != cfg.context_length or ids.dtype.is_floating_point:
            raise ValueError(f"token ids must be an integer tensor (B, {cfg.context_length}), got "
                             f"{ids.dtype} {tuple(ids.shape)}")
        device = self.logit_scale.device
        # (the range check reads the ids back to the host: a compiled training forward, whose ids come from
        # `tokenize`, skips it rather than break its graph at every step)
        if (not torch.compiler.is_compiling() and ids.device.type != "meta" and ids.numel()
                and (int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size)):
            raise ValueError(f"token ids must lie in [0, {cfg.vocab_size})")
        return F.normalize(self.text_encoder(ids.to(device)), dim=-1)

    # ------------------------------------------------------------------ training forward
    def forward(self, images: torch.Tensor, texts: Optional[Texts] = None) -> UniTokOutput:
        """Everything the losses need, from one pass: reconstruction, VQ loss, codes and both CLIP features.

        The reconstruction and the image feature use the straight-through z_q, so gradients reach the encoder.
        Shapes are checked (free); values are not (that would cost a host sync per step; the trainer checks losses).
        """
        self._check_image_shape(images)
        q = self.quantize(images.to(self.logit_scale.dtype))
        tokens = self.post_quant_proj(q.z_q)
        text_features = self.encode_text(texts) if texts is not None else None
        return UniTokOutput(
            reconstruction=self.decoder(tokens),
            codes=self._grid(q.codes),
            vq_loss=q.loss,
            code_counts=q.counts,
            image_features=self.image_head(tokens),
            text_features=text_features,
            logit_scale=self.logit_scale.clamp(max=self.config.logit_scale_max).exp(),
            entropy_loss=q.entropy_loss,
        )

    # ------------------------------------------------------------------ bookkeeping
    def num_parameters(self, by_part: bool = False):
        """Total parameter count, or a dict per top-level part."""
        parts = {name: sum(p.numel() for p in child.parameters()) for name, child in self.named_children()}
        parts["logit_scale"] = 1
        return parts if by_part else sum(parts.values())

    def save_pretrained(self, directory: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None) -> Path:
        """Write `config.json` + `model.safetensors` into `directory` (each atomically: temp file, then rename).

        dtype: optionally store floating tensors in a smaller type (e.g. torch.float16 for a bundled checkpoint).
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu", dtype if dtype is not None and v.is_floating_point() else v.dtype)
                 .contiguous() for k, v in self.state_dict().items()}
        atomic_write(directory / "model.safetensors", lambda path: save_file(state, path, metadata={"format": "pt"}))
        config_text = json.dumps(dataclasses.asdict(self.config), indent=2)
        atomic_write(directory / "config.json", lambda path: Path(path).write_text(config_text))
        return directory

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike], map_location: str = "cpu") -> "UniTok":
        """Load what `save_pretrained` wrote. Nothing is unpickled (JSON + safetensors)."""
        directory = Path(directory)
        for name in ("config.json", "model.safetensors"):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} not found; expected a folder written by save_pretrained")
        config_path = directory / "config.json"
        try:
            values = json.loads(config_path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{config_path} is not valid JSON ({e}); expected the config written by "
                             f"save_pretrained") from None
        config = from_dict(ModelConfig, values, what=str(config_path))
        check_fits_in_memory(cls, config, str(config_path))
        model = cls(config)
        load_state_dict_checked(model, read_safetensors(directory / "model.safetensors", device=map_location))
        return model.to(map_location)


def check_fits_in_memory(model_cls, config: ModelConfig, what: str, fraction: float = 0.8) -> int:
    """Count the parameters of `model_cls(config)` on the meta device (no memory) and refuse a model whose fp32
    weights would take more than `fraction` of this machine's RAM: a typo such as width=1000000 in a config.json
    must be an error, not a frozen machine. Returns the parameter count."""
    with torch.device("meta"):
        params = model_cls(config).num_parameters()
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not available on this platform: do not guess
        return params
    if params * 4 > fraction * ram:
        raise ValueError(f"{what} describes a model of {params / 1e9:.1f} G parameters ({params * 4 / 2**30:.0f} GiB "
                         f"in fp32), more than this machine's {ram / 2**30:.0f} GiB of memory can hold; check its sizes")
    return params
