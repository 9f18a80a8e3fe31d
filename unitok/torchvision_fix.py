"""Make ``import torchvision`` work when its compiled ops cannot load.

PyPI's torchvision wheel is built against CUDA torch; next to the CPU build of torch its ``_C.so`` fails to load,
and torchvision's import then dies registering fake kernels for ``torchvision::nms``. timm and open_clip import
torchvision, so they would die too. The fix: before torchvision is first imported, try to load its ops; if that
raises ``OSError``, declare the two op schemas torchvision's import expects. Only torchvision's compiled kernels
(nms, roi_align, its JPEG codec) stay missing, and unitok uses none of them. Where the ops load, this does nothing.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sys

import torch

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # keep the Library object alive: dropping it would unregister the schemas


def apply() -> bool:
    """Returns True if the schemas had to be declared, False if nothing was needed."""
    global _library
    if "torchvision" in sys.modules or _library is not None:
        return False
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    libs = glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so")) + glob.glob(
        os.path.join(spec.submodule_search_locations[0], "_C*.pyd")
    )
    try:
        for lib in libs:
            torch.ops.load_library(lib)
        return False
    except (OSError, RuntimeError):
        pass
    _library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _library.define(schema)
    return True
