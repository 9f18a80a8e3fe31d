"""The rules every training command keeps, tested once for all three (table-driven): the tokenizer's `unitok train`,
the generator's `unitok train-generator` and the unified model's `unitok train-mllm`.

A fourth model gets these tests by adding a row to TRAINERS. Every run here is a few steps of a tiny model, run in
this process through `unitok.cli.main` (the function the console script runs); the SIGKILL case uses a child
process that kills itself right after a step (so the kill lands at a known point, without a race).
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import unitok  # noqa: F401  (first: makes torchvision importable on CPU-only torch)
from unitok import cli
from unitok.data.bundled import BUNDLED_TOKENIZER
from unitok.checkpoint import read_torch

pytestmark = pytest.mark.slow

STEPS, CHECKPOINT_EVERY = 4, 2
SMALL_TOKENIZER = ["width=64", "encoder_depth=1", "decoder_depth=1", "num_heads=2", "latent_dim=16",
                   "num_codebooks=4", "codebook_size=64", "text_width=32", "text_layers=1", "text_heads=2",
                   "context_length=16", "batch_size=8", "eval_images=16", "log_every=1", "eval_every=0"]
SMALL_GENERATOR = ["width=32", "depth=1", "num_heads=2", "depth_width=32", "depth_heads=2", "batch_size=8",
                   "train_images=64", "eval_images=16", "log_every=1", "eval_every=2"]
SMALL_MLLM = ["width=64", "depth=1", "num_heads=2", "depth_width=32", "depth_heads=2", "batch_size=16",
              "train_images=64", "eval_images=8", "log_every=1"]


def _sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


# name -> (the command line that trains a tiny run, a setting a resume must refuse, the weights' state-dict key)
TRAINERS = {
    "tokenizer": (["train", "--preset", "tiny", "--data", "shapes", *_sets(SMALL_TOKENIZER)], "lr=0.5"),
    "generator": (["train-generator", "--tokenizer", str(BUNDLED_TOKENIZER), "--data", "shapes",
                   "--samples-per-prompt", "0", *_sets(SMALL_GENERATOR)], "lr=0.5"),
    "mllm": (["train-mllm", "--tokenizer", str(BUNDLED_TOKENIZER), "--data", "shapes", "--no-t2i-eval",
              *_sets(SMALL_MLLM)], "lr=0.5"),
}
# bf16 on the CPU where it is emulated too (the path an AMX machine takes by default), two threads: the settings in
# which a non-deterministic kernel shows
COMMON = ["--set", f"checkpoint_every={CHECKPOINT_EVERY}", "--set", "cpu_bf16=on"]


def command(name, steps=STEPS):
    return [*TRAINERS[name][0], *COMMON, "--steps", str(steps)]


@pytest.fixture(scope="module", autouse=True)
def own_cache(tmp_path_factory):
    """Codes and scenes extracted for these runs go to a private cache (and the child process uses it too)."""
    old = os.environ.get("UNITOK_DATA_CACHE")
    os.environ["UNITOK_DATA_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("UNITOK_DATA_CACHE")
    else:
        os.environ["UNITOK_DATA_CACHE"] = old


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def call(*args, capsys=None):
    """`unitok *args` in this process -> (exit code, stdout, stderr)."""
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr() if capsys is not None else None
    return code, (out.out if out else ""), (out.err if out else "")


def digest(folder: Path) -> dict:
    """{relative path: (sha256, mtime)} of every file: equal digests = not one byte (nor a timestamp) changed."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def weights(folder: Path) -> dict:
    return read_torch(folder / "checkpoint.pt")["model"]


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """name -> a finished STEPS-step run folder (made once per trainer, with two threads); tests copy it."""
    made = {}

    def get(name):
        if name not in made:
            threads = torch.get_num_threads()
            torch.set_num_threads(2)
            try:
                out = tmp_path_factory.mktemp(name) / "run"
                code, _, _ = call(*command(name), "--out", out)
                assert code == 0, f"the {name} run failed"
            finally:
                torch.set_num_threads(threads)
            made[name] = out
        return made[name]

    return get


@pytest.fixture
def run_copy(finished, tmp_path):
    def copy(name):
        dest = tmp_path / "run"
        shutil.copytree(finished(name), dest)
        return dest

    return copy


@pytest.mark.parametrize("name", TRAINERS)
def test_a_finished_run_is_refused_and_not_one_byte_changes(name, run_copy, capsys):
    run = run_copy(name)
    before = digest(run)
    code, _, err = call(*command(name), "--out", run, capsys=capsys)
    assert code == 2 and "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert digest(run) == before


@pytest.mark.parametrize("name", TRAINERS)
@pytest.mark.parametrize("steps", [STEPS, 1])
def test_resume_with_nothing_to_do_leaves_every_byte(name, steps, run_copy, capsys):
    run = run_copy(name)
    before = digest(run)
    code, out, err = call(*command(name, steps), "--out", run, "--resume", capsys=capsys)
    assert code == 0, err
    assert "nothing to do" in out
    assert digest(run) == before          # eval.jsonl, config.json, the checkpoint: untouched


@pytest.mark.parametrize("name", TRAINERS)
def test_a_conflicting_resume_is_refused_with_every_conflict(name, run_copy, capsys):
    run = run_copy(name)
    before = digest(run)
    code, _, err = call(*command(name), "--set", TRAINERS[name][1], "--set", "seed=7", "--out", run, "--resume",
                        capsys=capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert "lr=0.5" in err and "seed=7" in err and "saved run" in err
    assert digest(run) == before


@pytest.mark.parametrize("name", TRAINERS)
def test_an_unknown_setting_fails_in_one_line_before_the_folder_exists(name, tmp_path, capsys):
    code, _, err = call(*command(name), "--set", "no_such_key=1", "--out", tmp_path / "new", capsys=capsys)
    assert code == 2 and "unknown setting 'no_such_key'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("name", TRAINERS)
def test_the_same_command_plus_resume_continues_it(name, run_copy, two_threads, capsys):
    run = run_copy(name)
    code, _, err = call(*command(name, STEPS + 2), "--out", run, "--resume", capsys=capsys)
    assert code == 0, err
    assert read_torch(run / "checkpoint.pt")["step"] == STEPS + 2
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 3))


@pytest.mark.parametrize("name", TRAINERS)
def test_two_runs_with_one_seed_end_with_identical_weights(name, finished, tmp_path, two_threads):
    code, _, _ = call(*command(name), "--out", tmp_path / "again")
    assert code == 0
    assert_same_weights(weights(tmp_path / "again"), weights(finished(name)))


KILL_AFTER_STEP = """
import os, signal, sys
import unitok
from unitok.training.trainer import TrainerBase
step = TrainerBase.step
def step_then_die(self):
    metrics = step(self)
    if self.step_count == {kill_at}:     # after the step's log line, before its checkpoint: SIGKILL
        os.kill(os.getpid(), signal.SIGKILL)
    return metrics
TrainerBase.step = step_then_die
from unitok.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("name", TRAINERS)
def test_sigkill_after_a_checkpoint_then_resume_gives_identical_weights(name, finished, tmp_path, subprocess_env,
                                                                         two_threads):
    run = tmp_path / "killed"
    # two threads in the child as in this process (torch.set_num_threads sets both OpenMP and MKL)
    env = {**subprocess_env, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2",
           "UNITOK_DATA_CACHE": os.environ["UNITOK_DATA_CACHE"]}
    script = KILL_AFTER_STEP.format(kill_at=CHECKPOINT_EVERY + 1)
    proc = subprocess.run([sys.executable, "-c", script, *command(name), "--out", str(run)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert read_torch(run / "checkpoint.pt")["step"] == CHECKPOINT_EVERY
    assert len((run / "metrics.jsonl").read_text().splitlines()) == CHECKPOINT_EVERY + 1   # one line past it
    code, _, _ = call(*command(name), "--out", run, "--resume")
    assert code == 0
    assert_same_weights(weights(run), weights(finished(name)))
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))        # the line logged after the checkpoint was dropped, then redone
