"""unitok: a unified discrete visual tokenizer (UniTok) with multi-codebook quantization."""
from . import cpu_share

cpu_share.apply_wait_policy()  # before torch loads: how OpenMP threads wait decides how a shared CPU is shared

from . import torchvision_fix  # noqa: E402

torchvision_fix.apply()  # must run before anything imports timm / open_clip / torchvision

from .tokenizer.config import ModelConfig, TrainConfig, PRESETS, get_preset  # noqa: E402
from .tokenizer.quantizer import MultiCodebookQuantizer, QuantizerOutput  # noqa: E402
from .tokenizer.projection import AttnProjection, LinearProjection  # noqa: E402
from .tokenizer.model import UniTok, UniTokOutput  # noqa: E402
from .tokenizer.reference import codes_from_reference, codes_to_reference, preprocess  # noqa: E402
from .evaluation.codebook_stats import CodebookTracker  # noqa: E402
from .training.machine import eval_mode  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "ModelConfig", "TrainConfig", "PRESETS", "get_preset",
    "MultiCodebookQuantizer", "QuantizerOutput", "AttnProjection", "LinearProjection",
    "UniTok", "UniTokOutput", "codes_to_reference", "codes_from_reference", "preprocess", "CodebookTracker", "eval_mode",
]
