"""Where the bundled models live: small trained checkpoints shipped in the repository's data/ folder
(data/README.md says how each was made and what it scores)."""
from pathlib import Path

REPOSITORY_DATA = Path(__file__).resolve().parents[2] / "data"
BUNDLED_TOKENIZER = REPOSITORY_DATA / "tiny-shapes"      # `make checkpoint`: the CPU recipe's tokenizer
BUNDLED_GENERATOR = REPOSITORY_DATA / "tiny-generator"   # `make generator`: a generator over its codes
BUNDLED_MLLM = REPOSITORY_DATA / "tiny-mllm"             # `make mllm`: the unified model
BUNDLED_SHAPE_CLASSIFIER = REPOSITORY_DATA / "shape-classifier"   # the judge of generated pictures (real renders only)
