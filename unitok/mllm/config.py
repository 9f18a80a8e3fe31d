"""The unified model's settings: `MLLMConfig` (backbone, image output and input, text slots, loss weights and the
tokenizer's sizes), with the sequence layout those sizes give (`unitok.mllm.sequence`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..transformer.code_head import CODE_LOGITS
from . import sequence
from .sequence import SPECIALS
from .text import TextTokenizer

IMAGE_INPUTS = ("codebook", "embedding", "continuous")
CONTINUOUS_SOURCES = ("latent", "encoder")


@dataclass
class MLLMConfig:
    # backbone (`unitok.transformer.causal.CausalTransformer`, as the generator's)
    width: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    # image output: the depth head (`unitok.transformer.depth_head`, as the generator's)
    depth_width: int = 128
    depth_layers: int = 1
    depth_heads: int = 4
    code_logits: str = "linear"          # "linear" or "codebook" (the generator's `CodeClassifier` geometry term)
    # image input
    image_input: str = "codebook"        # "codebook", "embedding" or "continuous" (input only)
    continuous_source: str = "latent"    # "latent" (pre-quantization, through post_quant_proj) or "encoder"
    tune_post_quant_proj: bool = True    # train the causal copy of the tokenizer's post_quant_proj
    # text
    vocab_size: int = 264                # len(TextTokenizer)
    caption_tokens: int = 28             # t2i prompt slots (left-padded)
    question_tokens: int = 16            # vqa question slots (left-padded)
    target_tokens: int = 28              # longest caption / answer target, <eos> included
    # loss
    image_loss_weight: float = 1.0
    caption_dropout: float = 0.1         # t2i prompts replaced by the empty prompt (the CFG unconditional branch)
    # the tokenizer's sizes (taken from it)
    grid_size: int = 8
    num_codebooks: int = 8
    codebook_size: int = 256
    latent_dim: int = 32
    tokenizer_width: int = 128
    projection: str = "attn"
    quantizer: str = "mcq"               # the tokenizer's quantizer (unitok.tokenizer.quantizers)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        problems = []
        if self.code_logits not in CODE_LOGITS:
            problems.append(f"code_logits must be one of {CODE_LOGITS}, got {self.code_logits!r}")
        if self.image_input not in IMAGE_INPUTS:
            problems.append(f"image_input must be one of {IMAGE_INPUTS}, got {self.image_input!r}")
        if self.continuous_source not in CONTINUOUS_SOURCES:
            problems.append(f"continuous_source must be one of {CONTINUOUS_SOURCES}, got {self.continuous_source!r}")
        if self.width % self.num_heads:
            problems.append(f"width {self.width} must be divisible by num_heads {self.num_heads}")
        if self.depth_width % self.depth_heads:
            problems.append(f"depth_width {self.depth_width} must be divisible by depth_heads {self.depth_heads}")
        for name in ("width", "depth", "depth_layers", "caption_tokens", "question_tokens", "target_tokens",
                     "grid_size", "num_codebooks", "codebook_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.vocab_size < len(SPECIALS) + 256:
            problems.append(f"vocab_size must be >= {len(SPECIALS) + 256} (specials + bytes), got {self.vocab_size}")
        if not 0.0 <= self.caption_dropout < 1.0:
            problems.append(f"caption_dropout must lie in [0, 1), got {self.caption_dropout}")
        if problems:
            raise ValueError("invalid MLLMConfig: " + "; ".join(problems))

    @property
    def num_positions(self) -> int:
        return self.grid_size ** 2

    @property
    def can_generate(self) -> bool:
        """Continuous features are input only: such a model reads images but cannot write them."""
        return self.image_input != "continuous"

    # the sequence layout, for these sizes (`unitok.mllm.sequence`)
    def image_start(self, task: str) -> int:
        """The slot of image position 0 in a `task` sequence."""
        return sequence.image_start(self, task)

    def prompt_length(self, task: str) -> int:
        """Slots before the first target token (the decoding prefill)."""
        return sequence.prompt_length(self, task)

    @property
    def max_length(self) -> int:
        """The longest sequence of any task."""
        return sequence.max_length(self)

    @classmethod
    def for_tokenizer(cls, tokenizer, text: Optional[TextTokenizer] = None, **overrides) -> "MLLMConfig":
        """The tokenizer's sizes (grid, codebooks, latent, width, projection), the text tokenizer's vocabulary size
        (when given), then `overrides`."""
        c = tokenizer.config
        values = dict(grid_size=c.grid_size, num_codebooks=c.num_codebooks, codebook_size=c.codebook_size,
                      latent_dim=c.latent_dim, tokenizer_width=c.width, projection=c.projection,
                      quantizer=c.quantizer)
        if text is not None:
            values["vocab_size"] = len(text)
        values.update(overrides)
        return cls(**values)
