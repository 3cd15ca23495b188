"""The one way dpft writes a file: atomically, on a local disk or on an object store.

    atomic_io.write_bytes(path, data_or_writer, private=False)
    atomic_io.write_text(path, text);  atomic_io.write_json(path, obj, indent=2)
    atomic_io.append_text(path, line, private=True)
    atomic_io.make_dir(path, private=True)

Local paths (and FUSE mounts): the bytes go to a temporary file in the same directory
(`<name>.tmp.<pid>.<random>`, created with O_EXCL), which is flushed and fsynced, renamed over
the target with `os.replace`, and the directory is fsynced, so a crash leaves the old file or
the new one, never a torn one. `private=True`: the file is created with mode 0600 (never
readable by others, not even for a moment) and directories made here 0700.

Remote URLs (`gs://`, `s3://`, ... through `etils.epath`): an object store has no atomic
rename, no fsync and no permissions, but one object upload is all-or-nothing. A write uploads
a temporary object beside the target, reads it back and compares its SHA-256 with the bytes
meant (write-then-verify), copies it over the target, verifies the target the same way and
deletes the temporary object. A crash at any point leaves the last good target (a stale
`.tmp.` object at worst). `private=True` cannot be enforced there: the file is written and a
loud warning names it (its privacy rests on the bucket's IAM). Appends are read-modify-write
of the whole object (fine for logs of a run; one writer per workdir, held by its lock).

Every write raises OSError (the CLI reports filesystem errnos in one line, exit 5).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import uuid
from typing import IO, Any, Callable, Iterator

from dpft import paths

FILE_MODE = 0o600
DIR_MODE = 0o700

Writer = Callable[[IO[bytes]], None]

_warned_private: set[str] = set()


def _payload(data: bytes | str | Writer) -> bytes:
    """The bytes to write: `data` itself, UTF-8 of a str, or what `data(f)` writes to a buffer."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, str):
        return data.encode("utf-8")
    buf = io.BytesIO()
    data(buf)
    return buf.getvalue()


def warn_not_private(path: str, what: str = "file") -> None:
    """Print (once per path) that owner-only permissions cannot be enforced on remote `path`."""
    if path in _warned_private:
        return
    _warned_private.add(path)
    print(f"WARNING: {path}: private {what} (per-example/per-patient data) written to an object store, "
          f"where owner-only permissions cannot be set; its privacy rests on the bucket's IAM alone",
          file=sys.stderr, flush=True)


def _fsync_dir(directory: str) -> None:
    """fsync a directory so that a rename in it survives a power loss (no-op where unsupported)."""
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (e.g. some FUSE mounts) refuse fsync on directories
    finally:
        os.close(fd)


def _write_local(path: str, data: bytes | str | Writer, private: bool) -> None:
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE if private else 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(_payload(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _verify_remote(p: Any, want: str, size: int) -> None:
    got = p.read_bytes()
    if len(got) != size or _sha(got) != want:
        raise OSError(0, f"{p}: the object read back differs from what was written "
                         f"({len(got)} of {size} bytes, sha256 mismatch)", os.fspath(p))


def _write_remote(path: str, data: bytes | str | Writer, private: bool) -> None:
    if private:
        warn_not_private(path)
    p = paths.as_path(path)
    blob = _payload(data)
    want = _sha(blob)
    tmp = p.parent / f".{p.name}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_bytes(blob)
        _verify_remote(tmp, want, len(blob))
        tmp.copy(p, overwrite=True)
        _verify_remote(p, want, len(blob))
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # a stale temporary object is harmless (it never has the target's name)


@contextlib.contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise an OSError that names no file (a failed `write`/`flush`/`fsync` on an open file,
    e.g. ENOSPC) as the same errno naming `path`, so that the one-line error says which file."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno:
            raise OSError(e.errno, e.strerror or str(e), os.fspath(path)) from e
        raise


def write_bytes(path: str | os.PathLike, data: bytes | str | Writer, *, private: bool = False) -> str:
    """Atomically replace `path` with `data` (bytes, str as UTF-8, or a function writing to a binary
    file). private=True: owner-only (0600) locally; a warning on remote paths. Returns the path.
    An OSError names `path`."""
    path = paths.to_str(path)
    with naming(path):
        if paths.is_remote(path):
            _write_remote(path, data, private)
        else:
            _write_local(path, data, private)
    return path


def write_text(path: str | os.PathLike, text: str, *, private: bool = False) -> str:
    """Atomically replace `path` with `text` (UTF-8)."""
    return write_bytes(path, text, private=private)


def write_json(path: str | os.PathLike, obj: Any, *, private: bool = False, **dumps: Any) -> str:
    """Atomically replace `path` with `json.dumps(obj, **dumps)`; serialises before touching the file."""
    return write_bytes(path, json.dumps(obj, **dumps), private=private)


def append_text(path: str | os.PathLike, text: str, *, private: bool = False) -> None:
    """Append `text` to `path` (created if absent). Locally an O_APPEND write (0600 when private);
    remotely a read-modify-write of the whole object. An OSError names `path`."""
    path = paths.to_str(path)
    with naming(path):
        if paths.is_remote(path):
            p = paths.as_path(path)
            old = p.read_bytes() if p.exists() else b""
            _write_remote(path, old + text.encode("utf-8"), private)
            return
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE if private else 0o666)
        try:
            if private:
                os.fchmod(fd, FILE_MODE)  # an existing file is made owner-only too
            with os.fdopen(fd, "ab") as f:
                fd = -1
                f.write(text.encode("utf-8"))
        finally:
            if fd >= 0:
                os.close(fd)


def make_dir(path: str | os.PathLike, *, private: bool = False) -> str:
    """Create `path` and its parents if needed. private=True: the local directory is 0700, also one
    that exists already with wider modes (what lies below it, e.g. a run's secret, is then out of
    other users' reach whatever its files' modes); a remote one gets a warning (object stores have
    no permissions)."""
    path = paths.to_str(path)
    if paths.is_remote(path):
        if private:
            warn_not_private(path, "directory")
        paths.as_path(path).mkdir(parents=True, exist_ok=True)
        return path
    if not os.path.isdir(path):
        os.makedirs(path, mode=DIR_MODE if private else 0o777, exist_ok=True)
    if private and not is_owner_only(path):
        os.chmod(path, DIR_MODE)  # makedirs' mode is masked by the umask; an older directory may be 0755
    return path


def is_owner_only(path: str | os.PathLike) -> bool:
    """True when neither group nor others have any permission on local `path`."""
    return (os.stat(path).st_mode & 0o077) == 0


__all__ = ["write_bytes", "write_text", "write_json", "append_text", "make_dir", "is_owner_only",
           "warn_not_private", "FILE_MODE", "DIR_MODE"]
