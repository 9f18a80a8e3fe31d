"""The command line end to end, in subprocesses: `unitok train`, `unitok eval`, `unitok export`, `unitok presets`,
and what bad arguments do. CPU only, a small model (see conftest.tiny_overrides / cli_run)."""
import json
import math
import os
import stat

import numpy as np
import pytest
import torch

import unitok  # noqa: F401  (first: makes torchvision importable on CPU-only torch)
from unitok import cli
from unitok.data.shapes_dataset import ShapesDataset

pytestmark = pytest.mark.slow  # every test here starts interpreters (seconds each) or trains a small model


def _check_png(path, size=None):
    from PIL import Image

    assert path.is_file(), f"{path} was not written"
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(path) as image:
        image.load()
        if size is not None:
            assert image.size == size
        return np.asarray(image)


def _assert_fraction(x):
    assert isinstance(x, float) and 0.0 <= x <= 1.0, x


def test_train_writes_summary_and_pictures(cli_run):
    summary = cli_run.summary
    assert summary["steps"] == cli_run.steps
    assert isinstance(summary["train_seconds"], (int, float)) and summary["train_seconds"] > 0
    assert isinstance(summary["psnr"], float) and 5.0 < summary["psnr"] < 60.0          # dB of [-1, 1] images
    assert -1.0 <= summary["ssim"] <= 1.0
    usage = summary["codebook_usage"]
    assert isinstance(usage, list) and len(usage) == 4                                   # one per sub-codebook
    for u in usage:
        _assert_fraction(u)
    _assert_fraction(summary["zero_shot_top1"])
    _assert_fraction(summary["zero_shot_top1_heldout"])
    assert summary["model"]["num_codebooks"] == 4 and summary["data"]["name"] == "shapes"
    assert summary["eval_images"] == 64
    run = cli_run.dir
    # 16 originals over their 16 reconstructions, 32 px tiles with 2 px padding
    grid = _check_png(run / "reconstructions.png", size=(16 * 34 + 2, 2 * 34 + 2))
    assert grid.std() > 0
    _check_png(run / "codebook_usage.png")
    for name in ("config.json", "checkpoint.pt", "metrics.jsonl", "eval.jsonl", "best/model.safetensors"):
        assert (run / name).is_file(), name
    assert len((run / "metrics.jsonl").read_text().splitlines()) == cli_run.steps
    out = cli_run.proc.stdout
    assert f"steps: {cli_run.steps}" in out and "psnr:" in out and "zero_shot_top1:" in out


def test_eval_reevaluates_the_best_checkpoint(cli_run, run_cli):
    proc = run_cli("eval", cli_run.dir, "--fid", "none")
    assert "psnr:" in proc.stdout
    summary = json.loads((cli_run.dir / "summary.json").read_text())
    assert summary["evaluated"].endswith("best")
    assert summary["steps"] == cli_run.steps                         # kept from the training summary
    assert summary["train_seconds"] == cli_run.summary["train_seconds"]
    # same weights (best = the final model, saved in fp32), same eval images: the same numbers
    for key in ("psnr", "ssim", "codebook_usage", "zero_shot_top1", "zero_shot_top1_heldout"):
        assert summary[key] == pytest.approx(cli_run.summary[key], rel=1e-6, abs=1e-9), key
    assert "fid" not in summary
    _check_png(cli_run.dir / "reconstructions.png")
    _check_png(cli_run.dir / "codebook_usage.png")


@pytest.fixture(scope="module")
def quick_runs(start_cli, tmp_path_factory):
    """The cheap commands, started together (each is mostly interpreter start-up), then collected."""
    tmp = tmp_path_factory.mktemp("quick")
    (tmp / "not_a_run").mkdir()
    waits = {
        "presets": start_cli("presets"),
        "unknown_key": start_cli("train", "--steps", "2", "--out", tmp / "run", "--set", "no_such_key=3"),
        "not_a_run": start_cli("eval", tmp / "not_a_run"),
    }
    return tmp, {name: wait() for name, wait in waits.items()}


def test_presets_lists_every_preset(quick_runs):
    proc = quick_runs[1]["presets"]
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    lines = out.splitlines()
    for name in ("tiny", "small", "base", "paper"):
        assert any(line.split()[:1] == [name] for line in lines if line.strip()), f"{name} missing from:\n{out}"
    assert "M params" in out


@pytest.fixture(scope="module")
def exported(cli_run, run_cli, tmp_path_factory):
    dest = tmp_path_factory.mktemp("export") / "tiny-shapes"
    proc = run_cli("export", cli_run.dir, dest, umask=0o022)
    return dest, proc


def test_export_writes_a_loadable_fp16_model(exported, cli_run):
    from safetensors.torch import load_file

    dest, proc = exported
    assert "exported" in proc.stdout
    assert (dest / "config.json").is_file() and (dest / "model.safetensors").is_file()
    tensors = load_file(str(dest / "model.safetensors"))
    floats = {k: v.dtype for k, v in tensors.items() if v.is_floating_point()}
    assert floats and set(floats.values()) == {torch.float16}
    assert json.loads((dest / "summary.json").read_text())["steps"] == cli_run.steps

    model = unitok.UniTok.from_pretrained(dest).eval()
    reference = unitok.UniTok.from_pretrained(cli_run.dir / "best").eval()
    ds = ShapesDataset(32, split="test", length=8)
    images = torch.stack([ds[i]["image"] for i in range(8)])
    with torch.no_grad():
        recon = model.reconstruct(images)
        recon_ref = reference.reconstruct(images)
        codes = model.encode(images)
    assert recon.shape == images.shape and torch.isfinite(recon).all()
    assert codes.shape == (8, 8, 8, 4)
    # fp16 storage changes the weights by ~1e-3 relative: the reconstructions stay close to the fp32 model's
    mse = torch.mean((recon.clamp(-1, 1) - recon_ref.clamp(-1, 1)) ** 2).item()
    assert 10 * math.log10(4.0 / max(mse, 1e-12)) > 30.0
    # and it reconstructs: much closer to the images than a blank prediction
    assert torch.mean((recon.clamp(-1, 1) - images) ** 2) < 0.5 * torch.mean(images ** 2)


def test_export_files_respect_the_umask(exported):
    dest, _ = exported
    for name in ("model.safetensors", "config.json"):
        mode = stat.S_IMODE(os.stat(dest / name).st_mode)
        assert mode == 0o644, f"{name}: {oct(mode)}, expected 0o644 under umask 022"


def test_unknown_set_key_fails_and_names_the_valid_keys(quick_runs):
    tmp, procs = quick_runs
    out, proc = tmp / "run", procs["unknown_key"]
    assert proc.returncode != 0
    assert "unknown setting 'no_such_key'" in proc.stderr
    assert "num_codebooks" in proc.stderr and "batch_size" in proc.stderr        # the valid keys are listed
    assert not out.exists()                                                    # failed before creating the run


def test_eval_of_a_folder_that_is_not_a_run_fails_clearly(quick_runs):
    proc = quick_runs[1]["not_a_run"]
    assert proc.returncode != 0
    assert "is not a run folder" in proc.stderr and "config.json" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_other_bad_arguments_fail_clearly(tmp_path, capsys, cli_run):
    # (in-process: the same `main` the console script calls, without paying for another interpreter)
    with pytest.raises(SystemExit) as excinfo:
        cli.main(["train", "--preset", "huge", "--out", str(tmp_path / "x")])
    assert excinfo.value.code == 2 and "invalid choice: 'huge'" in capsys.readouterr().err
    assert cli.main(["train", "--data", "folder", "--out", str(tmp_path / "y"), "--steps", "1"]) == 2
    assert "needs --data-path" in capsys.readouterr().err
    # a run folder with a config but no best checkpoint yet
    (tmp_path / "young").mkdir()
    (tmp_path / "young" / "config.json").write_text((cli_run.pristine / "config.json").read_text())
    assert cli.main(["eval", str(tmp_path / "young"), "--fid", "none"]) == 2
    assert "has no best checkpoint" in capsys.readouterr().err
    assert cli.main(["train", "--out", str(tmp_path / "z"), "--set", "lr"]) == 2
    assert "must look like key=value" in capsys.readouterr().err
