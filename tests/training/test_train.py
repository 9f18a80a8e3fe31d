"""Tests for unitok.training.tokenizer_trainer: a short real training run, the lr schedule, determinism, exact resume after SIGKILL,
DDP on two CPU processes, folder data, the NaN guard, checkpoint/config mismatches and evaluation.

CPU only, small models (see conftest.tiny_overrides). Nothing here asserts on time: the machine is shared.
Thresholds of the training run were calibrated on shapes with this exact configuration (seed 0, 200 steps, lr 2e-3,
K=64); see the comments next to each assertion for the measured values.
"""
import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

import unitok  # noqa: F401  (first: makes torchvision importable on CPU-only torch)
from unitok import cli
from unitok.tokenizer.config import TrainConfig, apply_overrides, get_preset
from unitok.data.datasets import build_datasets
from unitok.evaluation.tokenizer import evaluate_model
from unitok.training.tokenizer_trainer import Trainer
from unitok.training.trainer import NonFiniteLossError, StepBatchSampler, lr_at

TRAIN_STEPS = 200
LOSS_TERMS = ("loss", "l1", "l2", "vq", "clip")


def _trainer(overrides, extra=(), **kwargs):
    return Trainer.from_preset("tiny", data="shapes", overrides=[*overrides, *extra], **kwargs)


def _state(module_or_dict):
    sd = module_or_dict.state_dict() if hasattr(module_or_dict, "state_dict") else module_or_dict
    return {k: v.detach().clone() for k, v in sd.items()}


def _assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"tensor {k!r} differs"


def _read_jsonl(path: Path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------------------
# 1. A short real training run
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tiny_overrides):
    trainer = _trainer(tiny_overrides, [f"steps={TRAIN_STEPS}", "lr=2e-3", "seed=0", "checkpoint_every=0"])
    before = trainer.evaluate()
    history = trainer.run(progress=False)
    after = trainer.evaluate()
    return trainer, before, after, history


@pytest.mark.slow
def test_training_loss_falls(trained):
    trainer, _, _, history = trained
    assert trainer.step_count == TRAIN_STEPS and len(history) == TRAIN_STEPS
    losses = np.array([h["loss"] for h in history])
    assert np.isfinite(losses).all()
    first, last = losses[:5].mean(), losses[-20:].mean()
    # measured (seed 0): first 5 = 3.78, last 20 = 2.09 (ratio 0.55); seeds 1, 2: 0.36, 0.42
    assert last < 0.7 * first, (first, last)
    # the reconstruction terms alone fall much further (measured l2 ratio 0.11; seeds 1, 2: 0.17, 0.16)
    l2 = np.array([h["l2"] for h in history])
    assert l2[-20:].mean() < 0.3 * l2[:5].mean()


@pytest.mark.slow
def test_training_improves_eval_psnr_and_keeps_codebooks_alive(trained):
    _, before, after, _ = trained
    # measured: untrained 10.0 dB (seeds 0-2: 9.5-10.2), after 200 steps 20.8 dB (seeds 0-2: 19.4-20.8)
    assert before["psnr"] < 13.0
    assert after["psnr"] > 16.0
    assert after["psnr"] > before["psnr"] + 5.0
    # measured SSIM: -0.01..0.015 untrained, 0.68-0.72 trained
    assert after["ssim"] > 0.45 > before["ssim"]
    # Codebook usage over 64 eval images x 64 tokens = 4096 tokens, K = 64: an untrained model already spreads
    # over most codes (measured mean 0.87), and training on flat-background shapes may concentrate them a little
    # (measured mean 0.93 for seed 0, 0.76-0.86 for seeds 1-2, min per sub-codebook 0.61). So assert a floor:
    # no collapsed sub-codebook, most codes alive.
    usage = after["codebook_usage"]
    assert len(usage) == 4 and all(0.0 <= u <= 1.0 for u in usage)
    assert np.mean(usage) > 0.5, usage
    assert min(usage) > 0.3, usage


@pytest.mark.slow
def test_history_is_a_dataframe_with_the_loss_terms(trained):
    pd = pytest.importorskip("pandas")
    trainer, _, _, history = trained
    assert isinstance(history, list) and all(isinstance(h, dict) for h in history)
    df = pd.DataFrame(history)
    assert {"step", "loss", "l1", "l2", "vq", "clip", "lr"} <= set(df.columns)
    assert df["step"].tolist() == list(range(1, TRAIN_STEPS + 1))
    assert df[list(LOSS_TERMS) + ["lr"]].notna().all().all()
    # the total is the weighted sum of the terms (weights 0.2, 1, 1, 1, and the hard negatives' when on)
    cfg = trainer.model_config
    expected = 0.2 * df["l1"] + df["l2"] + df["vq"] + df["clip"]
    if cfg.hard_negative_weight:
        expected = expected + cfg.hard_negative_weight * df["hard_negative"]
    np.testing.assert_allclose(df["loss"], expected, rtol=1e-5)


def test_lr_schedule_warmup_then_cosine_to_a_tenth():
    cfg = TrainConfig(steps=1000, lr=1e-3, warmup_fraction=0.1, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(cfg.steps + 1)]
    assert lrs[0] == pytest.approx(1e-3 / 100)
    assert lrs[99] == pytest.approx(1e-3) and lrs[100] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:100], lrs[1:100]))            # linear warm-up, increasing
    assert all(a >= b for a, b in zip(lrs[100:], lrs[101:]))            # then non-increasing
    assert lrs[550] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))           # halfway through the cosine
    assert lrs[999] == pytest.approx(1e-4, rel=1e-4) and lrs[999] >= 1e-4
    assert lrs[1000] == pytest.approx(1e-4) and lr_at(5000, cfg) == pytest.approx(1e-4)  # floor, never below


@pytest.mark.slow
def test_training_uses_the_schedule(trained):
    trainer, _, _, history = trained
    cfg = trainer.config
    assert [h["lr"] for h in history] == [lr_at(s, cfg) for s in range(TRAIN_STEPS)]
    warmup = max(1, int(cfg.warmup_fraction * cfg.steps))
    assert history[0]["lr"] == pytest.approx(cfg.lr / warmup)
    assert max(h["lr"] for h in history) == pytest.approx(cfg.lr)
    assert history[-1]["lr"] == pytest.approx(0.1 * cfg.lr, rel=1e-3)
    assert trainer.optimizer.param_groups[0]["lr"] == history[-1]["lr"]


def test_same_seed_is_bit_for_bit_repeatable_and_seeds_differ(tiny_overrides):
    def five_steps(seed):
        trainer = _trainer(tiny_overrides, [f"seed={seed}", "steps=50"])
        rows = [trainer.step() for _ in range(5)]
        return [{k: r[k] for k in (*LOSS_TERMS, "grad_norm", "psnr_batch")} for r in rows], trainer

    a, ta = five_steps(3)
    b, tb = five_steps(3)
    assert a == b                                   # exact float equality, every term, every step
    _assert_same_tensors(_state(ta.model), _state(tb.model))
    c, _ = five_steps(4)
    assert [r["loss"] for r in a] != [r["loss"] for r in c]
    assert all(ra["loss"] != rc["loss"] for ra, rc in zip(a, c))


# ---------------------------------------------------------------------------------------------------------------
# 2. Resume after SIGKILL equals the uninterrupted run
# ---------------------------------------------------------------------------------------------------------------
def _load_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["step"])


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted_run(cli_run, tmp_path, subprocess_env, run_cli):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "unitok.cli", *cli_run.train_args, "--out", str(out)]
    log = tmp_path / "killed.log"  # a file, not a pipe: a full pipe would stall the child
    with open(log, "w") as log_file:
        proc = subprocess.Popen(cmd, env=subprocess_env, stdout=log_file, stderr=subprocess.STDOUT)
    ckpt, metrics = out / "checkpoint.pt", out / "metrics.jsonl"
    seen_inodes, loaded_steps = set(), []
    deadline = time.monotonic() + 240
    try:
        while True:
            assert proc.poll() is None, ("the run ended before it could be killed; make it longer\n"
                                         + log.read_text()[-3000:])
            assert time.monotonic() < deadline, "the run never reached step 7"
            # Atomic rename: whenever checkpoint.pt exists it is a complete, loadable file.
            try:
                inode = ckpt.stat().st_ino
            except FileNotFoundError:
                inode = None
            if inode is not None and inode not in seen_inodes:
                seen_inodes.add(inode)
                loaded_steps.append(_load_step(ckpt))
            lines = metrics.read_text().count("\n") if metrics.exists() else 0
            if lines >= 7:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists()
    assert all(s % cli_run.checkpoint_every == 0 and 0 < s < cli_run.steps for s in loaded_steps), loaded_steps
    ckpt_step = _load_step(ckpt)
    assert cli_run.checkpoint_every * 2 <= ckpt_step < cli_run.steps
    logged = metrics.read_text().splitlines()  # (not parsed: the kill may have torn the last line)
    if len(logged) <= ckpt_step:
        # The kill landed right after a checkpoint: simulate a line logged after it, which resume must drop.
        with open(metrics, "a") as f:
            f.write(json.dumps({"step": ckpt_step + 1, "loss": 1e9}) + "\n")
    # A crash in the middle of a save leaves a temporary file next to the checkpoint; resume must ignore it.
    garbage = out / ".checkpoint.pt.crashed.tmp"
    garbage.write_bytes(os.urandom(4096))

    resume = run_cli(*cli_run.train_args, "--out", out, "--resume")
    assert f"(starting at step {ckpt_step})" in resume.stdout     # continued, not restarted from scratch

    resumed = _read_jsonl(metrics)
    steps = [m["step"] for m in resumed]
    assert steps == list(range(1, cli_run.steps + 1)), "metrics.jsonl must hold each step once, in order"
    for got, want in zip(resumed, cli_run.metrics):
        assert {k: got[k] for k in (*LOSS_TERMS, "lr", "grad_norm")} == \
               {k: want[k] for k in (*LOSS_TERMS, "lr", "grad_norm")}, f"step {got['step']} differs"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == cli_run.steps
    for key in ("psnr", "ssim", "codebook_usage", "zero_shot_top1", "zero_shot_top1_heldout",
                "retrieval_image_to_text_R@1", "perplexity"):
        assert summary[key] == cli_run.summary[key], key
    assert _load_step(ckpt) == cli_run.steps
    # the final weights are the uninterrupted run's, bit for bit
    ours = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]
    theirs = torch.load(cli_run.pristine / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    _assert_same_tensors(ours, theirs)


def test_resume_also_truncates_eval_log(tmp_path, tiny_overrides):
    extra = ["eval_images=16", "eval_every=3", "checkpoint_every=6", "steps=12"]
    out = tmp_path / "run"
    crashed = _trainer(tiny_overrides, extra, out_dir=out)
    crashed.run(9, progress=False)      # checkpoint at 6, evaluations at 3, 6, 9; then "the process dies"
    assert [e["step"] for e in _read_jsonl(out / "eval.jsonl")] == [3, 6, 9]
    resumed = _trainer(tiny_overrides, extra, out_dir=out, resume=True)
    assert resumed.step_count == 6 and [e["step"] for e in resumed.eval_history] == [3, 6]
    resumed.run(progress=False)
    assert [m["step"] for m in _read_jsonl(out / "metrics.jsonl")] == list(range(1, 13))
    assert [e["step"] for e in resumed.eval_history] == [3, 6, 9, 12]
    assert [e["step"] for e in _read_jsonl(out / "eval.jsonl")] == [3, 6, 9, 12]


# ---------------------------------------------------------------------------------------------------------------
# 3. DDP with two CPU processes (gloo)
# ---------------------------------------------------------------------------------------------------------------
def _torchrun(args, env, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode})\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def ddp_cli_run(tmp_path_factory, tiny_set_args, subprocess_env):
    out = tmp_path_factory.mktemp("ddp") / "run"
    proc = _torchrun(["-m", "unitok.cli", "train", "--preset", "tiny", "--data", "shapes", "--steps", "4",
                      "--out", str(out), "--fid", "proxy", *tiny_set_args, "--set", "eval_images=16",
                      "--set", "checkpoint_every=0"], subprocess_env)
    return out, proc


@pytest.mark.slow
def test_ddp_two_cpu_processes_only_rank0_writes(ddp_cli_run):
    out, proc = ddp_cli_run
    logged = _read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in logged] == [1, 2, 3, 4]          # one writer: no line twice
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and math.isfinite(summary["psnr"])
    assert _load_step(out / "checkpoint.pt") == 4
    assert len(_read_jsonl(out / "eval.jsonl")) == 1
    assert proc.stdout.count("training 32px UniTok") == 1          # rank 0 prints, rank 1 stays quiet
    assert proc.stdout.count("  steps: 4") == 1
    # images/s counts the global batch (2 ranks x 16)
    assert all(m["images_per_second"] > 0 for m in logged)


@pytest.mark.slow
def test_ddp_fid_counts_each_eval_image_once(ddp_cli_run):
    out, _ = ddp_cli_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_images"] == 16
    assert summary["fid_images"] == 16
    saved = json.loads((out / "config.json").read_text())
    model = unitok.UniTok.from_pretrained(out / "best")
    _, eval_data = build_datasets(saved["data"], model.config.image_size, saved["train"]["seed"])
    single = evaluate_model(model, {"recon": eval_data["recon"]}, batch_size=16, fid="proxy")
    assert summary["psnr"] == pytest.approx(single["psnr"], rel=1e-5)
    assert summary["fid"] == pytest.approx(single["fid"], rel=1e-4)


_DDP_SCRIPT = r'''
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
import unitok
from unitok.evaluation.codebook_stats import all_reduce_counts
from unitok.tokenizer.config import apply_overrides, get_preset
from unitok.data.datasets import build_datasets
from unitok.training.tokenizer_trainer import Trainer

out, overrides = Path(sys.argv[1]), json.loads(sys.argv[2])
preset = apply_overrides(get_preset("tiny"), overrides)
train, _ = build_datasets({"name": "shapes", "eval_images": 16}, preset.model.image_size, preset.train.seed)

class Recording(torch.utils.data.Dataset):
    def __init__(self, ds):
        self.ds, self.indices, self.captions = ds, [], []
    def __len__(self):
        return len(self.ds)
    def __getitem__(self, i):
        item = self.ds[i]
        self.indices.append(int(i))
        self.captions.append(item["caption"])
        return item

data = Recording(train)
trainer = Trainer(preset.model, preset.train, data, {}, out_dir=None)
losses = [trainer.step()["loss"] for _ in range(2)]
local = trainer.tracker.counts.clone()
reduced = all_reduce_counts(trainer.tracker)
params = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
torch.save({"params": params, "local": local, "reduced": reduced}, out / f"rank{trainer.rank}.pt")
(out / f"rank{trainer.rank}.json").write_text(json.dumps({
    "rank": trainer.rank, "world_size": trainer.world_size, "indices": data.indices, "captions": data.captions,
    "losses": losses, "total_tokens": trainer.tracker.total_tokens}))
torch.distributed.destroy_process_group()
'''


@pytest.mark.slow
def test_ddp_ranks_see_different_data_and_counts_are_all_reduced(tmp_path, tiny_overrides, subprocess_env):
    script = tmp_path / "ddp_probe.py"
    script.write_text(_DDP_SCRIPT)
    _torchrun([str(script), str(tmp_path), json.dumps(tiny_overrides)], subprocess_env)
    info = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    tensors = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [i["rank"] for i in info] == [0, 1] and all(i["world_size"] == 2 for i in info)
    bs = 16
    # two steps of 16 items per rank, in order
    assert all(len(i["indices"]) == 2 * bs for i in info)
    first = [i["indices"][:bs] for i in info]
    assert [i["captions"][:bs] for i in info][0] != [i["captions"][:bs] for i in info][1]
    assert not set(first[0]) & set(first[1]), "the ranks must see disjoint shards of the global batch"
    # the data order is a pure function of (seed, step): the two shards are exactly one 2 x 16 global batch
    n = len(build_datasets({"name": "shapes", "eval_images": 16}, 32, 0)[0])
    for step in (0, 1):
        shards = [i["indices"][step * bs:(step + 1) * bs] for i in info]
        for rank in (0, 1):
            assert shards[rank] == StepBatchSampler(n, bs, 0, rank, 2).indices_for_step(step)
        assert sorted(shards[0] + shards[1]) == sorted(StepBatchSampler(n, 2 * bs, 0).indices_for_step(step))
    # code counts: the all-reduced counts are the sum of both ranks' local counts, identical on both ranks
    local0, local1 = tensors[0]["local"], tensors[1]["local"]
    assert not torch.equal(local0, local1)
    assert torch.equal(tensors[0]["reduced"], local0 + local1)
    assert torch.equal(tensors[1]["reduced"], local0 + local1)
    tokens = 2 * bs * 64                      # per rank: 2 steps x 16 images x 64 tokens
    assert all(i["total_tokens"] == tokens for i in info)
    assert (tensors[0]["reduced"].sum(1) == 2 * tokens).all()
    # DDP averaged the gradients: both replicas hold the same weights
    assert torch.equal(tensors[0]["params"], tensors[1]["params"])


# ---------------------------------------------------------------------------------------------------------------
# 4. A folder of captioned images, with a corrupt file and a missing one
# ---------------------------------------------------------------------------------------------------------------
def _write_folder(root: Path, n_good=12, corrupt=True, missing=True) -> Path:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    colours = ["red", "green", "blue", "yellow"]
    rows = []
    for i in range(n_good):
        arr = np.zeros((40, 48, 3), np.uint8)
        arr[...] = rng.integers(0, 255, 3)
        arr[8:24, 10:30] = rng.integers(0, 255, 3)
        Image.fromarray(arr).save(root / f"img{i:02d}.png")
        rows.append((f"img{i:02d}.png", f"a {colours[i % 4]} box number {i}"))
    if corrupt:
        (root / "corrupt.png").write_bytes(os.urandom(300))
        rows.append(("corrupt.png", "a broken file"))
    if missing:
        rows.append(("does_not_exist.png", "a missing file"))
    with open(root / "captions.csv", "w") as f:
        f.write("image,caption\n" + "".join(f"{a},{b}\n" for a, b in rows))
    return root / "captions.csv"


@pytest.mark.slow
def test_folder_dataset_run_skips_bad_images(tmp_path, tiny_set_args, capsys):
    csv_path = _write_folder(tmp_path / "imgs")
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"skipped 2 of 14 images"):
        rc = cli.main(["train", "--preset", "tiny", "--data", "folder", "--data-path", str(csv_path), "--steps", "3",
                       "--out", str(out), *tiny_set_args, "--set", "checkpoint_every=0"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and math.isfinite(summary["psnr"])
    assert summary["eval_images"] == 12                     # the 12 readable images; the 2 bad rows were skipped
    assert summary["data"]["name"] == "folder" and summary["data"]["path"] == str(csv_path)
    assert "zero_shot_top1" not in summary                  # no class labels in a folder: no zero-shot
    assert len(_read_jsonl(out / "metrics.jsonl")) == 3
    assert "psnr:" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# 5. The NaN guard
# ---------------------------------------------------------------------------------------------------------------
class _Poisoned(Dataset):
    """Wraps a dataset; the items in `bad` come back with an all-NaN image."""

    def __init__(self, ds, bad):
        self.ds, self.bad = ds, set(bad)

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        item = self.ds[i]
        if int(i) in self.bad:
            item = dict(item, image=torch.full_like(item["image"], float("nan")))
        return item


def test_nan_guard_stops_before_the_bad_update(tmp_path, tiny_overrides):
    preset = apply_overrides(get_preset("tiny"), [*tiny_overrides, "checkpoint_every=2", "steps=10"])
    train, _ = build_datasets({"name": "shapes", "eval_images": 16}, preset.model.image_size, preset.train.seed)
    bad_step = 5                                          # 1-based: the 5th optimisation step sees a NaN image
    bad_index = StepBatchSampler(len(train), preset.train.batch_size, preset.train.seed).indices_for_step(bad_step - 1)[3]
    out = tmp_path / "run"
    trainer = Trainer(preset.model, preset.train, _Poisoned(train, [bad_index]), {}, out_dir=out)
    snapshots = {}
    trainer.add_callback("step", lambda t, m: snapshots.update(
        model=_state(t.model), optimizer=copy.deepcopy(t.optimizer.state_dict()), step=m["step"]))
    with pytest.raises(NonFiniteLossError) as excinfo:
        trainer.run(progress=False)
    message = str(excinfo.value)
    assert "loss term 'l1' became nan" in message           # names the term (the first of the NaN ones)
    assert f"at step {bad_step}" in message
    assert "step 4" in message and str(out) in message     # and points at the last good checkpoint
    assert trainer.step_count == bad_step - 1 == snapshots["step"]
    assert len(trainer.history) == bad_step - 1
    _assert_same_tensors(_state(trainer.model), snapshots["model"])   # no update from the bad batch
    opt_now, opt_before = trainer.optimizer.state_dict()["state"], snapshots["optimizer"]["state"]
    for pid in opt_before:
        _assert_same_tensors(opt_now[pid], opt_before[pid])
    assert trainer.tracker.total_tokens == (bad_step - 1) * 16 * 64     # the bad batch's codes were not counted
    assert all(p.grad is None for p in trainer.model.parameters())
    # the run folder keeps the last good checkpoint, and it loads
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 4 < bad_step
    _assert_same_tensors(state["model"], snapshots["model"])
    assert len(_read_jsonl(out / "metrics.jsonl")) == 4
    fresh = Trainer(preset.model, preset.train, train, {}, out_dir=out, resume=True)
    assert fresh.step_count == 4
    assert math.isfinite(fresh.step()["loss"])


def test_nan_guard_names_the_clip_term(tiny_overrides):
    trainer = _trainer(tiny_overrides, ["steps=10"])
    original = trainer.loss_fn
    calls = []

    def loss_with_inf_clip(out, images):
        terms = original(out, images)
        calls.append(1)
        if len(calls) == 3:
            terms["clip"] = terms["clip"] * float("inf")
            terms["total"] = terms["total"] + terms["clip"]
        return terms

    trainer.loss_fn = loss_with_inf_clip
    trainer.step(), trainer.step()
    before = _state(trainer.model)
    with pytest.raises(NonFiniteLossError, match=r"loss term 'clip' became inf at step 3"):
        trainer.step()
    _assert_same_tensors(_state(trainer.model), before)
    assert trainer.step_count == 2


def test_nan_guard_message_before_any_checkpoint(tmp_path, tiny_overrides):
    trainer = _trainer(tiny_overrides, ["steps=10", "checkpoint_every=5"], out_dir=tmp_path / "run")
    original = trainer.loss_fn

    def nan_vq(out, images):
        terms = original(out, images)
        terms["vq"] = terms["vq"] * float("nan")
        return terms

    trainer.loss_fn = nan_vq
    with pytest.raises(NonFiniteLossError, match=r"loss term 'vq' became nan at step 1") as excinfo:
        trainer.step()
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    assert "step None" not in str(excinfo.value)


# ---------------------------------------------------------------------------------------------------------------
# 6. Mismatched checkpoints and empty datasets fail clearly
# ---------------------------------------------------------------------------------------------------------------
def test_checkpoint_config_mismatch_lists_the_keys(tmp_path, tiny_overrides):
    out = tmp_path / "run"
    four = _trainer(tiny_overrides, ["num_codebooks=4", "steps=5"], out_dir=out)
    four.step()
    path = four.save_checkpoint()
    config_before, ckpt_before = (out / "config.json").read_text(), path.read_bytes()

    two = _trainer(tiny_overrides, ["num_codebooks=2", "steps=5"])
    weights_before = _state(two.model)
    with pytest.raises(ValueError) as excinfo:
        two.load_checkpoint(path)
    message = str(excinfo.value)
    assert "does not match" in message
    assert "shape mismatch quantizer.codebooks: checkpoint (4, 64, 4) vs model (2, 64, 8)" in message
    _assert_same_tensors(_state(two.model), weights_before)   # nothing half-loaded

    # the same through resume=True: fails, and leaves the run folder as it was
    with pytest.raises(ValueError, match=r"quantizer\.codebooks"):
        _trainer(tiny_overrides, ["num_codebooks=2", "steps=5"], out_dir=out, resume=True)
    assert (out / "config.json").read_text() == config_before and path.read_bytes() == ckpt_before


def test_empty_datasets_fail_with_a_clear_message(tmp_path, tiny_overrides):
    with pytest.raises(ValueError, match="the training dataset is empty"):
        StepBatchSampler(0, 16, seed=0)

    class Empty(Dataset):
        def __len__(self):
            return 0

        def __getitem__(self, i):
            raise IndexError(i)

    preset = apply_overrides(get_preset("tiny"), tiny_overrides)
    trainer = Trainer(preset.model, preset.train, Empty(), {}, out_dir=None)
    with pytest.raises(ValueError, match="empty"):
        trainer.step()

    # a folder CSV whose rows are all unreadable
    csv_path = _write_folder(tmp_path / "bad", n_good=0)
    with pytest.raises(ValueError, match="no readable images"):
        build_datasets({"name": "folder", "path": str(csv_path)}, 32)


# ---------------------------------------------------------------------------------------------------------------
# 7. Evaluation
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_evaluate_reports_all_metrics(trained):
    trainer, _, after, _ = trained
    for key in ("psnr", "ssim", "codebook_usage", "zero_shot_top1", "zero_shot_top1_heldout",
                "retrieval_image_to_text_R@1", "retrieval_text_to_image_R@1", "perplexity", "dead_codes"):
        assert key in after, key
    assert isinstance(after["psnr"], float) and -1.0 <= after["ssim"] <= 1.0
    usage = after["codebook_usage"]
    assert len(usage) == trainer.model_config.num_codebooks and all(0.0 <= u <= 1.0 for u in usage)
    for key in ("zero_shot_top1", "zero_shot_top1_heldout", "retrieval_image_to_text_R@1"):
        assert 0.0 <= after[key] <= 1.0, key
    assert after["eval_images"] == 64 and after["step"] == TRAIN_STEPS
    assert "fid" not in after                          # FID only on request


@pytest.mark.slow
def test_evaluate_with_proxy_fid(trained):
    trainer, _, _, _ = trained
    was_training = trainer.model.training
    results = trainer.evaluate(fid="proxy", max_images=32)
    assert trainer.model.training == was_training
    assert math.isfinite(results["fid"]) and results["fid"] >= 0
    assert "efficientnet" in results["fid_extractor"].lower()
    assert results["fid_images"] == 32 and results["eval_images"] == 32
    with pytest.raises(ValueError, match="fid must be"):
        trainer.evaluate(fid="no-such-extractor", max_images=8)


def test_scheduled_evaluations_before_the_last_step_use_interim_images_and_count_as_evaluation_time(tiny_overrides):
    from unitok.training.tokenizer_trainer import Trainer

    trainer = Trainer.from_preset("tiny", data="shapes", overrides=[
        *tiny_overrides, "steps=4", "eval_every=2", "eval_images=32", "interim_eval_images=8", "checkpoint_every=0"])
    trainer.run(progress=False)
    assert [(r["step"], r["eval_images"]) for r in trainer.eval_history] == [(2, 8), (4, 32)]
    assert trainer.evaluate()["eval_images"] == 32                  # a direct evaluation: all eval_images
    clock = trainer.clock
    assert clock.eval_seconds > 0 and clock.train_seconds > 0 and clock.compile_seconds == 0
    summary = clock.summary()
    assert summary["total_seconds_at_192_gflops"] == pytest.approx(
        clock.train_scaled_seconds + clock.eval_scaled_seconds, abs=0.01)
    assert clock.eval_scaled_seconds > 0                            # scaled by the peak measured beside it
    with pytest.raises(ValueError, match="interim_eval_images"):
        Trainer.from_preset("tiny", data="shapes", overrides=[*tiny_overrides, "interim_eval_images=-1"])


def test_run_clock_scales_each_part_and_reads_checkpoints_written_before_it():
    from unitok.training.clock import RunClock

    clock = RunClock()
    clock.count("train", 0.5, gflops=384.0)      # a machine twice the laptop's speed: twice the scaled time
    clock.count("compile", 1.0, gflops=96.0)
    clock.count("eval", 2.0, gflops=None)        # no peak measured (a GPU): wall time only
    assert clock.summary() == {"train_seconds": 0.5, "train_seconds_at_192_gflops": 1.0, "eval_seconds": 2.0,
                               "compile_seconds": 1.0, "total_seconds_at_192_gflops": 1.5}
    assert RunClock.from_state({"clock": clock.state_dict()}) == clock
    old = RunClock.from_state({"train_seconds": 3.0, "scaled_seconds": 2.0, "compile_seconds": 1.0})
    assert (old.train_seconds, old.train_scaled_seconds, old.compile_seconds) == (3.0, 2.0, 1.0)
    with pytest.raises(ValueError, match="part must be one of"):
        clock.count("lunch", 1.0, gflops=None)
