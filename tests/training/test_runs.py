"""Never lose a run: run folders that refuse to be overwritten, safe exports, honest resume, one-line errors.

Most rows call `unitok.cli.main` in this process (the same function the console script runs) so that a table of
bad inputs costs milliseconds each; the fault tests (a real second process, SIGINT, SIGKILL) use subprocesses.
"""
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import unitok  # noqa: F401  (first: makes torchvision importable on CPU-only torch)
from unitok import cli
from unitok.training.runs import RunFolderError, RunLock, claim_run_folder, holds_run, staged_folder


ROOT = Path(__file__).resolve().parents[2]

def _digest(folder: Path) -> dict:
    """{relative path: sha256} of every file under `folder`: equal digests = nothing was touched."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def finished_run(cli_run, tmp_path):
    """A private copy of the shared finished CLI run (24 steps) that a test may try to destroy."""
    run = tmp_path / "run"
    shutil.copytree(cli_run.pristine, run)
    return run


@pytest.fixture
def cli_call(capsys):
    """cli_call(*args) -> (exit code, stdout, stderr) of `unitok *args` run in this process."""

    def call(*args):
        try:
            code = cli.main([str(a) for a in args])
        except SystemExit as e:  # argparse's own usage errors
            code = e.code
        out = capsys.readouterr()
        return code, out.out, out.err

    return call


def _one_line_error(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("note:")]
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    assert lines[0].startswith(f"unitok {command}: error: "), lines[0]
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------
# 1. A run folder belongs to one run
# ---------------------------------------------------------------------------------------------------------------
def test_train_into_a_finished_run_refuses_and_touches_nothing(finished_run, cli_call, cli_run):
    before = _digest(finished_run)
    code, _, err = cli_call(*cli_run.train_args, "--out", finished_run)
    line = _one_line_error(err, "train")
    assert code == 2 and "already holds a run" in line and "--resume" in line and "--overwrite" in line
    assert _digest(finished_run) == before


def test_overwrite_moves_the_old_run_aside(finished_run, cli_call, tiny_set_args):
    before = _digest(finished_run)
    code, _, err = cli_call("train", "--steps", "2", *tiny_set_args, "--out", finished_run, "--overwrite")
    assert code == 0, err
    aside = [p for p in finished_run.parent.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and _digest(aside[0]) == before          # the old run, byte for byte
    assert f"moved the previous run in {finished_run} aside" in err
    assert json.loads((finished_run / "summary.json").read_text())["steps"] == 2
    assert not (finished_run / ".lock").exists()                    # released at the end


def test_a_locked_folder_is_refused_with_the_holders_pid(tmp_path, cli_call, tiny_set_args):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run = tmp_path / "run"
        run.mkdir()
        (run / ".lock").write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename,
                                               "command": "unitok train", "started": "now"}))
        code, _, err = cli_call("train", "--steps", "2", *tiny_set_args, "--out", run)
        line = _one_line_error(err, "train")
        assert code == 2 and f"in use by process {holder.pid}" in line
        assert not holds_run(run)
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale and is taken over with a note
    code, _, err = cli_call("train", "--steps", "2", *tiny_set_args, "--out", run)
    assert code == 0, err
    assert f"taking over the lock of {run} from process {holder.pid}" in err


def test_lock_is_exclusive_reentrant_and_released(tmp_path):
    run = tmp_path / "run"
    with claim_run_folder(run) as mode:
        assert mode == "new" and (run / ".lock").is_file()
        assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
        with RunLock(run):                                # the same process may nest
            pass
        assert (run / ".lock").is_file()                  # still held by the outer claim
    assert not (run / ".lock").exists()
    (run / "config.json").write_text("{}")
    with pytest.raises(RunFolderError, match="already holds a run"):
        with claim_run_folder(run):
            pass
    with pytest.raises(RunFolderError, match="contradict"):
        with claim_run_folder(run, resume=True, overwrite=True):
            pass


def test_a_second_real_trainer_is_refused_and_sigint_prints_one_line(tmp_path, cli_call, tiny_set_args,
                                                                      subprocess_env):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "unitok.cli", "train", "--steps", "100000", *tiny_set_args,
           "--set", "checkpoint_every=5", "--out", str(run)]
    log = tmp_path / "train.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=subprocess_env, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not ((run / "checkpoint.pt").exists() and (run / ".lock").exists()):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the first trainer never wrote a checkpoint"
            time.sleep(0.05)
        code, _, err = cli_call("train", "--out", run, "--resume")
        assert code == 2 and f"in use by process {proc.pid}" in _one_line_error(err, "train")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    text = log.read_text()
    assert "Traceback" not in text
    last = [line for line in text.splitlines() if line.strip()][-1]
    assert last.startswith("unitok train: interrupted: stopped at step ")
    saved = int(torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)["step"])
    assert f"the last checkpoint is step {saved}" in last and f"unitok train --out {run} --resume" in last
    assert not (run / ".lock").exists()


# ---------------------------------------------------------------------------------------------------------------
# 2. Exports never destroy
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dest", [".", "best", "best/again"])
def test_export_into_its_own_run_is_refused(finished_run, cli_call, dest):
    before = _digest(finished_run)
    code, _, err = cli_call("export", finished_run, finished_run / dest)
    assert code == 2 and "inside (or contains) the source" in _one_line_error(err, "export")
    assert _digest(finished_run) == before


def test_export_into_a_non_empty_folder_needs_overwrite_and_moves_aside(finished_run, cli_call, tmp_path):
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    code, _, err = cli_call("export", finished_run, dest)
    assert code == 2 and "is not empty" in _one_line_error(err, "export") and "--overwrite" in err
    assert (dest / "notes.txt").read_text() == "mine" and len(list(dest.iterdir())) == 1
    code, out, err = cli_call("export", finished_run, dest, "--overwrite")
    assert code == 0, err
    assert (dest / "model.safetensors").is_file() and not (dest / "notes.txt").exists()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("model.old-")]
    assert len(aside) == 1 and (aside[0] / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model.tmp-")]   # no temporary left


def test_sigkill_during_export_leaves_nothing_or_everything(finished_run, tmp_path, subprocess_env):
    for delay in (0.8, 1.6, 2.4, 3.2):
        dest = tmp_path / f"export-{delay}"
        proc = subprocess.Popen([sys.executable, "-m", "unitok.cli", "export", str(finished_run), str(dest)],
                                env=subprocess_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        if dest.exists():   # renamed into place only when complete
            assert sorted(p.name for p in dest.iterdir()) == ["config.json", "eval_history.jsonl", "model.safetensors",
                                                              "summary.json"]
            unitok.UniTok.from_pretrained(dest)


def test_staged_folder_leaves_dest_untouched_on_error(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staged_folder(dest) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("boom")
    assert not dest.exists() and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# 3. Resume is honest
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, expected", [
    (["--preset", "small"], "(from --preset small) (saved run: "),
    (["--data", "fashion-mnist"], "data.name='fashion-mnist' (saved run: 'shapes')"),
    (["--set", "num_codebooks=2"], "num_codebooks=2 (saved run: 4)"),
    (["--set", "lr=1e-3"], "train.lr=0.001 (saved run: 0.0005"),
    (["--set", "num_codebooks=2", "--data", "fashion-mnist"], "; "),   # every conflict, listed together
])
def test_resume_with_conflicting_settings_is_refused(finished_run, cli_call, args, expected):
    before = _digest(finished_run)
    code, _, err = cli_call("train", "--out", finished_run, "--resume", "--steps", "30", *args)
    line = _one_line_error(err, "train")
    assert code == 2 and "--resume conflicts with the run saved in" in line and expected in line
    assert _digest(finished_run) == before


@pytest.mark.parametrize("steps", [[], ["--steps", "10"], ["--steps", "24"]])
def test_resume_with_nothing_to_do_changes_nothing(finished_run, cli_call, steps):
    before = _digest(finished_run)
    mtime = (finished_run / "config.json").stat().st_mtime_ns
    code, out, err = cli_call("train", "--out", finished_run, "--resume", *steps)
    assert code == 0, err
    assert "has already trained 24 steps" in out and "nothing to do" in out
    assert _digest(finished_run) == before and (finished_run / "config.json").stat().st_mtime_ns == mtime


def test_resume_with_the_original_command_line_is_accepted(finished_run, cli_call, cli_run):
    # the same --preset and --set overrides the run was started with are no conflict
    code, out, err = cli_call(*cli_run.train_args, "--out", finished_run, "--resume")
    assert code == 0, err
    assert f"has already trained {cli_run.steps} steps" in out


# ---------------------------------------------------------------------------------------------------------------
# 4 + 5. Inputs checked where they enter; one line, not a traceback
# ---------------------------------------------------------------------------------------------------------------
BAD_TRAIN_SETTINGS = [
    (["--steps", "-1"], "steps=-1 is not allowed; expected a number > 0"),
    (["--steps", "0"], "steps=0 is not allowed"),
    (["--set", "batch_size=0"], "batch_size=0 is not allowed"),
    (["--set", "patch_size=0"], "patch_size=0 is not allowed"),
    (["--set", "num_heads=0"], "num_heads=0 is not allowed"),
    (["--set", "lr=fast"], "setting 'lr' expects a float"),
    (["--set", "device=cuda"], "no CUDA GPU"),
    (["--set", "device=tpu9"], "is not a device name"),
    (["--data", "folder"], "--data folder needs --data-path"),
    (["--set", "lr"], "must look like key=value"),
]


@pytest.mark.parametrize("args, expected", BAD_TRAIN_SETTINGS, ids=[" ".join(a) for a, _ in BAD_TRAIN_SETTINGS])
def test_bad_training_settings_fail_in_one_line(tmp_path, cli_call, tiny_set_args, args, expected):
    if "cuda" in " ".join(args) and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run = tmp_path / "run"
    code, _, err = cli_call("train", *tiny_set_args, *args, "--out", run)
    assert code == 2 and expected in _one_line_error(err, "train")
    assert not holds_run(run)


def test_unwritable_out_is_found_before_any_work(tmp_path, cli_call, tiny_set_args):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err = cli_call("train", *tiny_set_args, "--out", blocker / "run")
    assert code == 2 and "cannot write to" in _one_line_error(err, "train")


def _corrupt(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _malicious(path: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > /dev/null",))

    with open(path, "wb") as f:
        pickle.dump({"model": Payload()}, f)


CORRUPTIONS = {
    "truncated safetensors": ("best/model.safetensors", _corrupt, ["eval", "{run}", "--fid", "none"],
                              "model.safetensors"),
    "truncated checkpoint": ("checkpoint.pt", _corrupt, ["train", "--out", "{run}", "--resume", "--steps", "30"],
                             "checkpoint.pt"),
    "malicious checkpoint": ("checkpoint.pt", _malicious, ["train", "--out", "{run}", "--resume", "--steps", "30"],
                             "may contain code"),
    "mistyped config value": ("best/config.json",
                              lambda p: p.write_text(p.read_text().replace('"width": 64', '"width": "64px"')),
                              ["eval", "{run}", "--fid", "none"], "width='64px' has the wrong type"),
    "missing config key": ("best/config.json",
                           lambda p: p.write_text(json.dumps({k: v for k, v in json.loads(p.read_text()).items()
                                                              if k != "latent_dim"})),
                           ["export", "{run}", "{run}-export"], "keys ['latent_dim'] are missing"),
    "config not JSON": ("config.json", lambda p: p.write_text("{oops"), ["eval", "{run}", "--fid", "none"],
                        "is not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_damaged_run_files_fail_in_one_line_naming_the_file(finished_run, cli_call, case):
    name, damage, argv, expected = CORRUPTIONS[case]
    damage(finished_run / name)
    before = _digest(finished_run)
    code, _, err = cli_call(*[a.format(run=finished_run) for a in argv])
    line = _one_line_error(err, argv[0])
    assert code == 2 and expected in line
    if "checkpoint" in case or "safetensors" in case:
        assert name.split("/")[-1] in line
    assert "weights_only=False" not in err and "weights_only" not in line.replace("weights_only=True", "")
    assert _digest(finished_run) == before


def test_debug_shows_the_traceback(tmp_path, cli_call, tiny_set_args):
    with pytest.raises(ValueError, match="batch_size=0"):
        cli.main(["train", *tiny_set_args, "--set", "batch_size=0", "--out", str(tmp_path / "r"), "--debug"])


def test_images_are_checked_where_they_enter():
    model = unitok.UniTok(unitok.get_preset("tiny").model).eval()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with pytest.raises(ValueError, match="looks like 0-255"):
        model.encode((images + 1) * 127.5)
    with pytest.raises(ValueError, match=r"integer pixels: use images.float\(\) / 127.5 - 1"):
        model.encode(((images + 1) * 127.5).to(torch.uint8))
    with pytest.raises(ValueError, match="batch is empty"):
        model.encode(images[:0])
    with torch.no_grad():
        assert torch.equal(model.encode(images.double()), model.encode(images))        # converted, same codes
        assert torch.equal(model.encode(images.half().float()), model.encode(images.half()))


def _gray(mode: str, value01: float, size: int = 12) -> Image.Image:
    if mode == "I;16":
        return Image.fromarray(np.full((size, size), round(value01 * 65535), np.uint16))
    if mode == "I":
        return _gray("I;16", value01, size).convert("I")
    if mode == "F":
        return Image.fromarray(np.full((size, size), value01, np.float32))
    rgb = Image.new("RGB", (size, size), (round(value01 * 255),) * 3)
    if mode == "CMYK":
        return rgb.convert("CMYK")
    if mode == "LA":
        return rgb.convert("LA")
    if mode == "P":
        return rgb.convert("P")
    return rgb.convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "L", "I;16", "I", "F", "CMYK", "LA", "P", "RGBA"])
@pytest.mark.parametrize("value01", [0.25, 0.75])
def test_every_pil_mode_loads_with_the_right_brightness(mode, value01):
    from unitok.data.images import pil_to_tensor

    image = _gray(mode, value01)
    assert image.mode == mode
    tensor = pil_to_tensor(image, 8)
    assert tensor.shape == (3, 8, 8)
    assert abs(float(tensor.mean()) - (value01 * 2 - 1)) < 0.02, (mode, float(tensor.mean()))


def test_skipped_inputs_are_counted_by_reason_and_listed(tmp_path, cli_call, tiny_set_args):
    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for i in range(6):
        Image.new("RGB", (40, 40), (40 * i, 100, 200)).save(folder / f"ok{i}.png")
        rows.append({"image": f"ok{i}.png", "caption": f"picture {i}"})
    (folder / "broken.png").write_bytes(b"not a png")
    rows += [{"image": "broken.png", "caption": "bad"}, {"image": "gone.png", "caption": "missing"},
             {"image": "ok0.png", "caption": ""}]
    (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    code, _, err = cli_call("train", "--data", "folder", "--data-path", folder, "--steps", "1", *tiny_set_args,
                            "--set", "batch_size=4", "--out", run)
    assert code == 0, err
    assert "skipped 3 input files (" in err and "1 missing file" in err and "1 empty caption" in err
    assert f"the full list is in {run / 'skipped.txt'}" in err
    listed = (run / "skipped.txt").read_text().splitlines()
    assert len(listed) == 3 and any(line.startswith(str(folder / "gone.png")) for line in listed)


@pytest.mark.parametrize("module, run", [("unitok.cli.generator", str(ROOT / "data" / "tiny-generator")),
                                         ("unitok.cli.mllm", str(ROOT / "data" / "tiny-mllm"))])
def test_module_export_refuses_a_non_empty_folder_in_one_line(tmp_path, module, run):
    import subprocess
    import sys

    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    for source in (run, str(tmp_path / "no-such-run")):
        res = subprocess.run([sys.executable, "-m", module, "export", source, str(dest)], cwd=ROOT,
                             capture_output=True, text=True, timeout=240)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and "error:" in res.stderr
    assert [p.name for p in dest.iterdir()] == ["keep.txt"] and (dest / "keep.txt").read_text() == "mine"
