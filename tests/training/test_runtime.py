"""Tests for unitok.training.machine (device lookup, eval_mode and the model lock) and unitok.tokenizer.codes. CPU, seconds.

Nothing here measures time: whether another thread can take the model's lock is asked with a non-blocking
acquire, so the answers are exact.
"""
import copy
import math
import threading

import unitok  # noqa: F401  (first: makes torchvision importable on CPU-only torch)
import pytest
import torch
import torch.nn as nn

from unitok.tokenizer.codes import check_codes, count_codes
from unitok.tokenizer.config import apply_overrides, get_preset
from unitok.data.shapes_dataset import ShapesDataset
from unitok.training.machine import eval_mode, model_device, model_lock, pick_device
from unitok.training.tokenizer_trainer import Trainer


def _lock_free_elsewhere(model) -> bool:
    """True when another thread could take the model's lock right now (it is released again at once)."""
    result = []

    def probe():
        lock = model_lock(model)
        got = lock.acquire(blocking=False)
        if got:
            lock.release()
        result.append(got)

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    return result[0]


def test_eval_mode_sets_eval_and_no_grad_and_restores_the_flag_even_on_error():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train()
    with eval_mode(model):
        assert not model.training and not model[1].training
        assert not torch.is_grad_enabled()
        assert not _lock_free_elsewhere(model)                 # held for the whole block
    assert model.training and torch.is_grad_enabled() and _lock_free_elsewhere(model)
    with pytest.raises(RuntimeError, match="boom"):
        with eval_mode(model):
            raise RuntimeError("boom")
    assert model.training and _lock_free_elsewhere(model)
    model.eval()
    with eval_mode(model, no_grad=False):
        assert torch.is_grad_enabled()
    assert not model.training                                  # restored to what it was: eval


def test_eval_mode_nests_and_passes_non_modules_through():
    model = nn.Linear(2, 2).train()
    with eval_mode(model):
        with eval_mode(model):                                 # re-entrant: the same thread may nest
            assert not model.training
        assert not model.training                              # the inner block restored the outer state
    assert model.training
    fake = object()
    with eval_mode(fake) as same:
        assert same is fake and not torch.is_grad_enabled()


def test_model_lock_is_per_model_and_models_stay_copyable():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    assert model_lock(a) is model_lock(a) and model_lock(a) is not model_lock(b)
    with eval_mode(a):
        assert _lock_free_elsewhere(b)                         # another model is not blocked
        clone = copy.deepcopy(a)                               # the lock is not an attribute of the model
    assert isinstance(clone, nn.Linear)


def test_trainer_step_holds_the_model_lock(tiny_overrides):
    """A view's eval_mode from another thread cannot switch the model to eval mode in the middle of a step."""
    preset = apply_overrides(get_preset("tiny"), tiny_overrides)
    trainer = Trainer(preset.model, preset.train, ShapesDataset(32, "train", length=64), {}, out_dir=None)
    seen = []
    trainer.add_callback("step", lambda t, m: seen.append((_lock_free_elsewhere(t.model), t.model.training)))
    trainer.step()
    assert seen == [(False, True)]                             # locked, and still in train mode, during the step
    assert _lock_free_elsewhere(trainer.model)                 # released afterwards


def test_device_lookup():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    with pytest.raises(ValueError, match="not a device name"):
        pick_device("gpu-please")
    assert model_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert model_device(nn.Identity()) == torch.device("cpu")  # no parameters: cpu
    assert model_device(object()) == torch.device("cpu")


def test_count_codes_matches_a_per_codebook_bincount():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 7, (3, 5, 4), generator=g)       # (..., k=4), K = 7
    counts = count_codes(codes, 7)
    expected = torch.stack([torch.bincount(codes[..., i].reshape(-1), minlength=7) for i in range(4)])
    assert counts.dtype == torch.int64 and torch.equal(counts, expected)


@pytest.mark.parametrize("codes, kwargs, pattern", [
    (torch.zeros(3, 4), {}, "integer tensor"),
    (torch.zeros(3, 4, dtype=torch.bool), {}, "integer tensor"),
    ([[0, 1]], {}, "integer tensor"),
    (torch.zeros(3, 4, dtype=torch.long), {"num_codebooks": 8}, r"shape \(\.\.\., 8\)"),
    (torch.zeros(0, 4, dtype=torch.long), {}, "empty"),
    (torch.tensor([[0, 10]]), {}, r"\[0, 10\).*\[0, 10\]"),
    (torch.tensor([[-1, 0]]), {}, r"got values in \[-1, 0\]"),
])
def test_check_codes_says_what_was_expected(codes, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        check_codes(codes, 10, **kwargs)


def test_check_codes_accepts_valid_and_skips_range_when_asked():
    check_codes(torch.tensor([[0, 9]]), 10, num_codebooks=2)
    check_codes(torch.tensor([[0, 99]]), 10, check_range=False)          # no device read
    check_codes(torch.zeros(0, 2, dtype=torch.long), 10, allow_empty=True)
    check_codes(torch.empty(5, 2, dtype=torch.long, device="meta"), 10)  # meta tensors have no values


# ---------------------------------------------------------------------------------------------------------------
# bf16 autocast for training (unitok.training.machine.training_autocast)
# ---------------------------------------------------------------------------------------------------------------
def test_cpu_bf16_choice_is_explicit_and_checked():
    from unitok.tokenizer.config import TrainConfig
    from unitok.training.machine import cpu_has_bf16_matmul, uses_bf16

    cpu = torch.device("cpu")
    assert uses_bf16(cpu, amp=True, cpu_bf16="off") is False      # amp alone never turns the CPU to bf16
    assert uses_bf16(cpu, amp=False, cpu_bf16="on") is True
    assert uses_bf16(cpu, cpu_bf16="auto") is cpu_has_bf16_matmul()
    with pytest.raises(ValueError, match="cpu_bf16 must be one of"):
        uses_bf16(cpu, cpu_bf16="fast")
    with pytest.raises(ValueError, match="cpu_bf16='fast' is not allowed; expected 'off', 'on' or 'auto'"):
        TrainConfig(cpu_bf16="fast")


@pytest.mark.parametrize("amx, avx512_bf16, expected", [(True, False, True), (False, True, True),
                                                        (False, False, False), ("raises", False, False)])
def test_bf16_hardware_is_amx_or_avx512_bf16(monkeypatch, amx, avx512_bf16, expected):
    from unitok.training import machine

    def probe(answer):
        def ask():
            if answer == "raises":
                raise RuntimeError("cpuinfo unavailable")
            return answer
        return ask

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", probe(amx), raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", probe(avx512_bf16), raising=False)
    machine.cpu_has_bf16_matmul.cache_clear()
    try:
        assert machine.cpu_has_bf16_matmul() is expected
    finally:
        monkeypatch.undo()
        machine.cpu_has_bf16_matmul.cache_clear()


def test_training_autocast_runs_matmuls_in_bf16_and_attention_through_the_math_kernel():
    import torch.nn.functional as F
    from unitok.training.machine import training_autocast

    torch.manual_seed(0)
    lin = nn.Linear(16, 16)
    x = torch.randn(2, 4, 16)
    q = torch.randn(2, 2, 5, 8, requires_grad=True)
    with training_autocast(torch.device("cpu"), cpu_bf16="off"):
        assert lin(x).dtype == torch.float32
    with training_autocast(torch.device("cpu"), cpu_bf16="on"):
        assert lin(x).dtype == torch.bfloat16
        y = F.scaled_dot_product_attention(q.bfloat16(), q.bfloat16(), q.bfloat16(), is_causal=True)
    assert not torch.is_autocast_enabled("cpu")                     # nothing leaks out of the block
    y.float().sum().backward()
    ref = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert torch.allclose(y.float(), ref, atol=3e-2)                # the same attention, to bf16 precision
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_bf16_training_autocast_puts_timm_attention_on_its_plain_path_and_restores_it():
    from timm.models.vision_transformer import Block

    from unitok.training.machine import training_autocast

    torch.manual_seed(0)
    block = Block(32, 4, qkv_bias=True)
    x = torch.randn(2, 9, 32)
    fused = block.attn.fused_attn
    with training_autocast(torch.device("cpu"), cpu_bf16="off", model=block):
        assert block.attn.fused_attn == fused                       # fp32: the fused kernel, untouched
    seen = []
    real_forward = type(block.attn).forward

    def spy(self, *args, **kwargs):
        seen.append(self.fused_attn)
        return real_forward(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(block.attn), "forward", spy)
        with training_autocast(torch.device("cpu"), cpu_bf16="on", model=block):
            plain = block(x)
        with pytest.raises(RuntimeError, match="boom"):
            with training_autocast(torch.device("cpu"), cpu_bf16="on", model=block):
                raise RuntimeError("boom")
    assert seen == [False] and block.attn.fused_attn == fused      # plain inside, restored after (also on error)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = block(x)                                        # the same block through the fused kernel
    assert torch.allclose(plain.float(), reference.float(), atol=5e-2)


def test_bf16_training_steps_are_repeatable_and_recorded(tiny_overrides, tmp_path):
    from unitok.training.tokenizer_trainer import Trainer

    def three_steps(out):
        trainer = Trainer.from_preset("tiny", data="shapes", out_dir=out,
                                      overrides=[*tiny_overrides, "steps=3", "seed=1", "cpu_bf16=on",
                                                 "eval_images=32", "checkpoint_every=0"])
        rows = [trainer.step()["loss"] for _ in range(3)]
        summary = trainer.write_summary(trainer.evaluate())
        trainer.close()
        return rows, summary

    a, summary = three_steps(tmp_path / "a")
    b, _ = three_steps(tmp_path / "b")
    assert a == b and all(math.isfinite(v) for v in a)
    assert summary["precision"] == "bf16"
