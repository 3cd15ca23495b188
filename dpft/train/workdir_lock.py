"""One training run per workdir: an exclusive `fcntl.flock` on `WORKDIR/.dpft.lock`.

    with WorkdirLock(workdir):
        ... train ...

The lock is held for the life of the open file (the kernel drops it when the process
dies, also on SIGKILL, so a stale lock never blocks a restart). The file records the
holder (`pid`, `host`, `since`), so a second `dpft train` on the same workdir exits at
once with `WorkdirBusyError` naming it. Re-entrant within one process (the CLI and the
training loop may both take it). On a multi-host run only process 0 takes it.

Also checks that the workdir is usable before anything is loaded: a path that is a
file, or a directory that cannot be written, raises `FilesystemError` in one line.

A workdir on an object store (`gs://...`) has no flock: the lock is a create-if-absent lock
object with a lease renewed by a heartbeat (`dpft.train.remote_lock`); a second run gets the
same `WorkdirBusyError`, and a crashed holder's lock is taken over once its lease is stale.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time
from typing import Any

from dpft import paths
from dpft.errors import FilesystemError, WorkdirBusyError, describe_oserror
from dpft.train import remote_lock

LOCK_NAME = ".dpft.lock"

# lock file (realpath) or lock object URL -> (fd or RemoteLease, nesting depth)
_held: dict[str, tuple[Any, int]] = {}
_guard = threading.Lock()


def lock_path(workdir: str | os.PathLike) -> str:
    """`WORKDIR/.dpft.lock` (absolute, symlinks resolved; a URL for a remote workdir)."""
    if paths.is_remote(workdir):
        return paths.join(workdir, LOCK_NAME)
    return os.path.join(os.path.realpath(os.fspath(workdir)), LOCK_NAME)


def _prepare_remote(path: str) -> str:
    try:
        p = paths.as_path(path)
        if p.exists() and not p.is_dir():
            raise FilesystemError(0, f"--workdir {path} exists and is not a directory", path)
        p.mkdir(parents=True, exist_ok=True)
    except FilesystemError:
        raise
    except OSError as e:
        raise FilesystemError(e.errno or 0, f"--workdir {path}: cannot create it ({e})", path) from e
    return path


def prepare_workdir(workdir: str | os.PathLike) -> str:
    """Create `workdir` if needed; raise FilesystemError when it is a file or cannot be created."""
    if paths.is_remote(workdir):
        return _prepare_remote(paths.to_str(workdir))
    path = os.path.abspath(os.fspath(workdir))
    if os.path.exists(path) and not os.path.isdir(path):
        raise FilesystemError(errno.ENOTDIR, f"--workdir {path} exists and is not a directory", path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise FilesystemError(e.errno, f"--workdir {path}: cannot create it ({describe_oserror(e)})", path) from e
    return path


def read_holder(workdir: str | os.PathLike) -> dict[str, Any]:
    """What the lock file says about its holder ({} when unreadable or empty)."""
    if paths.is_remote(workdir):
        return remote_lock.RemoteLease(lock_path(workdir), paths.to_str(workdir)).read_holder()
    try:
        with open(lock_path(workdir), encoding="utf-8") as f:
            data = json.loads(f.read() or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process (holder unknown)"
    since = holder.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(since)) if isinstance(since, (int, float)) else "?"
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (since {when})"


class WorkdirLock:
    """Exclusive, non-blocking lock of a workdir; raises WorkdirBusyError if another process holds it."""

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
        self.workdir = paths.absolute(workdir)
        self.enabled = enabled
        self._key: str | None = None

    def acquire(self) -> "WorkdirLock":
        if not self.enabled:
            return self
        prepare_workdir(self.workdir)
        key = lock_path(self.workdir)
        with _guard:
            if key in _held:  # this process holds it already (e.g. the CLI around the loop)
                fd, depth = _held[key]
                _held[key] = (fd, depth + 1)
                self._key = key
                return self
            if paths.is_remote(self.workdir):
                lease = remote_lock.RemoteLease(key, self.workdir)
                lease.acquire(_describe)
                _held[key] = (lease, 1)
                self._key = key
                return self
            try:
                fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise FilesystemError(e.errno, f"--workdir {self.workdir} is not writable "
                                      f"({describe_oserror(e)})", key) from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise WorkdirBusyError(
                        f"{self.workdir} is in use by {_describe(read_holder(self.workdir))}: one run per "
                        f"workdir; wait for it to finish or use another --workdir") from None
                raise FilesystemError(e.errno, f"cannot lock {key} ({describe_oserror(e)})", key) from e
            try:
                holder = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
                os.ftruncate(fd, 0)
                os.pwrite(fd, holder.encode(), 0)
            except OSError as e:
                os.close(fd)
                raise FilesystemError(e.errno, f"--workdir {self.workdir} is not writable "
                                      f"({describe_oserror(e)})", key) from e
            _held[key] = (fd, 1)
            self._key = key
        return self

    def release(self) -> None:
        if self._key is None:
            return
        with _guard:
            fd, depth = _held[self._key]
            if depth > 1:
                _held[self._key] = (fd, depth - 1)
            else:
                del _held[self._key]
                if isinstance(fd, remote_lock.RemoteLease):
                    fd.release()  # deletes the lock object (if still ours)
                else:
                    # Leave the file (unlinking would race with a process about to lock it).
                    os.close(fd)  # closing drops the flock
            self._key = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def held_by_this_process(workdir: str | os.PathLike) -> bool:
    """True when this process holds the lock of `workdir`."""
    with _guard:
        return lock_path(workdir) in _held
