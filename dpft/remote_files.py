"""Reading inputs that may live on an object store (`gs://`, `s3://`, `az://`).

    remote_files.open_binary(path)    a binary file object
    remote_files.read_bytes(path)     the whole file
    remote_files.local_copy(path)     context manager: a local path with the same content
    remote_files.FileSet(base)        `exists(path)` for many files under `base`

Local paths (and FUSE mounts) are read straight from the disk, exactly as before; only remote
URLs go through `etils.epath` (fsspec's gcsfs/s3fs/adlfs). Reads raise FileNotFoundError for a
missing file and OSError for anything else the store refuses; callers name the file in their
error. `local_copy` of a remote file or directory tree downloads it into a private (0700)
temporary directory, removed on exit (for readers that need a real file: orbax, tensorstore).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import IO, Any, Iterator

from dpft import paths


def open_binary(path: Any) -> IO[bytes]:
    """`path` opened for reading bytes (local: `open`; remote: epath)."""
    if paths.is_remote(path):
        return paths.as_path(path).open("rb")
    return open(paths.to_str(path), "rb")


def read_bytes(path: Any) -> bytes:
    """The content of file `path` (local or remote)."""
    with open_binary(path) as f:
        return f.read()


def read_text(path: Any, encoding: str = "utf-8") -> str:
    """The content of text file `path` (local or remote)."""
    return read_bytes(path).decode(encoding)


def _fs(url: str) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(url)


def list_files(url: str) -> dict[str, int]:
    """{relative path: size} of every object under remote directory `url` (one listing)."""
    fs, root = _fs(url)
    root = root.rstrip("/")
    out = {}
    for name, info in fs.find(root, detail=True).items():
        rel = name[len(root):].lstrip("/") if name.startswith(root) else name
        if rel and info.get("type", "file") == "file":
            out[rel] = int(info.get("size") or 0)
    return out


def _download_file(url: str, target: str) -> None:
    """Copy the one object `url` to local file `target` in 4 MiB chunks."""
    with open_binary(url) as src, open(target, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 22)


def download_tree(url: str, dest: str, only: Any = None) -> dict[str, int]:
    """Copy the objects under `url` into local directory `dest` -> {relative path: size}.

    `only(rel) -> bool` picks the files to copy (default: all). FileNotFoundError when one
    vanishes meanwhile."""
    copied = {}
    for rel, size in sorted(list_files(url).items()):
        if only is not None and not only(rel):
            continue
        target = os.path.join(dest, *rel.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        _download_file(paths.join(url, rel), target)
        copied[rel] = size
    return copied


@contextlib.contextmanager
def local_copy(path: Any) -> Iterator[str]:
    """A local path with the content of `path`: `path` itself when local; for a remote file or
    directory a copy under a private temporary directory (same base name), deleted on exit."""
    if not paths.is_remote(path):
        yield paths.to_str(path)
        return
    url = paths.to_str(path).rstrip("/")
    tmp = tempfile.mkdtemp(prefix="dpft-remote-")  # 0700
    try:
        target = os.path.join(tmp, url.rsplit("/", 1)[-1] or "copy")
        if paths.isdir(url):
            os.makedirs(target)
            download_tree(url, target)
        else:
            _download_file(url, target)
        yield target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class FileSet:
    """`exists(path)` for many files under `base`: `os.path.exists` locally (as fast as before);
    under a remote `base`, one recursive listing (made at the first question) instead of one
    request per file."""

    def __init__(self, base: Any):
        self.base = paths.to_str(base).rstrip("/")
        self._names: set[str] | None = None

    def exists(self, path: str) -> bool:
        if not paths.is_remote(path):
            return os.path.exists(path)
        prefix = self.base + "/"
        if not path.startswith(prefix):
            return paths.exists(path)
        if self._names is None:
            self._names = set(list_files(self.base)) if paths.isdir(self.base) else set()
        return path[len(prefix):] in self._names


__all__ = ["open_binary", "read_bytes", "read_text", "list_files", "download_tree", "local_copy", "FileSet"]
