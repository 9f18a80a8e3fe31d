"""A run folder belongs to one run: the rules every trainer, `eval` and `export` follow.

A run folder (`--out DIR`) holds the only copy of someone's training: its config, checkpoint, best weights, logs
and summary. Three rules keep it safe:

1. **Never overwritten by accident.** Starting a new run in a folder that already holds one is refused unless the
   caller asks to continue it (`resume=True`) or to start again (`overwrite=True`), and starting again first moves
   the old run aside to `DIR.old-<timestamp>`: nothing is ever deleted.
2. **One writer at a time.** A lock file `DIR/.lock` (JSON: pid, host, command, start time) is held while a process
   trains or evaluates; a second process refuses with the first one's pid. A lock left by a dead process on this
   host is taken over with a note.
3. **Whole or nothing.** Files are written to a temporary name and renamed into place (`checkpoint.atomic_write`,
   `atomic_write_text`); folders
   that are exported are assembled in a temporary sibling and renamed into place (`staged_folder`), so a kill at
   any moment leaves either the old state or the new one, never a mix.

    >>> with claim_run_folder("runs/tiny", resume=False, overwrite=False):   # refuses if runs/tiny holds a run
    ...     trainer.run()
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional, Union

from ..checkpoint import atomic_write

PathLike = Union[str, os.PathLike]

# Any of these in a folder means a run (tokenizer, generator or unified model) has started there.
RUN_MARKERS = ("config.json", "checkpoint.pt", "metrics.jsonl", "summary.json", "best")
LOCK_NAME = ".lock"


class RunFolderError(ValueError):
    """A run folder cannot be used as asked (holds another run, is locked, is not writable, ...)."""


def holds_run(folder: PathLike) -> bool:
    """True when `folder` already contains the files of a run."""
    folder = Path(folder)
    return folder.is_dir() and any((folder / name).exists() for name in RUN_MARKERS)


def _timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def move_aside(folder: PathLike) -> Path:
    """Rename `folder` to `folder.old-<timestamp>` (a free name) and return the new path. Nothing is deleted."""
    folder = Path(folder)
    stem = folder.with_name(f"{folder.name}.old-{_timestamp()}")
    target, n = stem, 1
    while target.exists():
        n += 1
        target = stem.with_name(f"{stem.name}-{n}")
    folder.rename(target)
    return target


def check_writable(folder: PathLike) -> None:
    """Create `folder` if needed and prove a file can be written there, before any work starts."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"{folder} exists and is a file; expected a folder (or a path that does not exist yet)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise RunFolderError(f"cannot write to {folder} ({e.strerror or e}); choose a folder you can write to") from None


def prepare_run_folder(folder: PathLike, *, resume: bool, overwrite: bool, command: str = "unitok train") -> str:
    """Decide what a new process may do with `folder`; returns "new", "resume" or "restart".

    "restart" means the old run was moved aside (the returned note is printed by callers via `notes`).
    Raises `RunFolderError` (one line, naming `--resume` and `--overwrite`) when the folder holds a run and the
    caller asked for neither.
    """
    folder = Path(folder)
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite contradict each other: continue the run, or start it again")
    if not holds_run(folder):
        check_writable(folder)
        return "new"
    if resume:
        check_writable(folder)
        return "resume"
    if overwrite:
        _refuse_if_locked(folder)
        old = move_aside(folder)
        print(f"note: moved the previous run in {folder} aside to {old}", file=sys.stderr)
        check_writable(folder)
        return "restart"
    raise RunFolderError(
        f"{folder} already holds a run; use `{command} --out {folder} --resume` to continue it, "
        f"`--overwrite` to start again (the old run is moved aside to {folder.name}.old-<timestamp>), "
        f"or choose another --out")


# ------------------------------------------------------------------------------------------------ the lock file
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_lock(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _lock_is_stale(info: Optional[dict]) -> bool:
    if info is None:  # unreadable: a writer may be between creating and filling it, so only an old one is stale
        return True
    return info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid", -1)))


def _refuse_if_locked(folder: Path) -> None:
    info = _read_lock(folder / LOCK_NAME) if (folder / LOCK_NAME).exists() else None
    if (folder / LOCK_NAME).exists() and not _lock_is_stale(info):
        raise RunFolderError(_locked_message(folder, info))


def _locked_message(folder: Path, info: Optional[dict]) -> str:
    who = f"process {info.get('pid')} ({info.get('command', '?')}, since {info.get('started', '?')})" if info else \
        "another process"
    return f"{folder} is in use by {who}; wait for it to finish or stop it first"


class RunLock:
    """Exclusive ownership of a run folder while a process writes to it (`DIR/.lock`, created with O_EXCL).

    Re-entrant within a process (a nested acquire of a folder this process holds is a no-op), released on exit,
    taken over (with a note) when the holder is a dead process on this host.
    """

    _held: dict = {}  # resolved folder -> depth, for this process

    def __init__(self, folder: PathLike, command: str = "unitok"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command = command

    def _key(self) -> str:
        return str(self.folder.resolve())

    def acquire(self) -> "RunLock":
        key = self._key()
        if RunLock._held.get(key):
            RunLock._held[key] += 1
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = _read_lock(self.path)
                if not _lock_is_stale(other):
                    raise RunFolderError(_locked_message(self.folder, other)) from None
                pid = other.get("pid") if other else "?"
                print(f"note: taking over the lock of {self.folder} from process {pid}, which is no longer running",
                      file=sys.stderr)
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
            RunLock._held[key] = 1
            return self
        raise RunFolderError(_locked_message(self.folder, _read_lock(self.path)))

    def release(self) -> None:
        key = self._key()
        depth = RunLock._held.get(key, 0)
        if depth > 1:
            RunLock._held[key] = depth - 1
            return
        RunLock._held.pop(key, None)
        info = _read_lock(self.path)
        if info and info.get("pid") == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def claim_run_folder(folder: PathLike, *, resume: bool = False, overwrite: bool = False,
                     command: str = "unitok train") -> Iterator[str]:
    """Apply rules 1 and 2 around a training process: yields "new", "resume" or "restart" while holding the lock.

    Under torchrun only rank 0 claims the folder (the other ranks never write to it).
    """
    if not _is_main_process():
        yield "resume" if resume else "new"
        return
    mode = prepare_run_folder(folder, resume=resume, overwrite=overwrite, command=command)
    with RunLock(folder, command):
        yield mode


# ------------------------------------------------------------------------------------------------ atomic writes
def atomic_write_text(path: PathLike, text: str) -> None:
    """`checkpoint.atomic_write` for a text file (config.json, summary.json, skipped.txt, ...)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


@contextlib.contextmanager
def staged_folder(dest: PathLike, *, overwrite: bool = False, source: Optional[PathLike] = None,
                  option: str = "--overwrite") -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it is renamed to `dest`.

    Refuses a `dest` equal to or inside `source` (exporting a run into itself), and a `dest` that exists and is
    not empty unless `overwrite` — then the old `dest` is moved aside (`dest.old-<timestamp>`), not deleted.
    On an error or a kill, `dest` is untouched and the temporary folder is removed (or left as `.dest.tmp-*`).
    """
    dest = Path(dest)
    if source is not None and (_inside(dest, Path(source)) or _inside(Path(source), dest)):
        raise RunFolderError(f"{dest} is inside (or contains) the source {source}; choose a destination outside it")
    if dest.exists() and not dest.is_dir():
        raise RunFolderError(f"{dest} exists and is a file; expected a folder path")
    nonempty = dest.is_dir() and any(dest.iterdir())
    if nonempty and not overwrite:
        raise RunFolderError(f"{dest} is not empty; choose an empty or new folder, or pass {option} "
                             f"(the old contents are moved aside to {dest.name}.old-<timestamp>)")
    check_writable(dest.parent if dest.parent != Path("") else Path("."))
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    try:
        yield tmp
        if nonempty:
            old = move_aside(dest)
            print(f"note: moved the previous contents of {dest} aside to {old}", file=sys.stderr)
        elif dest.is_dir():
            dest.rmdir()  # empty
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_log_if_changed(path: Path, rows) -> None:
    """Make a JSON-lines log hold exactly `rows`; the file is left untouched (bytes and time) when it already does."""
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if path.exists() and path.read_text() == text:
        return
    atomic_write_text(path, text)
