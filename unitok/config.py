"""Configurations: one printable dataclass for the model, one for training, and named presets.

    >>> from unitok import get_preset
    >>> print(get_preset("tiny").model)      # every field, nothing hidden

Presets:
    tiny   32 px, 8x8 tokens, ~2 M parameters without the text embedding table: trains in minutes on a laptop CPU.
    small  64 px, 8x8 tokens (patch 8), a little wider: a short GPU run or a patient CPU.
    base  256 px, 16x16 tokens (patch 16), the reference latent (64-d, 8 x 4096) on a mid-size ViT.
    paper the reference's dimensions: ViTamin-L encoder (width 1024, 31 blocks), 31-block decoder, 64-d latent,
          8 x 4096 codes, text tower width 768 x 12 layers.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class ModelConfig:
    # images and patches
    image_size: int = 32
    patch_size: int = 4
    in_chans: int = 3
    # encoder / decoder transformers (same width; the decoder has fresh weights)
    encoder: str = "vit"              # "vit" (patch embedding + timm blocks) or a timm model name, e.g. "vitamin_large_256"
    width: int = 128
    encoder_depth: int = 4
    decoder_depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    mlp: str = "gelu"                 # "gelu" (timm Mlp) or "geglu" (timm GluMlp with GELU, as in ViTamin)
    # projection around the quantizer
    projection: str = "attn"          # "attn" (AttnProjection) or "linear"
    projection_causal: bool = False   # an early reference release used causal attention
    # multi-codebook quantizer
    latent_dim: int = 32
    num_codebooks: int = 8
    codebook_size: int = 256
    beta: float = 0.25
    entropy_weight: float = 0.0       # the reference has the term but trains with weight 0
    entropy_temperature: float = 0.01
    dead_code_restart_every: int = 0  # 0 = off (as in the reference); N = restart unused codes every N steps
    # CLIP heads
    embed_dim: int = 64               # shared image/text embedding size
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    context_length: int = 24
    vocab_size: int = 49408           # CLIP BPE vocabulary (open_clip's tokenizer ships it)
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = math.log(100.0)
    # loss weights (the reference's)
    l1_weight: float = 0.2
    l2_weight: float = 1.0
    vq_weight: float = 1.0
    clip_weight: float = 1.0

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        problems = []
        if self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} must be divisible by patch_size {self.patch_size}")
        if self.latent_dim % self.num_codebooks:
            problems.append(f"latent_dim {self.latent_dim} must be divisible by num_codebooks {self.num_codebooks}")
        if self.width % self.num_heads:
            problems.append(f"width {self.width} must be divisible by num_heads {self.num_heads}")
        if self.projection == "attn" and max(self.width, self.latent_dim) % min(self.width, self.latent_dim):
            problems.append(f"attn projection needs width {self.width} to be a multiple of latent_dim {self.latent_dim}")
        if self.projection not in ("attn", "linear"):
            problems.append(f"projection must be 'attn' or 'linear', got {self.projection!r}")
        if self.mlp not in ("gelu", "geglu"):
            problems.append(f"mlp must be 'gelu' or 'geglu', got {self.mlp!r}")
        if self.text_width % self.text_heads:
            problems.append(f"text_width {self.text_width} must be divisible by text_heads {self.text_heads}")
        if self.codebook_size < 1 or self.num_codebooks < 1:
            problems.append("codebook_size and num_codebooks must be positive")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    @property
    def grid_size(self) -> int:
        """Tokens per side: the code grid is (grid_size, grid_size, num_codebooks)."""
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size ** 2


@dataclass
class TrainConfig:
    batch_size: int = 64
    steps: int = 1500
    lr: float = 5e-4                  # the reference's; 1e-3 and 2e-3 were measurably worse on the tiny preset
    betas: tuple = (0.9, 0.95)        # the reference's
    weight_decay: float = 0.02        # applied to codebooks too, as in the reference
    eps: float = 1e-6
    warmup_fraction: float = 0.01     # 1 % linear warm-up ...
    min_lr_ratio: float = 0.1         # ... then cosine down to 0.1 x lr
    grad_clip: float = 10.0
    seed: int = 0
    eval_every: int = 500
    eval_images: int = 1024
    checkpoint_every: int = 250
    log_every: int = 10
    device: str = "auto"              # "auto" picks cuda when available
    amp: bool = True                  # bf16 autocast + TF32 on CUDA; CPU always runs fp32
    compile: bool = False             # torch.compile, opt-in
    num_workers: int = 0


@dataclass
class Preset:
    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)


def _tiny() -> Preset:
    return Preset(ModelConfig(), TrainConfig())


def _small() -> Preset:
    return Preset(
        ModelConfig(image_size=64, patch_size=8, width=192, encoder_depth=6, decoder_depth=6, num_heads=6,
                    latent_dim=48, num_codebooks=8, codebook_size=1024, embed_dim=128, text_width=128,
                    text_layers=4, text_heads=4, context_length=32),
        TrainConfig(batch_size=64, steps=20_000, lr=1e-3),
    )


def _base() -> Preset:
    return Preset(
        ModelConfig(image_size=256, patch_size=16, width=512, encoder_depth=8, decoder_depth=8, num_heads=8,
                    mlp="geglu", latent_dim=64, num_codebooks=8, codebook_size=4096, embed_dim=512,
                    text_width=512, text_layers=8, text_heads=8, context_length=77),
        TrainConfig(batch_size=64, steps=100_000, lr=5e-4),
    )


def _paper() -> Preset:
    # The reference: ViTamin-L encoder (conv stem, 16x down, 31 blocks of width 1024, GeGLU, no positional
    # embedding), a 31-block decoder, 64-d latent in 8 x 8-d chunks with 4096 codes each, text tower 768 x 12.
    return Preset(
        ModelConfig(image_size=256, patch_size=16, encoder="vitamin_large_256", width=1024, encoder_depth=31,
                    decoder_depth=31, num_heads=16, mlp="geglu", latent_dim=64, num_codebooks=8,
                    codebook_size=4096, embed_dim=768, text_width=768, text_layers=12, text_heads=12,
                    context_length=77),
        TrainConfig(batch_size=64, steps=20_000_000, lr=5e-4, weight_decay=0.02),
    )


PRESETS = {"tiny": _tiny, "small": _small, "base": _base, "paper": _paper}


def get_preset(name: str) -> Preset:
    """A fresh copy of a named preset (mutating it never changes the registry)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]()


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, values: dict):
    """Build `cls` from a dict, refusing unknown keys (a typo must not silently fall back to a default)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; expected a subset of {sorted(known)}")
    values = dict(values)
    if cls is TrainConfig and "betas" in values:
        values["betas"] = tuple(values["betas"])
    return cls(**values)


def apply_overrides(preset: Preset, overrides: list[str] | dict[str, Any]) -> Preset:
    """Apply `key=value` overrides, e.g. ["model.num_codebooks=1", "train.steps=200", "lr=1e-3"].

    A bare key is looked up in the model config first, then the training config. Values are parsed as JSON
    when possible (numbers, booleans, lists), otherwise kept as strings.
    """
    items = overrides.items() if isinstance(overrides, dict) else (_split_override(o) for o in overrides)
    model, train = to_dict(preset.model), to_dict(preset.train)
    types = {**{f.name: f.type for f in fields(ModelConfig)}, **{f.name: f.type for f in fields(TrainConfig)}}
    for key, value in items:
        section, _, name = key.rpartition(".")
        if section in ("model", "") and name in model:
            model[name] = _coerce(key, value, types[name], model[name])
        elif section in ("train", "") and name in train:
            train[name] = _coerce(key, value, types[name], train[name])
        else:
            raise ValueError(f"unknown setting {key!r}; model keys: {sorted(model)}; train keys: {sorted(train)}")
    return Preset(from_dict(ModelConfig, model), from_dict(TrainConfig, train))


def _coerce(key: str, value: Any, type_name: Any, current: Any) -> Any:
    """Parse an override to its field's type: "False" -> False, "1e3" -> 1000 for an int field only if integral."""
    type_name = type_name if isinstance(type_name, str) else getattr(type_name, "__name__", str(type_name))
    text = value.strip() if isinstance(value, str) else value
    try:
        if type_name == "bool":
            if isinstance(text, bool):
                return text
            lowered = str(text).lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if type_name == "int":
            number = float(text)
            if not number.is_integer():
                raise ValueError
            return int(number)
        if type_name == "float":
            return float(text)
        if type_name == "tuple":
            parsed = json.loads(text) if isinstance(text, str) else text
            return tuple(float(v) for v in parsed)
        return str(text)
    except (ValueError, TypeError, json.JSONDecodeError):
        raise ValueError(f"setting {key!r} expects a {type_name} (currently {current!r}), got {value!r}") from None


def _split_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key=value")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()
