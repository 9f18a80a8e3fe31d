"""`compile=true`: the compiled training step computes what the eager one does, and compiles once.

The captions are tokenized before the forward pass (a compiled forward that read strings would guard on every
caption and recompile at every step), and the max-pooled image feature is taken in fp32 (under bf16 autocast the
compiled backward of a bf16 max could lose its argmax mask and give NaN gradients). CPU, fp32, a few steps.
"""
import math

import pytest
import torch

import unitok  # noqa: F401  (first: makes torchvision importable on CPU-only torch)
from unitok.training.tokenizer_trainer import Trainer

pytestmark = pytest.mark.slow
STEPS = 4


def _losses(tiny_overrides, compile_: bool):
    from torch._dynamo.utils import counters

    trainer = Trainer.from_preset("tiny", data="shapes", overrides=[*tiny_overrides, f"compile={compile_}",
                                                                   "eval_every=0", "checkpoint_every=0"])
    losses, graphs = [], []
    for _ in range(STEPS):
        losses.append(trainer.step()["loss"])
        graphs.append(counters["stats"]["unique_graphs"])
    return losses, graphs, trainer


def test_compiled_training_equals_eager_and_does_not_recompile(tiny_overrides):
    torch._dynamo.reset()
    eager, _, _ = _losses(tiny_overrides, False)
    compiled, graphs, trainer = _losses(tiny_overrides, True)
    assert graphs[0] > 0 and graphs[1:] == [graphs[0]] * (STEPS - 1), f"graphs compiled after each step: {graphs}"
    assert math.isclose(compiled[0], eager[0], rel_tol=1e-4), (compiled[0], eager[0])
    for c, e in zip(compiled, eager):
        assert math.isclose(c, e, rel_tol=1e-3), (compiled, eager)
    # the first steps are shown and timed as compilation, not as training
    assert [m["compiling"] for m in trainer.history] == [True, True] + [False] * (STEPS - 2)
    assert trainer.compile_seconds > 0 and trainer.train_seconds > 0
