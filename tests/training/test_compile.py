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
    assert trainer.clock.compile_seconds > 0 and trainer.clock.train_seconds > 0


# ---------------------------------------------------------------------------------------------------------------
# the generator's and the unified model's trainers: the same `compile` through the trainer base
# ---------------------------------------------------------------------------------------------------------------
# Dynamo's graph capture and AOT autograd (`aot_eager`): what decides recompilation and the compiled backward's
# numbers. Inductor's code generation is checked on the tokenizer above and measured for all three by
# benchmarks/train_throughput.py; running it here would add two minutes of C++ compilation to the suite.
SMALL_GENERATOR = ["width=32", "depth=1", "num_heads=2", "depth_width=32", "depth_heads=2", "batch_size=8",
                   "train_images=64", "eval_images=16", "log_every=1", "eval_every=0"]
SMALL_MLLM = ["width=64", "depth=1", "num_heads=2", "depth_width=32", "depth_heads=2", "batch_size=16",
              "train_images=64", "eval_images=8", "log_every=1"]


def _model_run(name: str, compile_: bool, steps: int, out):
    """A `steps`-step run of the generator or the unified model on the bundled tokenizer's codes, fp32, through the
    CLI -> (losses per step, dynamo's unique-graph count after each step, metrics rows)."""
    import json

    from torch._dynamo.utils import counters

    from unitok import cli
    from unitok.data.bundled import BUNDLED_TOKENIZER
    from unitok.training import trainer as trainer_base

    graphs = []
    real_step = trainer_base.TrainerBase.step

    def counting_step(self):
        metrics = real_step(self)
        graphs.append(counters["stats"]["unique_graphs"])
        return metrics

    sets = [a for o in (SMALL_GENERATOR if name == "generator" else SMALL_MLLM) for a in ("--set", o)]
    command = (["train-generator", "--samples-per-prompt", "0"] if name == "generator" else
               ["train-mllm", "--no-t2i-eval"])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer_base.TrainerBase, "step", counting_step)
        code = cli.main([*command, "--tokenizer", str(BUNDLED_TOKENIZER), "--data", "shapes", *sets,
                         "--set", f"compile={compile_}", "--set", "cpu_bf16=off", "--steps", str(steps),
                         "--out", str(out)])
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows], graphs, rows


@pytest.mark.parametrize("name", ["generator", "mllm"])
def test_generator_and_unified_model_compile_once_and_match_eager(name, tmp_path, monkeypatch):
    import functools

    steps = 6
    monkeypatch.setenv("UNITOK_DATA_CACHE", str(tmp_path / "cache"))
    torch._dynamo.reset()
    eager, _, _ = _model_run(name, False, steps, tmp_path / "eager")
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    compiled, graphs, rows = _model_run(name, True, steps, tmp_path / "compiled")
    # the unified model's loss has data-dependent parts (which rows draw a picture): dynamo splits it into a few
    # graphs, compiled during the first two steps (the second marks the varying sizes dynamic), then none
    assert graphs[0] > 0 and graphs[2:] == [graphs[1]] * (steps - 2), f"graphs compiled after each step: {graphs}"
    assert math.isclose(compiled[0], eager[0], rel_tol=1e-4), (compiled[0], eager[0])
    for c, e in zip(compiled, eager):
        assert math.isclose(c, e, rel_tol=1e-3), (compiled, eager)
    assert [r["compiling"] for r in rows] == [True, True] + [False] * (steps - 2)
