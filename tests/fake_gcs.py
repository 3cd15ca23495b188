"""A fake `gs://` object store for tests: fsspec's local filesystem under $DPFT_FAKE_GCS_ROOT,
registered for the `gs`/`gcs` protocols so that dpft reaches it through the real
`etils.epath` -> fsspec code path, with object-store semantics where they matter:

- an upload becomes visible only when it completes (a failed or killed write leaves nothing);
- every write of an object (upload, pipe, copy) makes a new *generation*, reported by
  `info(path)["generation"]` as gcsfs does; generations are never reused (each version keeps a
  hard link under `$ROOT/.versions/`, so its inode number stays taken);
- conditional operations are atomic across processes (each object's mutations are serialised by
  an flock, as the real service serialises them): `pipe_file(..., mode="create")` and
  `open(path, "xb")` create only if absent (GCS `ifGenerationMatch=0`, FileExistsError otherwise);
  on a filesystem made with `version_aware=True` (like gcsfs), `rm_file("path#G")` and
  `cat_file("path#G")` act on generation G only and raise FileNotFoundError when the object is
  gone or has another generation (GCS `DELETE/GET ...?generation=G` on a bucket without
  versioning); without `version_aware`, `#G` is part of the object name, as in gcsfs;
- no directories to create first (parents appear implicitly).
Usable from several processes at once (the store is a directory): call `install()` in each.
No network is ever touched.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import re
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem

ENV = "DPFT_FAKE_GCS_ROOT"
_GENERATION = re.compile(r"^(.*)#(\d+)$")


def _root() -> str:
    root = os.environ.get(ENV)
    if not root:
        raise RuntimeError(f"fake gs:// store used without ${ENV}")
    return root


@contextlib.contextmanager
def _object_lock(path: str):
    """Serialise the mutations of one object (local path `path`) across processes."""
    locks = os.path.join(_root(), ".locks")
    os.makedirs(locks, exist_ok=True)
    fd = os.open(os.path.join(locks, hashlib.sha1(path.encode()).hexdigest()), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # drops the flock


def _new_version(target: str, data: bytes) -> str:
    """A complete temporary file beside `target` holding `data`, also linked under .versions/."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.upload-{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(data)
    versions = os.path.join(_root(), ".versions")
    os.makedirs(versions, exist_ok=True)
    os.link(tmp, os.path.join(versions, uuid.uuid4().hex))  # keeps the inode (generation) taken
    return tmp


def _put(target: str, data: bytes, *, exclusive: bool = False) -> None:
    """Write object `target` as a new generation; `exclusive`: only if it does not exist."""
    tmp = _new_version(target, data)
    try:
        with _object_lock(target):
            if exclusive:
                try:
                    os.link(tmp, target)  # atomic: fails when the object exists
                except FileExistsError:
                    raise FileExistsError(target) from None
            else:
                os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def generation(path: str) -> str:
    """The generation of the object at local path `path` (its never-reused inode number)."""
    return str(os.stat(path).st_ino)


class _Upload(io.BytesIO):
    """A write that lands on the store only when closed without an error (like a GCS upload)."""

    def __init__(self, target: str, exclusive: bool = False):
        super().__init__()
        self.target, self.exclusive, self.failed = target, exclusive, False

    def __exit__(self, exc_type, *rest):
        self.failed = exc_type is not None
        return super().__exit__(exc_type, *rest)

    def close(self) -> None:
        if not self.closed and not self.failed:
            data = self.getvalue()
            super().close()
            _put(self.target, data, exclusive=self.exclusive)
            return
        super().close()


class FakeGCS(LocalFileSystem):
    """`gs://bucket/key` -> `$DPFT_FAKE_GCS_ROOT/bucket/key`."""

    protocol = ("gs", "gcs")
    root_marker = ""

    def __init__(self, *args, version_aware: bool = False, **kwargs):
        kwargs.pop("finalize_on_close", None)
        super().__init__(auto_mkdir=True)
        self.version_aware = version_aware

    @classmethod
    def _strip_protocol(cls, path):
        path = os.fspath(path)
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                return os.path.join(_root(), path[len(prefix):]).rstrip("/")
        return path.rstrip("/")

    def _split_generation(self, path) -> tuple[str, str | None]:
        path = self._strip_protocol(path)
        m = _GENERATION.match(path) if self.version_aware else None
        return (m.group(1), m.group(2)) if m else (path, None)

    def info(self, path, **kwargs):
        out = super().info(path, **kwargs)
        if out.get("type") == "file":
            out["generation"] = generation(self._strip_protocol(path))
        return out

    def cat_file(self, path, start=None, end=None, **kwargs):
        path, gen = self._split_generation(path)
        if gen is None:
            return super().cat_file(path, start=start, end=end, **kwargs)
        with open(path, "rb") as f:  # FileNotFoundError when absent
            if generation(path) != gen or str(os.fstat(f.fileno()).st_ino) != gen:
                raise FileNotFoundError(f"{path}#{gen}")
            data = f.read()
        return data[start:end]

    def rm_file(self, path):
        path, gen = self._split_generation(path)
        with _object_lock(path):
            if gen is not None and (not os.path.exists(path) or generation(path) != gen):
                raise FileNotFoundError(f"{path}#{gen}")
            os.remove(path)

    def cp_file(self, path1, path2, **kwargs):
        src, dst = self._strip_protocol(path1), self._strip_protocol(path2)
        if self.isdir(src):
            return super().cp_file(path1, path2, **kwargs)
        with open(src, "rb") as f:
            data = f.read()
        _put(dst, data)  # a copy is a new generation of the target

    def _open(self, path, mode="rb", **kwargs):
        if "w" in mode or "x" in mode:
            return _Upload(self._strip_protocol(path), exclusive="x" in mode)
        if "a" in mode:
            raise OSError("object stores cannot append")
        return super()._open(path, mode=mode, **kwargs)

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        _put(self._strip_protocol(path), value, exclusive=mode == "create")


def install() -> None:
    """Serve gs:// (and gcs://) from the fake store in this process (epath and fsspec)."""
    from etils.epath import backend

    for proto in FakeGCS.protocol:
        fsspec.register_implementation(proto, FakeGCS, clobber=True)
    backend.fsspec_backend._get_filesystem.cache_clear()


def uninstall() -> None:
    """Undo `install()`: gs:// is served by whatever fsspec would pick without the fake."""
    import importlib

    from etils.epath import backend

    registry = importlib.import_module("fsspec.registry")  # the module (fsspec.registry is its mapping)
    for proto in FakeGCS.protocol:
        if registry.registry.get(proto) is FakeGCS:
            registry._registry.pop(proto, None)  # noqa: SLF001 - fsspec has no unregister function
    backend.fsspec_backend._get_filesystem.cache_clear()


def local(url: str) -> str:
    """The local file behind fake `gs://...` URL `url`."""
    return FakeGCS._strip_protocol(url)
