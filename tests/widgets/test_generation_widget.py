"""GenerationExplorer on a small random generator over the bundled tokenizer (no kernel, no browser)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import unitok  # noqa: F401  (first: makes torchvision importable on CPU-only torch)

pytest.importorskip("ipywidgets")
import matplotlib  # noqa: E402

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402

from unitok.generator.config import GeneratorConfig  # noqa: E402
from unitok.generator.model import TokenGenerator  # noqa: E402
from unitok.tokenizer.model import UniTok  # noqa: E402
from unitok_widgets import GenerationExplorer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(width=32, depth=1, num_heads=2, depth_width=32, depth_layers=1, depth_heads=2)


@pytest.fixture(scope="module")
def generator():
    tok = UniTok.from_pretrained(ROOT / "data" / "tiny-shapes").eval()
    torch.manual_seed(0)
    gen = TokenGenerator(GeneratorConfig.preset("tiny", tokenizer=tok, **SMALL), tok)
    torch.nn.init.normal_(gen.classifier.weight, std=0.3)
    return gen.eval()


def test_sample_step_resample_and_static_figure(generator):
    view = GenerationExplorer(generator, prompt="a red star", num_images=4, seed=1)
    assert view.codes.shape == (4, 8, 8, 8) and view.images.shape == (4, 3, 32, 32)
    assert torch.equal(view.codes, generator.generate(prompts="a red star", num=4, seed=1, **view.settings()))
    assert view.entropy.shape == (8, 8) and (view.entropy > 0).all()
    first = view.codes.clone()
    view.seed.value = 2
    view.sample()
    assert not torch.equal(first, view.codes)
    # Step: one position at a time, the depth head's k choices listed
    view.step()
    assert view.filled == 1 and len(view.last_choices) == 8
    assert all(0 <= c < 256 and 0 < p <= 1 for c, p, _ in view.last_choices)
    assert "position 0" in view.table.value
    for _ in range(63):
        view.step()
    assert view.filled == 64 and view.focus_codes.shape == (8, 8, 8)
    before = view.focus_codes.clone()
    view.temperature.value = 2.0
    view.resample(2, 3)
    changed = (view.focus_codes != before).any(-1)
    assert changed.sum() <= 1 and (changed.sum() == 0 or changed[2, 3])
    assert "row 2, col 3" in view.status.value
    fig = view.static_figure()
    assert isinstance(fig, Figure) and len(fig.axes) >= 3
    view.best_of.value = 3                          # best of 3: the generator's own rerank, same seed
    view.sample()
    assert torch.equal(view.codes, generator.generate(prompts="a red star", num=4, seed=2, rerank=3,
                                                      **view.settings()))
    assert "best of 3" in view.status.value
    view.prompt.value = " "
    view.sample()                                   # an empty prompt: a message, not an exception
    assert "non-empty" in view.status.value
    view.close()
    assert view.closed
