"""The generator's settings: `GeneratorConfig` (architecture, input, output head and conditioning) and its presets.

Conditioning (GeneratorConfig.condition), the prefix the generator reads before the grid:
    "text_tokens"  the tokenizer's own text tower, its per-token states (B, context_length, text_width) as prefix
    "text"         the same tower's pooled, CLIP-aligned feature (B, embed_dim) as one prefix token
    "class"        a class-label embedding with one extra null row

The grid, codebook and text-tower sizes are the tokenizer's (`tokenizer_fields`); `GeneratorConfig.from_saved`
reads a saved config with the values of options that did not exist yet when it was trained.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from ..transformer.code_head import CODE_LOGITS

CONDITIONS = ("text_tokens", "text", "class")
HEADS = ("depth", "parallel")


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
    quantizer: str = "mcq"            # the tokenizer's quantizer (its code vectors: unitok.tokenizer.quantizers)
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
                latent_dim=c.latent_dim, tokenizer_width=c.width, projection=c.projection, quantizer=c.quantizer)

