"""What every group of commands shares: the CLI's error rule (a user error is one line and exit 2, not a traceback),
`Interrupted` (Ctrl-C with the line that says where things stand), reading the user's JSON files, reporting skipped
inputs, and loading a unified-model folder (`unitok generate --mllm` draws with the same models `unitok ask` reads).

Command modules (`unitok.cli.tokenizer`, `generator`, `mllm`, `studies`) import this file and the library, never
each other nor `unitok.cli.app`, which builds the one parser from their `add_..._commands`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["Interrupted", "interrupt_message", "user_errors", "one_line", "run_reporting_errors", "read_json", "report_skipped",
           "load_mllm_folder"]


class Interrupted(Exception):
    """Ctrl-C during a command, with the one line that tells the user where things stand."""


def interrupt_message(trainer, resume_command: str) -> str:
    """The one line after Ctrl-C: where training stopped, the checkpoint on disk, and how to continue. (A trainer's
    `run` finishes the step in progress and writes its checkpoint before it stops.)"""
    return f"{trainer.interrupt_message()}; resume with: {resume_command}"


def user_errors() -> tuple:
    """Exceptions a user can cause (bad settings, files, folders, devices): one line, exit 2, no traceback."""
    import pickle
    from safetensors import SafetensorError

    return (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
            pickle.UnpicklingError, SafetensorError)


def one_line(error: BaseException, limit: int = 4000) -> str:
    """An exception's message on one line (multi-line lists joined with "; "), shortened past `limit` chars."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = " ".join(lines[:1] + ["; ".join(lines[1:])]).strip() if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def run_reporting_errors(prog: str, fn, debug: bool = False) -> int:
    """Run fn() for a `python -m unitok.<module>` entry point with the CLI's rule: a user error is one line on
    stderr and exit 2, not a traceback (debug=True re-raises)."""
    try:
        fn()
        return 0
    except user_errors() as e:
        if debug:
            raise
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2


def read_json(path: Path, what: str) -> dict:
    """A JSON file the user's folder should hold, or a one-line error naming it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} is missing; expected {what} there") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); expected {what}") from None


def report_skipped(dataset, out: Path) -> None:
    """Say how many input files were skipped and why, and list them all in OUT/skipped.txt."""
    from collections import Counter
    from ..training.runs import atomic_write_text

    skipped = list(getattr(dataset, "skipped", None) or [])
    if not skipped:
        return
    reasons = Counter(reason.split(" (")[0] for _, reason in skipped)
    atomic_write_text(out / "skipped.txt", "".join(f"{path}\t{reason}\n" for path, reason in skipped))
    print(f"note: skipped {len(skipped)} input files (" + ", ".join(f"{n} {r}" for r, n in reasons.most_common())
          + f"); the full list is in {out / 'skipped.txt'}", file=sys.stderr)


def load_mllm_folder(path=None, device: str = "cpu"):
    """(UnifiedModel, the folder its weights came from) from a model folder, a run folder (its best/ or final/
    weights) or, with no path, the bundled data/tiny-mllm; `unitok generate --mllm` draws with it."""
    from ..data.bundled import BUNDLED_MLLM
    from ..mllm.model import UnifiedModel

    folder = Path(path) if path else BUNDLED_MLLM
    if not folder.exists():
        raise FileNotFoundError(f"{folder} does not exist; expected a unified-model folder (config.json, "
                                f"text_tokenizer.json, model.safetensors) or a `unitok train-mllm` run folder")
    for sub in ("", "best", "final"):
        if (folder / sub / "model.safetensors").is_file() and (folder / sub / "text_tokenizer.json").is_file():
            return UnifiedModel.from_pretrained(folder / sub, map_location=device), folder / sub
    raise ValueError(f"{folder} holds no unified model (expected model.safetensors and text_tokenizer.json in it, "
                     f"or in its best/ or final/ folder)")
