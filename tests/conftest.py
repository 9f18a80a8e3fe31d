"""Shared fixtures for the training and CLI tests (CPU only, small models, seconds per run)."""
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """One intra-op thread for the whole suite: the test models are too small to gain from two, CPU runs are then
    bit-for-bit repeatable, and on a shared 2-core machine two threads contend (steps get several times slower).
    Subprocesses and notebook kernels set their own (see `subprocess_env`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# A ~1.8 M-parameter model (most of it the CLIP token-embedding table) that still learns visibly in a few hundred
# steps on `shapes`. Every key must exist in ModelConfig / TrainConfig (apply_overrides rejects unknown keys).
# fp32 (`cpu_bf16=off`, not the preset's "auto"): the suite's numbers must not depend on whether the CPU has AMX;
# tests/training/test_runtime.py covers the bf16 path on its own.
_TINY_OVERRIDES = [
    "width=64", "encoder_depth=1", "decoder_depth=1", "num_heads=2", "latent_dim=16", "num_codebooks=4",
    "codebook_size=64", "text_width=32", "text_layers=1", "text_heads=2", "context_length=16", "batch_size=16",
    "eval_images=64", "log_every=2", "eval_every=0", "cpu_bf16=off",
]

# The uninterrupted CLI run shared by test_cli.py (outputs, eval, export) and test_train.py (resume equality).
CLI_RUN_STEPS = 24
CLI_RUN_CHECKPOINT_EVERY = 3


def _set_args(overrides):
    args = []
    for o in overrides:
        args += ["--set", o]
    return args


@pytest.fixture(scope="session")
def tiny_overrides():
    """`key=value` overrides that shrink the tiny preset to a model that trains at ~10 steps/s on one CPU core."""
    return list(_TINY_OVERRIDES)


@pytest.fixture(scope="session")
def tiny_set_args():
    """The same overrides as repeated `--set key=value` command-line arguments."""
    return _set_args(_TINY_OVERRIDES)


@pytest.fixture(scope="session")
def subprocess_env():
    """Environment for child processes: one thread each (determinism, and the cores are shared), no GPU, Agg."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", MPLBACKEND="Agg",
               PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    return env


@pytest.fixture(scope="session")
def unitok_exe():
    """The `unitok` console script next to this interpreter (fall back to `python -m unitok.cli`)."""
    exe = Path(sys.executable).with_name("unitok")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "unitok.cli"]


@pytest.fixture(scope="session")
def run_cli(unitok_exe, subprocess_env):
    """run_cli(*args, timeout=..., check=True, umask=None) -> CompletedProcess of `unitok *args` (text, captured).

    check=True fails the test (with the output) on a non-zero exit; umask sets the child's file-creation mask.
    """

    def run(*args, timeout=240, check=True, cwd=None, umask=None):
        preexec = (lambda: os.umask(umask)) if umask is not None else None
        proc = subprocess.run([*unitok_exe, *map(str, args)], env=subprocess_env, capture_output=True, text=True,
                              timeout=timeout, cwd=cwd, preexec_fn=preexec)
        if check and proc.returncode != 0:
            raise AssertionError(f"`unitok {' '.join(map(str, args))}` exited {proc.returncode}\n"
                                 f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
        return proc

    return run


@pytest.fixture(scope="session")
def start_cli(unitok_exe, subprocess_env):
    """start_cli(*args) starts `unitok *args` and returns wait(); wait() -> CompletedProcess (text, captured).

    For cheap commands whose cost is mostly the interpreter start-up: start several, then wait for each.
    """

    def start(*args, timeout=240):
        argv = [*unitok_exe, *map(str, args)]
        proc = subprocess.Popen(argv, env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def wait():
            try:
                stdout, stderr = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                raise
            return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)

        return wait

    return start


@pytest.fixture(scope="session")
def cli_run(tmp_path_factory, run_cli, tiny_set_args):
    """One uninterrupted `unitok train` run (CLI_RUN_STEPS steps, checkpoint every CLI_RUN_CHECKPOINT_EVERY).

    Returns a namespace: dir (the run folder), steps, checkpoint_every, train_args (the argument list without
    --out, to repeat the run elsewhere), proc (the CompletedProcess), and snapshots taken right after training,
    before any other test touches the folder: summary (dict) and metrics (list of dicts from metrics.jsonl).
    """
    out = tmp_path_factory.mktemp("cli_run") / "run"
    train_args = ["train", "--preset", "tiny", "--data", "shapes", "--steps", str(CLI_RUN_STEPS),
                  *tiny_set_args, "--set", f"checkpoint_every={CLI_RUN_CHECKPOINT_EVERY}"]
    proc = run_cli(*train_args, "--out", out)
    summary = json.loads((out / "summary.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    pristine = out.parent / "pristine"
    shutil.copytree(out, pristine)  # a copy no test modifies
    return types.SimpleNamespace(dir=out, pristine=pristine, steps=CLI_RUN_STEPS,
                                 checkpoint_every=CLI_RUN_CHECKPOINT_EVERY, train_args=train_args, proc=proc,
                                 summary=summary, metrics=metrics)


@pytest.fixture(scope="session")
def small_tokenizer():
    """The one small trained tokenizer the tests share, loaded once per session: the bundled data/tiny-shapes (the
    CPU recipe's model; data/README.md). In eval mode with frozen weights; a test must not change it."""
    from unitok.data.bundled import BUNDLED_TOKENIZER
    from unitok.tokenizer.model import UniTok

    return UniTok.from_pretrained(BUNDLED_TOKENIZER).eval().requires_grad_(False)
