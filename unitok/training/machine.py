"""The machine: where and how a model runs (device, bf16, a thread-safe evaluation mode) and what it is (its
matmul peak, the code's git revision), for the library, the widgets and the benchmarks alike.

    >>> matmul_peak()                            # fp32 GFLOP/s of this machine right now (best of 5 2048^3 products)
    >>> git_revision()                           # 'c0ffee...' (+ '-dirty' when tracked files differ), or 'unknown'

    >>> device = pick_device("auto")             # cuda:0 when there is a GPU, else cpu
    >>> model_device(model)                      # the device of the model's first parameter (cpu if none)
    >>> with eval_mode(model):                   # eval mode, no_grad; the training flag is restored afterwards
    ...     recon = model.reconstruct(images)
    >>> with training_autocast(device, amp=True, cpu_bf16="auto"):   # the trainers' forward pass
    ...     out = model(images, texts)

Why a lock: a notebook can train a model in a background thread (the training dashboard runs `Trainer.step()`
there) while other views evaluate the *same* model from the main thread. Switching to eval mode is a flag on
the shared module, so without coordination a training step could run in eval mode (with dead-code restart on,
a batch would go uncounted), or a view could restore train mode in the middle of another view's pass.
`eval_mode` and `Trainer.step` therefore hold the model's re-entrant lock (`model_lock(model)`) for their whole
duration: a view waits for the current training step to finish (well under a second for the CPU presets) and the
next step waits for the view. The lock is per model object and re-entrant, so nesting `eval_mode` (an
evaluation pass that calls the zero-shot helpers) or evaluating from a training callback is fine.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
import subprocess
import threading
import time
import weakref
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
import torch.nn as nn

from ..tokenizer.config import CPU_BF16_CHOICES  # defined with the TrainConfig field it checks

__all__ = ["pick_device", "model_device", "model_lock", "eval_mode", "CPU_BF16_CHOICES", "cpu_has_bf16_matmul",
           "uses_bf16", "training_autocast", "REFERENCE_GFLOPS", "matmul_peak", "git_revision", "machine_info"]

# Times are budgeted on a laptop whose 2048^3 fp32 matmul runs at this speed; a time measured here is scaled by
# (this machine's peak / REFERENCE_GFLOPS) so that numbers from a fast and a slow (or busy) machine compare.
REFERENCE_GFLOPS = 192.0

# One lock per model object. Kept outside the module (not an attribute) so that models stay deep-copyable and
# picklable, and the entry disappears with the model.
_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def pick_device(name: Union[str, torch.device] = "auto", local_rank: int = 0) -> torch.device:
    """"auto" -> cuda:local_rank when available, else cpu; an explicit device is checked before it is used."""
    if str(name) != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"device {name!r} is not a device name; expected 'auto', 'cpu', 'cuda' or 'cuda:N'") \
                from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {name!r} was asked for, but this PyTorch sees no CUDA GPU "
                             f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None}); "
                             f"use --device cpu / --set device=cpu, or 'auto'")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} does not exist; this machine has {torch.cuda.device_count()} GPU(s)")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def model_device(model) -> torch.device:
    """The device of the first parameter (then buffer) of an nn.Module; cpu for anything without tensors."""
    if isinstance(model, nn.Module):
        for t in model.parameters():
            return t.device
        for t in model.buffers():
            return t.device
    return torch.device("cpu")


def model_lock(model: nn.Module) -> threading.RLock:
    """The re-entrant lock that serialises training steps and evaluation passes on `model` (created on first use)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


@contextlib.contextmanager
def eval_mode(model, no_grad: bool = True) -> Iterator:
    """Put `model` in eval mode (and no_grad) for the block; restore its training flag afterwards, even on error.

    Holds `model_lock(model)` throughout (see the module docstring). Anything that is not an nn.Module (a fake
    model in a test, a plain function) passes through unchanged.
    """
    if not isinstance(model, nn.Module):
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            yield model
        return
    with model_lock(model):
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad() if no_grad else contextlib.nullcontext():
                yield model
        finally:
            model.train(was_training)


# ---------------------------------------------------------------------------------------------------------------
# mixed precision for training
# ---------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)   # asked once per training step: probe the CPU once per process
def cpu_has_bf16_matmul() -> bool:
    """True when this CPU multiplies bfloat16 matrices in hardware: Intel AMX tiles, or the AVX-512 BF16 dot-product
    instructions (AMD Zen 4 and later, Intel Cooper Lake and later), which oneDNN uses for bf16 matmuls. There a
    bf16 matmul runs 2-4x faster than fp32 and a tiny training step about 1.3-1.4x faster
    (benchmarks/train_throughput.py); elsewhere bf16 is emulated and slower."""
    for probe_name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        probe = getattr(torch.cpu, probe_name, None)
        try:
            if probe is not None and probe():
                return True
        except RuntimeError:
            continue
    return False


def uses_bf16(device: torch.device, amp: bool = True, cpu_bf16: str = "off") -> bool:
    """Whether a training forward pass on `device` runs under bf16 autocast.

    CUDA: `amp`. CPU: `cpu_bf16` -- "off" (fp32, bit-for-bit repeatable anywhere), "on", or "auto" (bf16 where
    `cpu_has_bf16_matmul()`)."""
    if cpu_bf16 not in CPU_BF16_CHOICES:
        raise ValueError(f"cpu_bf16 must be one of {CPU_BF16_CHOICES}, got {cpu_bf16!r}")
    if device.type == "cuda":
        return bool(amp)
    if device.type == "cpu":
        return cpu_bf16 == "on" or (cpu_bf16 == "auto" and cpu_has_bf16_matmul())
    return False


@contextlib.contextmanager
def training_autocast(device: torch.device, amp: bool = True, cpu_bf16: str = "off",
                      model: Optional[nn.Module] = None) -> Iterator:
    """bf16 autocast for a training forward pass when `uses_bf16(...)`, else nothing.

    On the CPU it also routes attention around the fused CPU flash-attention kernel, whose backward is about 7x
    slower in bf16 than in fp32 (measured on the tiny preset): `model`'s timm attention layers take their plain path
    (q @ k^T, softmax, @ v: the matmuls bf16 makes fast) for the duration, and every other
    `scaled_dot_product_attention` call runs PyTorch's math kernel. The plain path is also faster than the math
    kernel, which adds a "safe softmax" pass (`all`, `where`, `isneginf` over every score) that the plain path does
    not need (no masks here): a bf16 tiny step 1.1-1.3x faster (docs/cpu_recipe.md). Losses, the quantizer's
    nearest-code search and evaluation stay fp32, and so does every attention outside this context.
    """
    if not uses_bf16(device, amp, cpu_bf16):
        yield
        return
    with contextlib.ExitStack() as stack:
        if device.type == "cpu":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            if model is not None:
                stack.enter_context(_plain_attention(model))
        stack.enter_context(torch.autocast(device_type=device.type, dtype=torch.bfloat16))
        yield


@contextlib.contextmanager
def _plain_attention(model: nn.Module) -> Iterator:
    """timm attention layers (those with a `fused_attn` switch) of `model` on their plain path, then restored."""
    layers = [m for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    before = [m.fused_attn for m in layers]
    for m in layers:
        m.fused_attn = False
    try:
        yield
    finally:
        for m, fused in zip(layers, before):
            m.fused_attn = fused


# ---------------------------------------------------------------------------------------------------------------
# what the machine is: the one place its speed and the code's revision are measured
# ---------------------------------------------------------------------------------------------------------------
def matmul_peak(size: int = 2048, repeats: int = 5, device: Union[str, torch.device] = "cpu",
                dtype: torch.dtype = torch.float32) -> float:
    """This machine's (size x size) @ (size x size) matmul throughput right now, in GFLOP/s: the best of `repeats`
    products after one warm-up, with the current thread count. Measured next to a timing, it says how much of the
    machine the timed work had (a busy CPU shows a lower peak), so times scale to REFERENCE_GFLOPS."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)   # its own generator: measuring never moves a training run's random draws
    a = torch.randn(size, size, generator=g).to(device, dtype)
    b = torch.randn(size, size, generator=g).to(device, dtype)
    best = math.inf
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first product is a warm-up
            best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def git_revision() -> str:
    """The repository's HEAD commit (with "-dirty" when tracked files differ from it), or "unknown"."""
    root = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not rev:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info(device: Union[str, torch.device] = "cpu") -> dict:
    """What a result was measured on: device, threads, CPU count, torch version, platform (and the GPU's name)."""
    device = torch.device(device)
    info = {"device": str(device), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "platform": platform.platform()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
