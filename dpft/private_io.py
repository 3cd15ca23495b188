"""Files that hold data about individuals (per-patient predictions, individual epsilons,
per-update statistics of private batches): created owner-only, written atomically.

Files get mode 0600 from the moment they exist (`os.open` with the mode, not a chmod after
writing), directories made here 0700. `atomic_write` writes a temporary file in the same
directory, fsyncs it and renames it over the target, so a crash leaves the old or the new
file, never a torn one.
"""
from __future__ import annotations

import os
from typing import Callable, IO

FILE_MODE = 0o600
DIR_MODE = 0o700


def make_private_dir(path: str | os.PathLike) -> str:
    """Creates `path` (and parents) if needed; a directory made here is owner-only."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        os.makedirs(path, mode=DIR_MODE, exist_ok=True)
        os.chmod(path, DIR_MODE)  # makedirs' mode is masked by the umask
    return path


def open_private(path: str | os.PathLike, mode: str = "a") -> IO:
    """Opens `path` for appending/writing, creating it with mode 0600 (existing files are made 0600)."""
    path = os.fspath(path)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode.startswith("a") else os.O_TRUNC)
    fd = os.open(path, flags, FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    return os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8")


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None] | bytes | str, *,
                 private: bool = False) -> str:
    """Atomically replaces `path` with what `write(f)` writes to a binary file (or the given bytes/str).

    private=True: the file is created with mode 0600. Returns the path.
    """
    path = os.fspath(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE if private else 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(write):
                write(f)
            else:
                f.write(write.encode("utf-8") if isinstance(write, str) else write)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def is_owner_only(path: str | os.PathLike) -> bool:
    """True when neither group nor others have any permission on `path`."""
    return (os.stat(path).st_mode & 0o077) == 0


__all__ = ["make_private_dir", "open_private", "atomic_write", "is_owner_only"]
