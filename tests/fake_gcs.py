"""A fake `gs://` object store for tests: fsspec's local filesystem under $DPFT_FAKE_GCS_ROOT,
registered for the `gs`/`gcs` protocols so that dpft reaches it through the real
`etils.epath` -> fsspec code path, with object-store semantics where they matter:

- an upload becomes visible only when it completes (a failed or killed write leaves nothing);
- `pipe_file(..., mode="create")` is an atomic create-if-absent (GCS `ifGenerationMatch=0`);
- no directories to create first (parents appear implicitly).
Usable from several processes at once (the store is a directory): call `install()` in each.
No network is ever touched.
"""
from __future__ import annotations

import io
import os
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem

ENV = "DPFT_FAKE_GCS_ROOT"


def _root() -> str:
    root = os.environ.get(ENV)
    if not root:
        raise RuntimeError(f"fake gs:// store used without ${ENV}")
    return root


class _Upload(io.BytesIO):
    """A write that lands on the store only when closed without an error (like a GCS upload)."""

    def __init__(self, target: str):
        super().__init__()
        self.target, self.failed = target, False

    def __exit__(self, exc_type, *rest):
        self.failed = exc_type is not None
        return super().__exit__(exc_type, *rest)

    def close(self) -> None:
        if not self.closed and not self.failed:
            os.makedirs(os.path.dirname(self.target), exist_ok=True)
            tmp = f"{self.target}.upload-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(self.getvalue())
            os.replace(tmp, self.target)
        super().close()


class FakeGCS(LocalFileSystem):
    """`gs://bucket/key` -> `$DPFT_FAKE_GCS_ROOT/bucket/key`."""

    protocol = ("gs", "gcs")
    root_marker = ""

    def __init__(self, *args, **kwargs):
        kwargs.pop("finalize_on_close", None)
        super().__init__(auto_mkdir=True)

    @classmethod
    def _strip_protocol(cls, path):
        path = os.fspath(path)
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                return os.path.join(_root(), path[len(prefix):]).rstrip("/")
        return path.rstrip("/")

    def _open(self, path, mode="rb", **kwargs):
        if "w" in mode or "x" in mode:
            path = self._strip_protocol(path)
            if "x" in mode and os.path.exists(path):
                raise FileExistsError(path)
            return _Upload(path)
        if "a" in mode:
            raise OSError("object stores cannot append")
        return super()._open(path, mode=mode, **kwargs)

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        path = self._strip_protocol(path)
        if mode != "create":
            with _Upload(path) as f:
                f.write(value)
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.upload-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(value)
        try:
            os.link(tmp, path)  # atomic: fails when the object exists
        except FileExistsError:
            raise FileExistsError(path) from None
        finally:
            os.remove(tmp)


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
