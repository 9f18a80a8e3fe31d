"""Writing and reading weights safely: atomic writes and loads that check every key and shape.

- `atomic_write(path, write)`: a crash mid-save leaves the previous file intact (temp file, fsync, rename).
- `load_state_dict_checked(model, state)`: refuses a state dict whose keys or shapes differ from the model's,
  listing every difference (a ValueError, so the CLI reports it in one line).
- `load_state_dict_by_position(module, source, what)`: the same architecture saved under other key names.
- `tokenizer_hash(tokenizer)`: a sha256 over a module's weights, so a generator or unified model saved next to a
  frozen tokenizer (and the code caches extracted with it) can tell when that tokenizer's weights changed.
- `read_safetensors(path)` / `read_torch(path)`: a missing file is a FileNotFoundError naming what was expected;
  `.pt` files are read with `weights_only=True` (nothing is unpickled but tensors and plain containers).

Used by `UniTok.save_pretrained` / `from_pretrained` (JSON + safetensors), the trainer's resumable checkpoints
(`checkpoint.pt`) and the FID feature extractors' weight files.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Union

import torch
import torch.nn as nn

__all__ = ["atomic_write", "load_state_dict_checked", "load_state_dict_by_position", "tokenizer_hash",
           "read_safetensors", "read_torch"]

PathLike = Union[str, os.PathLike]


def atomic_write(path: PathLike, write: Callable[[str], object]) -> None:
    """Call write(tmp_path) on a temporary file next to `path`, fsync it, then rename it over `path`.

    The rename is atomic on POSIX file systems, so readers see either the old file or the complete new one.
    The file gets the usual permissions (0666 minus the umask), not mkstemp's 0600.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_state_dict_checked(model: nn.Module, state: dict) -> None:
    """Copy `state` into `model` after checking that keys and shapes match exactly; dtypes are converted.

    Raises ValueError listing every missing key, unexpected key and shape mismatch (not just the first).
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        raise ValueError("checkpoint does not match the model config:\n"
                         + "".join(f"  missing: {k}\n" for k in missing)
                         + "".join(f"  unexpected: {k}\n" for k in unexpected)
                         + "".join(f"  shape mismatch {s}\n" for s in shapes))
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(state[k].to(v.dtype))


def load_state_dict_by_position(module: nn.Module, source: dict, what: str) -> None:
    """Load `source` into `module` pairing tensors in order: same architecture, different key names.

    Refuses (RuntimeError) unless the counts, every shape and every tensor kind (weight, bias, running_mean, ...)
    agree, so a misalignment cannot load silently.
    """
    target = module.state_dict()
    src, dst = list(source.items()), list(target.items())
    if len(src) != len(dst):
        raise RuntimeError(f"{what}: cannot load by position, {len(src)} tensors in the file vs {len(dst)} "
                           f"in {type(module).__name__}")
    new = {}
    for i, ((sk, sv), (dk, dv)) in enumerate(zip(src, dst)):
        if sv.shape != dv.shape or sk.rsplit(".", 1)[-1] != dk.rsplit(".", 1)[-1]:
            raise RuntimeError(f"{what}: tensor #{i} does not match: file {sk} {tuple(sv.shape)} vs model "
                               f"{dk} {tuple(dv.shape)}")
        new[dk] = sv
    module.load_state_dict(new, strict=True)


def tokenizer_hash(tokenizer) -> str:
    """sha256 over the tokenizer's state dict (names, shapes, dtypes, bytes): changes whenever its weights do."""
    h = hashlib.sha256()
    for name, tensor in sorted(tokenizer.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-d: 1-d first
    return h.hexdigest()


def _require_file(path: PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; expected {what}")
    return path


def read_safetensors(path: PathLike, device: Union[str, torch.device] = "cpu",
                     what: str = "a safetensors weights file") -> dict:
    """{name: tensor} from a .safetensors file (nothing is unpickled)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = _require_file(path, what)
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is damaged or truncated ({e}); expected {what}: restore it or export the model "
                         f"again") from None


def read_torch(path: PathLike, what: str = "a checkpoint written by torch.save") -> dict:
    """A torch.save file read on the CPU with weights_only=True (tensors, numbers, strings, lists, dicts)."""
    import pickle

    path = _require_file(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Never suggest weights_only=False: the file asked to run code on load, and that is all we know about it.
        raise ValueError(f"{path} was not loaded: it is not a plain tensor file and may contain code "
                         f"(expected {what})") from None
    except (RuntimeError, EOFError, OSError) as e:  # torch's zip reader on a truncated or foreign file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is damaged or truncated ({reason}); expected {what}") from None
