"""One task of a study's plan: train its run (a tokenizer, a generator on a tokenizer's codes, or a roadmap unified
model) in OUT/runs/<key>, measure it, and return its record; or read the record back when the run is finished.

    >>> record = run_task(task, "runs/ablate")   # {"study", "setting", "seed", "metrics", "config", "git", ...}

A record holds the run's headline metrics (`unitok.studies.metrics`), every evaluation value, the training seconds,
the full config, the git revision, the machine and the fp32 matmul peak measured just before the run
(`unitok.training.machine`), so that times from a busy and a quiet machine compare. It is saved as the run folder's
result.json, which is what makes a finished run be skipped next time; a killed run resumes from its checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from ..training.machine import REFERENCE_GFLOPS, git_revision, machine_info, matmul_peak
from .clip_pretrain import pretrained_clip
from .metrics import headline_metrics
from .roadmap import run_mllm_task
from .spec import Task, read_json, trained_tokenizer

__all__ = ["run_task", "GENERATOR_STUDY_SETTINGS"]

# The generation study's generator settings where they differ from today's `train-generator` defaults (those moved
# later: lr 2e-3, batch 32, bf16 on AMX CPUs, captions naming every colour, codebook-aware logits, the condition at
# every position, blank background codes): pinned, so that the bundled study's runs mean what their keys say.
GENERATOR_STUDY_SETTINGS = ("lr=1e-3", "batch_size=64", "cpu_bf16=off", "p_no_colour=0.5", "code_logits=linear",
                            "condition_at_every_position=false", "plain_codes=tokenizer")


def _datasets(spec: dict, image_size: int):
    from ..data.datasets import build_datasets

    return build_datasets({"name": spec["data"]["name"], "path": spec["data"].get("path"),
                           "eval_images": spec["data"]["eval_images"]}, image_size, spec["data"].get("seed", 0))


def run_task(task: Task, out: Union[str, Path], threads: Optional[int] = None, log: Callable = print) -> dict:
    """Train and evaluate one task's run in OUT/runs/<key> (or resume it, or read it when finished).

    Returns the run's record: study, setting, seed, metrics (`headline_metrics`), eval (every evaluation value),
    train_seconds, config, git revision, machine and matmul peak. The record is also saved as the run folder's
    result.json, which is what makes a finished run be skipped next time.
    """
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    run_dir = out / task.run_dir
    done = read_json(run_dir / "result.json")
    if done is None:
        if task.spec["kind"] == "mllm":
            runner = run_mllm_task
        else:
            runner = _run_generator if task.spec["kind"] == "generator" else _run_tokenizer
        done = runner(task, out, run_dir, log)
    return {**done, "study": task.study, "setting": task.setting, "seed": task.seed, "run": task.run_dir}


def _run_tokenizer(task: Task, out: Path, run_dir: Path, log: Callable) -> dict:
    from ..tokenizer.config import ModelConfig, TrainConfig, from_dict
    from ..tokenizer.model import UniTok
    from ..training.machine import pick_device
    from ..training.runs import atomic_write_text
    from ..training.tokenizer_trainer import Trainer
    from ..training.trainer import seed_everything

    spec = task.spec
    model_config = from_dict(ModelConfig, spec["model"], "the study's model config")
    train_config = from_dict(TrainConfig, spec["train"], "the study's train config")
    device = pick_device(train_config.device)
    peak = matmul_peak(device=device)
    start = time.perf_counter()
    train_data, eval_data = _datasets(spec, model_config.image_size)
    extra: dict = {}
    model = None
    if spec.get("clip_pretrain"):
        clip = pretrained_clip(spec, out, model_config, train_config, train_data, eval_data, device, log)
        seed_everything(train_config.seed)
        model = UniTok(model_config)
        missing = model.load_state_dict(clip["state"], strict=False)
        if missing.unexpected_keys:
            raise ValueError(f"the pre-trained CLIP has weights the tokenizer lacks: {missing.unexpected_keys[:4]}")
        extra = {"pretrain_seconds": round(clip["seconds"], 2),
                 **{f"clip_{k}": v for k, v in clip.items() if k.startswith("zero_shot")}}
    trainer = Trainer(model_config, train_config, train_data, eval_data, out_dir=run_dir, resume=True,
                      data_spec={**spec["data"]}, model=model)
    try:
        trainer.run(progress=False)
        trainer.save_checkpoint()
        results = trainer.evaluate(fid=None if spec["fid"] == "none" else spec["fid"])
        trainer.write_summary(results)
    finally:
        trainer.close()
    metrics = headline_metrics(results)
    metrics.update({k: v for k, v in extra.items() if k.startswith("clip_") or k == "pretrain_seconds"})
    metrics["train_seconds"] = round(trainer.clock.train_seconds, 2)
    record = {"kind": "tokenizer", "key": task.key, "metrics": metrics, "eval": results,
              "train_seconds": round(trainer.clock.train_seconds, 2), "wall_seconds": round(time.perf_counter() - start, 2),
              **({"pretrain_seconds": extra["pretrain_seconds"]} if "pretrain_seconds" in extra else {}),
              "matmul_peak_gflops": round(peak, 1),
              "peak_scaled_train_seconds": round(trainer.clock.train_seconds * peak / REFERENCE_GFLOPS, 2),
              "config": spec, "git": git_revision(), "machine": machine_info(device),
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_text(run_dir / "result.json", json.dumps(record, indent=2, default=float))
    (run_dir / "checkpoint.pt").unlink(missing_ok=True)  # finished: best/ keeps the weights, result.json the numbers
    return record


def _run_generator(task: Task, out: Path, run_dir: Path, log: Callable) -> dict:
    """Train a generator on the codes of the task's tokenizer run (trained first: `unitok.studies.runner`) and measure it:
    held-out NLL (teacher-forced, bits per token position = all k sub-codes) and prompt accuracy of samples (how often
    an independent small CNN reads both the prompted colour and shape from a generated image)."""
    try:
        from ..generator.trainer import GeneratorTrainer
    except ImportError:
        raise ValueError("the generation study needs the generator trainer (unitok.generator.trainer), which this "
                         "installation does not have; run the other studies") from None
    from ..evaluation.generator_scores import evaluate_samples
    from ..evaluation.shape_classifier import load_shape_classifier
    from ..training.runs import atomic_write_text

    spec = task.spec
    start = time.perf_counter()
    tok_dir, device, tokenizer = trained_tokenizer(out, spec)
    peak = matmul_peak(device=device)
    # the generation study's pinned settings, unless the spec names its own (the quantizer study's consumers)
    overrides = [*spec.get("generator_overrides", GENERATOR_STUDY_SETTINGS), f"steps={spec['steps']}",
                 f"seed={spec['seed']}", "eval_every=0",
                 f"checkpoint_every={max(10, spec['steps'] // 3)}", f"train_images={spec['train_images']}",
                 f"eval_images={spec['eval_images']}", f"device={spec['tokenizer']['train']['device']}"]
    trainer = GeneratorTrainer.from_tokenizer(tokenizer, tok_dir, data=spec["tokenizer"]["data"]["name"],
                                              overrides=overrides, out_dir=run_dir, resume=True, progress=False)
    try:
        trainer.run(progress=False)
        trainer.save_checkpoint()
        nll = trainer.evaluate()
        with torch.enable_grad():  # the measuring CNN is trained (once, then cached) on first use
            classifier = load_shape_classifier(tokenizer.config.image_size)
        samples = evaluate_samples(trainer.generator, num=spec["samples_per_prompt"], seed=spec["seed"],
                                   fid=spec["tokenizer"]["fid"] == "proxy", classifier=classifier)
        trainer.write_summary(samples)
    finally:
        trainer.close()
    positions = trainer.gen_config.num_positions
    metrics = {"gen_nll_bits": nll["bits_per_image_test"] / positions,
               "gen_prompt_accuracy": samples["prompt_both_acc"], "train_seconds": round(trainer.clock.train_seconds, 2)}
    if "bits_per_image_heldout" in nll:
        metrics["gen_nll_bits_heldout"] = nll["bits_per_image_heldout"] / positions
    if "prompt_both_acc_heldout" in samples:
        metrics["gen_prompt_accuracy_heldout"] = samples["prompt_both_acc_heldout"]
    if "fid_proxy" in samples:
        metrics["gen_fid_proxy"] = samples["fid_proxy"]
    record = {"kind": "generator", "key": task.key, "metrics": metrics, "eval": {**nll, **samples},
              "train_seconds": round(trainer.clock.train_seconds, 2), "wall_seconds": round(time.perf_counter() - start, 2),
              "matmul_peak_gflops": round(peak, 1),
              "peak_scaled_train_seconds": round(trainer.clock.train_seconds * peak / REFERENCE_GFLOPS, 2),
              "config": {**spec, "generator": dataclasses.asdict(trainer.gen_config),
                         "generator_train": dataclasses.asdict(trainer.config)},
              "git": git_revision(), "machine": machine_info(device), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_text(run_dir / "result.json", json.dumps(record, indent=2, default=float))
    (run_dir / "checkpoint.pt").unlink(missing_ok=True)
    return record
