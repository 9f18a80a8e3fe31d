"""unitok_widgets: interactive Jupyter views over unitok's public objects (a model, a trainer, a dataset).

    >>> from unitok_widgets import TrainingDashboard, CodebookUsage, ReconstructionViewer
    >>> from unitok_widgets import TokenEmbeddingExplorer, TokenGrid, ZeroShotPanel

Every view has `.widget` (an ipywidgets container, shown when the view is the cell's last expression or passed to
`display`) and `static_figure()` (a matplotlib Figure of the same content, for notebooks rendered without a kernel).
The library (`unitok`) never imports this package.
"""
from .codebook import CodebookUsage
from .embeddings import TokenEmbeddingExplorer
from .reconstruction import ReconstructionViewer
from .token_grid import TokenGrid
from .training import TrainingDashboard
from .zero_shot import ZeroShotPanel

__all__ = ["TrainingDashboard", "CodebookUsage", "ReconstructionViewer", "TokenEmbeddingExplorer", "TokenGrid",
           "ZeroShotPanel"]
