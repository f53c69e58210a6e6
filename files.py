"""
Every file the project reads or writes goes through here: writes are atomic
(a temporary file beside the target, fsynced, then renamed over it), and a
file that cannot be read is named in a one-line error, never left to a
traceback from deep inside torch.
"""

import os
import tempfile
from pathlib import Path

import torch


class FileError(ValueError):
    """A file the project cannot use; the message names it and says why."""


def atomic_write(path, write, mode="wb"):
    """Write through `write(file)` to a temporary file beside `path`, then rename over it:
    a crash at any moment leaves either the old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual permissions
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_text(path, text: str):
    atomic_write(path, lambda f: f.write(text), mode="w")


def load_pt(path, what: str, mmap: bool = False):
    """torch.load(weights_only=True) of `path`, or a FileError that names the file: missing,
    truncated, not a torch file, or holding something other than tensors and plain data."""
    path = Path(path)
    if not path.is_file():
        raise FileError(f"{path}: no {what} here")
    try:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, pickle errors, EOFError, ... by the file's damage
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileError(f"{path}: cannot be read as a {what} ({reason[:200]})") from None
