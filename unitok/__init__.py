"""unitok: a unified discrete visual tokenizer (UniTok) with multi-codebook quantization."""
from . import _torchvision_fix

_torchvision_fix.apply()  # must run before anything imports timm / open_clip / torchvision

from .config import ModelConfig, TrainConfig, PRESETS, get_preset  # noqa: E402
from .quantizer import MultiCodebookQuantizer, QuantizerOutput  # noqa: E402
from .projection import AttnProjection, LinearProjection  # noqa: E402
from .model import UniTok, UniTokOutput  # noqa: E402
from .reference import codes_from_reference, codes_to_reference, preprocess  # noqa: E402
from .codebook_stats import CodebookTracker  # noqa: E402
from .runtime import eval_mode  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "ModelConfig", "TrainConfig", "PRESETS", "get_preset",
    "MultiCodebookQuantizer", "QuantizerOutput", "AttnProjection", "LinearProjection",
    "UniTok", "UniTokOutput", "codes_to_reference", "codes_from_reference", "preprocess", "CodebookTracker", "eval_mode",
]
