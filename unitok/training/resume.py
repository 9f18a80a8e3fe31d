"""The resume decision: one function every training command calls before it touches a file.

    >>> plan = decide_run(out, resume=args.resume, overwrite=args.overwrite, command="unitok train",
    ...                   requested=lambda saved: {...the run config the command line asks for...})
    >>> if plan.nothing_to_do:                   # printed, exit 0: not one byte of the folder was written
    ...     print(plan.message); return 0
    >>> trainer = Trainer(..., resume=plan.resuming)

The rules (the same for the tokenizer, the generator and the unified model, tested once for all three in
tests/training/test_run_rules.py):
- A resume may change how long and how often (`MAY_CHANGE_ON_RESUME`: steps, evaluation and checkpoint frequency,
  where it runs), never what is trained. What the command line asks for is compared with the saved config.json,
  setting by setting; **equal values are not conflicts**, so the command that started a run plus `--resume`
  continues it. Every conflicting setting is listed in one refusal.
- "Nothing to do" (the checkpoint already holds the asked-for steps) is decided here, before any file is opened
  for writing: the folder is left byte for byte as it was.
- Without `--resume`, a folder that holds a run is refused unless `--overwrite` (which moves it aside; see
  `unitok.training.runs`). `--resume` on a folder without a run starts a new one, with a note.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

from ..checkpoint import read_torch
from .runs import holds_run, prepare_run_folder

__all__ = ["MAY_CHANGE_ON_RESUME", "RunPlan", "ResumeConflictError", "decide_run", "config_conflicts",
           "saved_step", "read_run_config"]

# Settings a resume may change: how long, how often, where and how fast -- not what is trained, nor in which order.
MAY_CHANGE_ON_RESUME = frozenset({
    "steps", "eval_every", "eval_images", "interim_eval_images", "checkpoint_every", "log_every", "device", "amp",
    "compile", "num_workers",
    "t2i_samples", "cfg_scale",           # the unified model's final drawing evaluation, not its training
})


class ResumeConflictError(ValueError):
    """`--resume` was asked with settings that would not continue the same run."""


@dataclass
class RunPlan:
    """What a training command will do with its run folder.

    resuming: continue the run saved there; saved: its config.json (None for a new run); done: the steps its
    checkpoint holds; target: the steps asked for; nothing_to_do: done >= target (print `message`, exit 0)."""
    folder: Path
    resuming: bool
    saved: Optional[dict] = None
    done: int = 0
    target: int = 0
    command: str = "unitok train"
    notes: List[str] = field(default_factory=list)

    @property
    def nothing_to_do(self) -> bool:
        return self.resuming and self.target <= self.done

    @property
    def message(self) -> str:
        return (f"{self.folder} has already trained {self.done} steps (the run asks for {self.target}); nothing to "
                f"do, nothing changed. To train further: {self.command} --out {self.folder} --resume --steps N "
                f"with N > {self.done}")


def read_run_config(folder: Path) -> dict:
    """A run folder's config.json as a dict, or a one-line error saying what is wrong with it."""
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ResumeConflictError(f"{folder} holds a run without its config.json; it cannot be resumed (start a new "
                                  f"run with --overwrite or another --out)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResumeConflictError(f"{path} is not valid JSON ({e}); expected the config.json a training run "
                                  f"writes") from None


def saved_step(folder: Path) -> Optional[int]:
    """The step a run folder's checkpoint holds (None when it has none): the one place it is read, by the resume
    decision and by a trainer's messages (the trainer's `load_checkpoint` restores it with everything else)."""
    path = Path(folder) / "checkpoint.pt"
    return int(read_torch(path, "the run's checkpoint")["step"]) if path.exists() else None


def _plain(value):
    """JSON's view of a value: tuples are lists, so (0.9, 0.95) equals the saved [0.9, 0.95]."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def config_conflicts(saved: dict, requested: dict, may_change=MAY_CHANGE_ON_RESUME, where: str = "",
                     note: str = "") -> List[str]:
    """Every setting in which `requested` differs from `saved` (two run configs: {section: {key: value}}), as
    readable phrases ("train.lr=0.001 (saved run: 0.0005)"), skipping keys a resume may change. A key `requested`
    does not mention is not a conflict. `note` follows each requested value (where it came from)."""
    conflicts = []
    for key, want in requested.items():
        name = f"{where}{key}"
        if key in may_change or key not in saved:
            continue
        have = saved[key]
        if isinstance(want, dict) and isinstance(have, dict):
            conflicts += config_conflicts(have, want, may_change, f"{name}.", note)
        elif _plain(want) != _plain(have):
            conflicts.append(f"{name}={_plain(want)!r}{note} (saved run: {have!r})")
    return conflicts


def decide_run(folder, *, resume: bool, overwrite: bool, command: str,
               requested: Callable[[Optional[dict]], dict], is_main: bool = True, note: str = "") -> RunPlan:
    """Decide, before anything is built or written, what a training command does with `folder`.

    requested(saved) -> the run config the command line asks for, given the saved run's config.json (None for a new
    run: then it checks the settings before anything is written); it must hold "train": {"steps": ...}. Raises ResumeConflictError listing every conflicting setting, or
    `RunFolderError` when the folder holds a run and neither resume nor overwrite was asked. A new run's folder is
    prepared here (an old run moved aside under overwrite), on rank 0 only."""
    folder = Path(folder)
    if resume and holds_run(folder):
        if overwrite:
            raise ResumeConflictError("--resume and --overwrite contradict each other: continue the run, or start "
                                      "it again")
        saved = read_run_config(folder)
        want = requested(saved)
        conflicts = config_conflicts(saved, want, note=note)
        if conflicts:
            raise ResumeConflictError(
                f"--resume conflicts with the run saved in {folder}: " + "; ".join(conflicts)
                + ". Drop these options to continue that run, or use another --out to start a new one")
        return RunPlan(folder, True, saved, saved_step(folder) or 0, int(want["train"]["steps"]), command)
    # a new run: the settings are checked (a bad --set fails here) before the folder is created or claimed
    plan = RunPlan(folder, False, None, 0, int(requested(None)["train"]["steps"]), command)
    if resume:
        print(f"note: {folder} has no run to resume; starting a new one", file=sys.stderr)
    if is_main:
        prepare_run_folder(folder, resume=False, overwrite=overwrite, command=command)  # refuses, or moves aside
    return plan
