"""unitok_widgets: interactive Jupyter views over unitok's public objects (a model, a trainer, a dataset).

    >>> from unitok_widgets import TrainingDashboard, CodebookUsage, ReconstructionViewer
    >>> from unitok_widgets import TokenEmbeddingExplorer, TokenGrid, ZeroShotPanel

Every view is built the same way, `View(model, data, *, options)` (the dashboard takes a Trainer, which holds both),
with the same option names (`num_images`, `index`, `px`, `seed`) and the same control names (`index`, `codebook`,
`status`, `figure`). Every view has `.widget` (an ipywidgets container, shown when the view is the cell's last
expression or passed to `display`), `static_figure()` (a matplotlib Figure of the same content, for notebooks
rendered without a kernel) and `close()`. `notebook_setup()` is the notebooks' one-line set-up (modes, paths).
The library (`unitok`) never imports this package.
"""
import unitok  # noqa: F401  (first: sets how OpenMP threads wait before torch loads; see unitok.cpu_share)

from ._common import LOSS_COLOURS, codebook_colour
from .chat import UnifiedChat
from .codebook import CodebookUsage
from .embeddings import TokenEmbeddingExplorer
from .generation import GenerationExplorer
from .lab import Lab, notebook_setup
from .reconstruction import ReconstructionViewer
from .token_grid import TokenGrid
from .training import TrainingDashboard
from .training_figures import heading_figure, read_eval_history
from .zero_shot import ZeroShotPanel

__all__ = ["LOSS_COLOURS", "codebook_colour", "TrainingDashboard", "CodebookUsage", "ReconstructionViewer", "TokenEmbeddingExplorer", "TokenGrid",
           "ZeroShotPanel", "GenerationExplorer", "UnifiedChat", "Lab", "notebook_setup",
           "heading_figure", "read_eval_history"]
