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

# TrainConfig.cpu_bf16: fp32 on the CPU, bf16 autocast, or bf16 where the CPU multiplies bf16 in hardware (AMX).
# Defined here, with the config it checks; unitok.training.machine, which acts on the choice, imports it.
CPU_BF16_CHOICES = ("off", "on", "auto")


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
    projection: str = "attn"          # "attn" (AttnProjection), "linear", or "attn_reference" (the released layout)
    projection_causal: bool = False   # an early reference release used causal attention
    # the quantizer: "mcq" (multi-codebook, UniTok's) or "rvq", "fsq", "lfq", "simvq" (unitok.tokenizer.quantizers)
    quantizer: str = "mcq"
    fsq_levels: tuple = ()            # fsq only: levels per dimension (their product = codebook_size); () = even
    latent_dim: int = 32
    num_codebooks: int = 8
    codebook_size: int = 256
    beta: float = 0.25
    entropy_weight: float = 0.0       # the reference has the term but trains with weight 0
    entropy_temperature: float = 0.01
    dead_code_restart_every: int = 0  # 0 = off (as in the reference); N = restart unused codes every N steps
    # CLIP heads
    embed_dim: int = 64               # shared image/text embedding size
    image_head_depth: int = 0         # transformer blocks over the quantized tokens before pooling (0: the reference)
    image_pool: str = "mean"          # how the image head pools tokens: "mean" (the reference) or "max"
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
    # A hard negative per image: its own caption with the shape word swapped (datasets that provide
    # "negative_caption", e.g. shapes); the term is a 2-way softmax, caption vs. swapped caption. 0 = off.
    hard_negative_weight: float = 0.0
    # the reference layout (unitok.tokenizer.vitamin): ViTamin encoder, convolutional decoder, the reference's projections
    decoder: str = "vit"              # "vit" (blocks + per-token pixel head) or "vitamin" (blocks + conv upsampling)
    conv_widths: tuple = ()           # ViTamin encoder (stem, stage 1, stage 2) widths; () = the named size's
    conv_depths: tuple = ()           # ViTamin encoder MbConv blocks per stage; () = (2, 4)
    decoder_conv_widths: tuple = ()   # ViTamin decoder (up_conv2, up_conv3) widths; () = the named size's
    decoder_conv_depths: tuple = ()   # ViTamin decoder blocks in up_conv2, up_conv3; () = (4, 2)
    fc_norm_eps: float = 1e-5         # the reference's image head uses 1e-6
    # perceptual and adversarial terms (unitok.training.discriminator); 0 = off
    lpips_weight: float = 0.0         # LPIPS (VGG), needs images >= 48 px
    gan_weight: float = 0.0           # w_g: the GAN term, times the adaptive weight
    gan_start: float = 0.375          # fraction of training before the GAN (and the discriminator) starts
    gan_warmup: float = 0.01          # then a linear ramp of the GAN weight over this fraction of training
    gan_adaptive_scale: float = 0.4   # d_weight = scale * |grad L_nll| / |grad L_gan| on the decoder's last layer
    gan_adaptive_max: float = 1e4     # ... clamped to [0, this]
    disc_cr_weight: float = 4.0       # consistency regularisation of the discriminator

    def __post_init__(self):
        for name in ("conv_widths", "conv_depths", "decoder_conv_widths", "decoder_conv_depths", "fsq_levels"):
            value = getattr(self, name)  # JSON gives lists, overrides give floats: one form, tuples of ints
            if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) and float(v).is_integer()
                                                         for v in value):
                setattr(self, name, tuple(int(v) for v in value))
        self.validate()

    def validate(self) -> None:
        problems = _check_fields(self, positive=(
            "image_size", "patch_size", "in_chans", "width", "num_heads", "latent_dim", "num_codebooks",
            "codebook_size", "embed_dim", "text_width", "text_layers", "text_heads", "context_length", "vocab_size"),
            non_negative=("encoder_depth", "decoder_depth", "image_head_depth", "mlp_ratio", "beta", "entropy_weight",
                          "dead_code_restart_every", "l1_weight", "l2_weight", "vq_weight", "clip_weight",
                          "hard_negative_weight"))
        if problems:  # the divisibility checks below would divide by zero
            raise ValueError(f"invalid {type(self).__name__}: " + "; ".join(problems))
        if self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} must be divisible by patch_size {self.patch_size}")
        if self.latent_dim % self.num_codebooks:
            problems.append(f"latent_dim {self.latent_dim} must be divisible by num_codebooks {self.num_codebooks}")
        if self.width % self.num_heads:
            problems.append(f"width {self.width} must be divisible by num_heads {self.num_heads}")
        if self.projection.startswith("attn") and max(self.width, self.latent_dim) % min(self.width, self.latent_dim):
            problems.append(f"attn projection needs width {self.width} to be a multiple of latent_dim {self.latent_dim}")
        if self.projection not in ("attn", "linear", "attn_reference"):
            problems.append(f"projection must be 'attn' or 'linear' (or 'attn_reference', the released layout), "
                            f"got {self.projection!r}")
        if self.image_pool not in ("mean", "max"):
            problems.append(f"image_pool must be 'mean' or 'max', got {self.image_pool!r}")
        if self.mlp not in ("gelu", "geglu"):
            problems.append(f"mlp must be 'gelu' or 'geglu', got {self.mlp!r}")
        problems += _reference_layout_problems(self)
        from .quantizers import quantizer_problems   # (imports torch: kept out of this module's import)

        problems += quantizer_problems(self)
        if self.text_width % self.text_heads:
            problems.append(f"text_width {self.text_width} must be divisible by text_heads {self.text_heads}")
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
    eval_every: int = 500             # 0 = only the final evaluation
    eval_images: int = 1024
    interim_eval_images: int = 0      # run()'s evaluations before the last step: the first N images (0: eval_images)
    checkpoint_every: int = 250       # 0 = only at the end (and on request)
    log_every: int = 10
    device: str = "auto"              # "auto" picks cuda when available
    amp: bool = True                  # bf16 autocast + TF32 on CUDA
    cpu_bf16: str = "off"             # CPU: "off" (fp32), "on" or "auto" (bf16 autocast where the CPU has AMX)
    compile: bool = False             # torch.compile, opt-in
    num_workers: int = 0
    # discriminator (used when model.gan_weight > 0) and where the loss networks' weights come from
    disc_lr: float = 2e-5
    disc_betas: tuple = (0.5, 0.9)
    disc_weight_decay: float = 0.0
    disc_image_size: int = 224        # images are resized to this for the DINOv2 backbone (a multiple of 14)
    lpips_weights: str = ""           # "" = search the usual places (docs/reference_checkpoint.md); "random" = tests
    dino_weights: str = ""            # same for the DINOv2 ViT-S/14 backbone

    def __post_init__(self):
        self.betas = tuple(self.betas) if isinstance(self.betas, list) else self.betas
        problems = _check_fields(self, positive=("batch_size", "steps", "lr", "eval_images", "log_every"),
                                 non_negative=("eval_every", "interim_eval_images", "checkpoint_every", "weight_decay", "eps", "warmup_fraction", "min_lr_ratio", "grad_clip",
                                               "seed", "num_workers"))
        if not problems and not (isinstance(self.betas, tuple) and len(self.betas) == 2
                                 and all(0 <= b < 1 for b in self.betas)):
            problems.append(f"betas={self.betas!r} is not allowed; expected two numbers in [0, 1)")
        if not problems and self.cpu_bf16 not in CPU_BF16_CHOICES:
            problems.append(f"cpu_bf16={self.cpu_bf16!r} is not allowed; expected 'off', 'on' or 'auto'")
        if not problems and self.warmup_fraction > 1:
            problems.append(f"warmup_fraction={self.warmup_fraction!r} is not allowed; expected a fraction in [0, 1]")
        if problems:
            raise ValueError(f"invalid {type(self).__name__}: " + "; ".join(problems))


@dataclass
class Preset:
    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)


def _tiny() -> Preset:
    # One transformer block in the image head and max pooling: the CLIP feature then reads shapes, not a mean
    # dominated by background tokens (docs/cpu_recipe.md). bf16 autocast where the CPU multiplies bf16 in hardware
    # (AMX or AVX-512 BF16) makes a step about 1.5x faster, so 1600 steps fit the 10-minute CPU budget; evaluations
    # every 400 steps show understanding arrive, the three before the last on 256 images (they count towards the
    # budget too). On a CPU without bf16 hardware the same recipe runs in fp32 (docs/cpu_recipe.md for its time).
    return Preset(ModelConfig(image_head_depth=1, image_pool="max", hard_negative_weight=1.0),
                  TrainConfig(steps=1600, eval_every=400, interim_eval_images=256, cpu_bf16="auto"))


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
                    text_width=512, text_layers=8, text_heads=8, context_length=77,
                    lpips_weight=1.0, gan_weight=1.0),  # the full objective (its weights: docs/reference_checkpoint.md)
        TrainConfig(batch_size=64, steps=100_000, lr=5e-4),
    )


def _paper() -> Preset:
    # The reference: ViTamin-L encoder (conv stem, 16x down, 31 blocks of width 1024, GeGLU, no positional
    # embedding), a 31-block decoder, 64-d latent in 8 x 8-d chunks with 4096 codes each, text tower 768 x 12.
    return Preset(
        ModelConfig(image_size=256, patch_size=16, encoder="vitamin_large_256", width=1024, encoder_depth=31,
                    decoder_depth=31, num_heads=16, mlp="geglu", latent_dim=64, num_codebooks=8,
                    codebook_size=4096, embed_dim=768, text_width=768, text_layers=12, text_heads=12,
                    context_length=77, lpips_weight=1.0, gan_weight=1.0),
        TrainConfig(batch_size=64, steps=20_000_000, lr=5e-4, weight_decay=0.02),
    )


PRESETS = {"tiny": _tiny, "small": _small, "base": _base, "paper": _paper}


def _reference_layout_problems(cfg: "ModelConfig") -> list[str]:
    """Checks of the reference-layout choices and the perceptual/adversarial settings (see unitok.tokenizer.vitamin)."""
    problems = []
    if cfg.decoder not in ("vit", "vitamin"):
        problems.append(f"decoder must be 'vit' or 'vitamin', got {cfg.decoder!r}")
    if (cfg.encoder in ("vitamin_base", "vitamin_large", "vitamin") or cfg.decoder == "vitamin") \
            and cfg.patch_size != 16:
        problems.append(f"the ViTamin encoder/decoder work at 16x down-sampling: patch_size must be 16, got "
                        f"{cfg.patch_size}")
    for name, n in (("conv_widths", 3), ("conv_depths", 2), ("decoder_conv_widths", 2), ("decoder_conv_depths", 2)):
        value = getattr(cfg, name)
        if not isinstance(value, (list, tuple)) or len(value) not in (0, n) or any(
                not isinstance(v, (int, float)) or float(v) != int(v) or int(v) < 1 for v in value):
            problems.append(f"{name}={value!r} is not allowed; expected () or {n} positive integers")
    if cfg.lpips_weight and cfg.image_size < 48:
        problems.append(f"lpips_weight={cfg.lpips_weight} needs images of at least 48 px (VGG's receptive field), "
                        f"got image_size={cfg.image_size}; set lpips_weight=0")
    if not 0 <= cfg.gan_start <= 1 or not 0 <= cfg.gan_warmup <= 1:
        problems.append(f"gan_start={cfg.gan_start} and gan_warmup={cfg.gan_warmup} must be fractions in [0, 1]")
    if cfg.lpips_weight < 0 or cfg.gan_weight < 0 or cfg.disc_cr_weight < 0:
        problems.append("lpips_weight, gan_weight and disc_cr_weight must be >= 0")
    return problems


def _check_fields(cfg, positive=(), non_negative=()) -> list[str]:
    """Type and range problems of a config's fields, each naming the key, the value and what is allowed."""
    problems = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        ok_type = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
                   "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
                   "bool": lambda v: isinstance(v, bool),
                   "str": lambda v: isinstance(v, str)}.get(kind, lambda v: True)
        if not ok_type(value):
            problems.append(f"{f.name}={value!r} has the wrong type; expected {kind}")
        elif f.name in positive and not value > 0:
            problems.append(f"{f.name}={value!r} is not allowed; expected a number > 0")
        elif f.name in non_negative and not value >= 0:
            problems.append(f"{f.name}={value!r} is not allowed; expected a number >= 0")
    return problems


def get_preset(name: str) -> Preset:
    """A fresh copy of a named preset (mutating it never changes the registry)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]()


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# Fields added after models were first saved, with defaults that reproduce how those older models computed. A saved
# config may omit exactly these; any other missing key is an error (a default could silently change the model).
# Add a field here only if its default keeps older saved models computing what they computed.
FIELDS_WITH_SAFE_DEFAULTS: dict[str, set[str]] = {
    # the reference layout and the perceptual/adversarial terms: their defaults are the toy layout, terms off
    "ModelConfig": {"decoder", "conv_widths", "conv_depths", "decoder_conv_widths", "decoder_conv_depths",
                    "fc_norm_eps", "lpips_weight", "gan_weight", "gan_start", "gan_warmup", "gan_adaptive_scale",
                    "gan_adaptive_max", "disc_cr_weight", "image_head_depth",
                    "hard_negative_weight", "image_pool", "quantizer", "fsq_levels"},   # quantizer: mcq before
    "TrainConfig": {"disc_lr", "disc_betas", "disc_weight_decay", "disc_image_size", "lpips_weights",
                    "dino_weights", "cpu_bf16"},   # cpu_bf16: older runs trained in fp32 on the CPU
}


def from_dict(cls, values: dict, what: str = "config"):
    """Build `cls` from a saved dict, refusing unknown and missing keys and values of the wrong type.

    A typo or a missing key must not silently fall back to a default; `what` names the source in messages.
    """
    if not isinstance(values, dict):
        raise ValueError(f"{what}: expected a JSON object of {cls.__name__} fields, got {type(values).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{what}: unknown {cls.__name__} keys {unknown}; expected a subset of {sorted(known)}")
    missing = sorted(known - set(values) - FIELDS_WITH_SAFE_DEFAULTS.get(cls.__name__, set()))
    if missing:
        raise ValueError(f"{what}: {cls.__name__} keys {missing} are missing; a saved config must list every field")
    try:
        return cls(**values)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{what}: {e}") from None


def apply_overrides(preset: Preset, overrides: list[str] | dict[str, Any]) -> Preset:
    """Apply `key=value` overrides, e.g. ["model.num_codebooks=1", "train.steps=200", "lr=1e-3"].

    A bare key is looked up in the model config first, then the training config. Values are parsed as JSON
    when possible (numbers, booleans, lists), otherwise kept as strings.
    """
    items = overrides.items() if isinstance(overrides, dict) else (split_override(o) for o in overrides)
    model, train = to_dict(preset.model), to_dict(preset.train)
    types = {**{f.name: f.type for f in fields(ModelConfig)}, **{f.name: f.type for f in fields(TrainConfig)}}
    for key, value in items:
        section, _, name = key.rpartition(".")
        if section in ("model", "") and name in model:
            model[name] = coerce_value(key, value, types[name], model[name])
        elif section in ("train", "") and name in train:
            train[name] = coerce_value(key, value, types[name], train[name])
        else:
            raise ValueError(f"unknown setting {key!r}; model keys: {sorted(model)}; train keys: {sorted(train)}")
    return Preset(from_dict(ModelConfig, model, "overrides"), from_dict(TrainConfig, train, "overrides"))


def coerce_value(key: str, value: Any, type_name: Any, current: Any) -> Any:
    """Parse an override to its field's type: "False" -> False, "1e3" -> 1000 for an int field only if integral.

    key: the setting's name and current: its value now (both for the error message); type_name: the dataclass
    field's type ("bool", "int", "float", "tuple", else kept as a string). A value that does not parse is a
    ValueError naming the key, the expected type and the value. Shared by every config with key=value overrides
    (the tokenizer's here, the generator's and the MLLM's).
    """
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


def split_override(text: str) -> tuple[str, str]:
    """"key=value" -> ("key", "value"), both stripped; the value may itself contain "=". A ValueError without "="."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key=value")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()
