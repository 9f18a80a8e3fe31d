"""Set-up for the lab-manual notebooks: one call instead of a set-up cell copied into every notebook.

    >>> from unitok_widgets import notebook_setup
    >>> lab = notebook_setup(checkpoint=True)          # prints: mode, repository, checkpoint
    >>> STEPS = lab.pick(smoke=4, classroom=60, full=400)
    >>> with lab.stoppable(trainer):                   # Kernel > Interrupt prints one line, not a traceback
    ...     trainer.run(STEPS)

Three modes, chosen by environment variables before Jupyter starts (or before the kernel is restarted):

    smoke      UNITOK_SMOKE=1          seconds; what the tests run (same code paths, tiny sizes)
    classroom  default, UNITOK_MODE=classroom   minutes on a 2-core laptop; results already show the effect
    full       UNITOK_MODE=full        the numbers quoted in the notebooks' text; up to tens of minutes

Nothing here imports Jupyter at import time; `notebook_setup` asks IPython (when it runs in one) to show an
interrupted cell as one line.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from unitok.cpu_share import cpu_usage, wait_policy_note
from unitok.training.trainer import TrainingInterrupted

MODES = ("smoke", "classroom", "full")
DEFAULT_MODE = "classroom"


def current_mode(environ=None) -> str:
    """The notebook mode from the environment: "smoke" if UNITOK_SMOKE=1, else UNITOK_MODE (default classroom)."""
    env = os.environ if environ is None else environ
    if env.get("UNITOK_SMOKE") == "1":
        return "smoke"
    mode = (env.get("UNITOK_MODE") or DEFAULT_MODE).strip().lower()
    if mode not in MODES:
        raise ValueError(f"UNITOK_MODE must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def repo_root(start: Optional[Path] = None) -> Path:
    """The folder with pyproject.toml and unitok/ (Jupyter starts notebooks in notebooks/; an installed package
    falls back to where `unitok` lives)."""
    here = Path.cwd() if start is None else Path(start)
    for folder in [here, *here.parents]:
        if (folder / "pyproject.toml").is_file() and (folder / "unitok").is_dir():
            return folder
    import unitok

    return Path(unitok.__file__).resolve().parents[1]


@dataclass
class Lab:
    """What a notebook needs to know about where and how it runs. Made by `notebook_setup`."""

    mode: str
    root: Path
    checkpoint: Optional[Path] = None

    @property
    def smoke(self) -> bool:
        return self.mode == "smoke"

    @property
    def bundled(self) -> Path:
        """The bundled tiny checkpoint (32 px shapes, 8 x 8 tokens, k = 8 sub-codebooks of K = 256 codes)."""
        return self.root / "data" / "tiny-shapes"

    @property
    def uses_bundled_checkpoint(self) -> bool:
        return self.checkpoint is not None and self.checkpoint.resolve() == self.bundled.resolve()

    def pick(self, smoke: Any, classroom: Any, full: Any) -> Any:
        """The value for the current mode, e.g. `lab.pick(smoke=4, classroom=60, full=400)`."""
        return {"smoke": smoke, "classroom": classroom, "full": full}[self.mode]

    @contextlib.contextmanager
    def stoppable(self, *trainers, note: Optional[str] = None):
        """Run a training or sampling cell so that Kernel > Interrupt (■) ends it with one line instead of a
        traceback, "stopped at step N; the model keeps its weights ...", and ends Run All there: the cell counts
        as interrupted (an error), so the queued cells below do not run on a half-trained model. The trainers keep
        their last finished step; run the cell again to go on. `note` replaces what is said about the trainers
        (e.g. "the finished runs are kept in runs/x")."""
        try:
            yield
        except KeyboardInterrupt as interrupt:
            raise TrainingInterrupted(stopped_message(trainers, interrupt, note)) from None


def stopped_message(trainers=(), interrupt: Optional[BaseException] = None, note: Optional[str] = None) -> str:
    """The one line an interrupted cell shows: where each trainer stopped and that the queue stopped too."""
    if isinstance(interrupt, TrainingInterrupted) and str(interrupt).startswith("■"):
        return str(interrupt)                                    # already this line (raised by `Lab.stoppable`)
    steps = sorted({int(getattr(t, "step_count", 0)) for t in trainers})
    where = "" if not steps else f" at step {steps[0]}" if len(steps) == 1 else \
        f" at steps {', '.join(map(str, steps))}"
    if note:
        first = f"stopped; {note}"
    elif trainers:
        whose = "the models keep their weights" if len(trainers) > 1 else "the model keeps its weights"
        first = f"stopped{where}; {whose}"
    else:
        first = str(interrupt) if isinstance(interrupt, TrainingInterrupted) and str(interrupt) else "stopped"
    return f"■ {first}. The cells below were not run: run this cell again to go on, or run the next cells one by one."


def one_line_interrupts(shell=None) -> bool:
    """Make Kernel > Interrupt in *any* cell of this kernel show one line (see `stopped_message`) instead of a
    KeyboardInterrupt traceback. The cell still ends as an error, which is what stops Run All's queue.
    -> False outside IPython."""
    if shell is None:
        try:
            from IPython import get_ipython
        except ImportError:
            return False
        shell = get_ipython()
    if shell is None or not hasattr(shell, "set_custom_exc"):
        return False

    def handler(shell, etype, value, tb, tb_offset=None):
        # IPython draws an exception with `_render_traceback_` as exactly those lines (TrainingInterrupted's)
        shown = TrainingInterrupted(stopped_message((), value))
        shell.showtraceback((TrainingInterrupted, shown, None))

    shell.set_custom_exc((KeyboardInterrupt,), handler)
    return True


def notebook_setup(checkpoint: bool = False, seed: int = 0, quiet: bool = False) -> Lab:
    """Mode, repository root and (optionally) the checkpoint folder for a notebook; seeds torch.

    checkpoint: True for notebooks that start from a trained model: UNITOK_CHECKPOINT (a folder written by
        `save_pretrained` / `unitok export`) or else the bundled data/tiny-shapes; FileNotFoundError if it has
        no model.safetensors.
    """
    lab = Lab(mode=current_mode(), root=repo_root())
    if checkpoint:
        lab.checkpoint = Path(os.environ.get("UNITOK_CHECKPOINT") or lab.bundled)
        if not (lab.checkpoint / "model.safetensors").is_file():
            raise FileNotFoundError(f"no checkpoint in {lab.checkpoint}: expected config.json + model.safetensors. "
                                    "Re-create the bundled one with `make checkpoint`.")
    import torch

    torch.manual_seed(seed)
    one_line_interrupts()
    if not quiet:
        text = f"mode: {lab.mode} (UNITOK_MODE=smoke|classroom|full)"
        if lab.checkpoint is not None:
            shown = lab.checkpoint.resolve()
            try:                          # a path inside the repository is shown relative to it (no local paths)
                shown = shown.relative_to(lab.root.resolve())
            except ValueError:
                pass
            text += f"  ·  checkpoint: {shown}" + (" (bundled)" if lab.uses_bundled_checkpoint else "")
        print(text)
        usage = cpu_usage()           # a busy CPU makes every time in the notebook longer: say so now, and why
        if usage is not None:
            print(usage.describe())
        note = wait_policy_note()
        if note:
            print(note)
    return lab


# ----------------------------------------------------------------------------------------------------------------
# Pre-run copies: execute the real notebooks in one mode and keep their outputs, for reading without a kernel.
# ----------------------------------------------------------------------------------------------------------------
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_NOTE = ("[a live widget was shown here (an interactive view or a progress bar): run the notebook in Jupyter "
               "to use it; every view also has a static picture further down]")


def strip_widget_views(nb) -> int:
    """Replace live-widget outputs (which need the kernel that made them) by a short note. -> how many."""
    replaced = 0
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if WIDGET_VIEW in data:
                output["data"] = {"text/plain": WIDGET_NOTE}
                replaced += 1
    return replaced


def shrink_pngs(nb, colours: int = 256) -> int:
    """Re-encode every PNG output with an adaptive palette of `colours` (plots have few colours; a scatter plot
    drops from ~350 kB to under 100 kB) when that is smaller. -> bytes saved."""
    import base64
    import io

    from PIL import Image

    saved = 0
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "image/png" not in data:
                continue
            raw = base64.b64decode(data["image/png"])
            with Image.open(io.BytesIO(raw)) as image:
                small = image.convert("RGB").quantize(colors=colours, method=Image.Quantize.MEDIANCUT)
                buffer = io.BytesIO()
                small.save(buffer, format="PNG", optimize=True)
            if buffer.tell() < len(raw):
                saved += len(raw) - buffer.tell()
                data["image/png"] = base64.b64encode(buffer.getvalue()).decode("ascii")
    return saved


def matmul_gflops(size: int = 1024, repeats: int = 3) -> float:
    """fp32 matmul speed of this machine now (GFLOP/s, best of `repeats` after a warm-up): the yardstick printed next
    to every measured run time, because the same machine can be several times slower on a busy day. The library's
    measurement (`unitok.training.machine.matmul_peak`) at this file's smaller size, so old records stay comparable."""
    from unitok.training.machine import matmul_peak

    return matmul_peak(size=size, repeats=repeats)


def execute_in_mode(nb, path: Path, mode: str, timeout: int = 3600) -> None:
    """Execute notebook `nb` (read from `path`, run in its folder) in a fresh kernel in `mode`; the mode's
    environment variables are set for the kernel and restored afterwards. Outputs land in `nb`."""
    import nbclient

    saved = {key: os.environ.get(key) for key in ("UNITOK_SMOKE", "UNITOK_MODE")}
    os.environ.pop("UNITOK_SMOKE", None)
    os.environ["UNITOK_MODE"] = mode
    if mode == "smoke":
        os.environ["UNITOK_SMOKE"] = "1"
    try:
        nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(Path(path).parent)}}).execute()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def execute_to_docs(path, out_dir, mode: str = "classroom", timeout: int = 3600) -> dict:
    """Run notebooks/<name>.ipynb in `mode` in a fresh kernel and write <out_dir>/<name>.ipynb with its outputs.

    Returns {"notebook", "mode", "seconds", "matmul_gflops", "threads"}; the caller records it next to the copy.
    """
    import time

    import nbformat

    path, out_dir = Path(path), Path(out_dir)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    nb = nbformat.read(path, as_version=4)
    gflops = matmul_gflops()
    start = time.perf_counter()
    execute_in_mode(nb, path, mode, timeout)
    seconds = time.perf_counter() - start
    strip_widget_views(nb)
    shrink_pngs(nb)
    nb.metadata.pop("widgets", None)
    out_dir.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out_dir / path.name)
    import torch

    return {"notebook": path.stem, "mode": mode, "seconds": round(seconds, 1), "matmul_gflops": round(gflops, 1),
            "threads": torch.get_num_threads()}


def _main(argv=None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m unitok_widgets.lab",
                                     description="Execute notebooks and keep their outputs (pre-run copies).")
    parser.add_argument("notebooks", nargs="+", help="paths of .ipynb files, run one after another")
    parser.add_argument("--mode", default="classroom", choices=MODES)
    parser.add_argument("--out", default="docs/notebooks", help="folder for the executed copies")
    args = parser.parse_args(argv)
    out = Path(args.out)
    log = out / "runs.jsonl"
    for name in args.notebooks:
        print(f"running {name} in {args.mode} mode ...", flush=True)
        record = execute_to_docs(name, out, args.mode)
        print(f"  {record['seconds']:.0f} s (matmul {record['matmul_gflops']:.0f} GFLOP/s, "
              f"{record['threads']} threads) -> {out / Path(name).name}", flush=True)
        with open(log, "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    _main()
