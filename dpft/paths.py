"""Which paths dpft can use, checked up front: local (or FUSE-mounted) paths, and object-store
URLs through `etils.epath` (`gs://`, `s3://`, `az://`, read and written with fsspec's
gcsfs/s3fs/adlfs: `pip install 'dpft[gcs]'` for gs://).

Any other `scheme://` (http://, file://, hdfs://, ...) is refused with a one-line
`UsageError` instead of being taken for a relative local folder named `http:`. What an object
store cannot do safely (POSIX locks, atomic rename, permissions) is handled where it matters:
`dpft.atomic_io` (write-then-verify, a warning for private files) and
`dpft.train.workdir_lock` (a create-if-absent lock object with a lease).
"""
from __future__ import annotations

import os
import re
from typing import Any

from dpft.errors import UsageError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

#: URL schemes read and written through etils.epath (and the fsspec package that serves each).
REMOTE_SCHEMES = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs"}


def is_url(path: Any) -> bool:
    """True for `scheme://...` (gs://, s3://, http://, file://, ...)."""
    return path is not None and bool(_URL.match(os.fspath(path) if not isinstance(path, str) else path))


def scheme(path: Any) -> str | None:
    """The URL scheme of `path` ('gs'), or None for a local path."""
    return to_str(path).split("://", 1)[0].lower() if is_url(path) else None


def is_remote(path: Any) -> bool:
    """True for a URL of an object store dpft supports (see REMOTE_SCHEMES)."""
    return scheme(path) in REMOTE_SCHEMES


def to_str(path: Any) -> str:
    """`path` (str, os.PathLike, epath.Path) as a string; `gs://` URLs keep their two slashes."""
    return path if isinstance(path, str) else os.fspath(path)


def as_path(path: Any) -> Any:
    """An `etils.epath.Path` for `path` (local or remote)."""
    from etils import epath

    return epath.Path(to_str(path))


def absolute(path: Any) -> str:
    """A local path made absolute; a remote URL unchanged (os.path.abspath would mangle `gs://`)."""
    path = to_str(path)
    return path if is_remote(path) else os.path.abspath(path)


def join(base: Any, *parts: str) -> str:
    """`os.path.join` that is also right for URLs (they always use `/`)."""
    base = to_str(base)
    if is_remote(base):
        return "/".join([base.rstrip("/")] + [p.strip("/") for p in parts])
    return os.path.join(base, *parts)


def dirname(path: Any) -> str:
    """The folder holding `path`: `os.path.dirname(os.path.abspath(...))` locally, the URL up to
    its last `/` remotely."""
    path = to_str(path)
    if is_remote(path):
        return path.rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(path))


def exists(path: Any) -> bool:
    """`os.path.exists` for local paths, the object store's answer for URLs."""
    return as_path(path).exists() if is_remote(path) else os.path.exists(to_str(path))


def isdir(path: Any) -> bool:
    """`os.path.isdir` for local paths, the object store's answer for URLs."""
    return as_path(path).is_dir() if is_remote(path) else os.path.isdir(to_str(path))


def isfile(path: Any) -> bool:
    """`os.path.isfile` for local paths, the object store's answer for URLs."""
    return as_path(path).is_file() if is_remote(path) else os.path.isfile(to_str(path))


def listdir(path: Any) -> list[str]:
    """Names in directory `path` (local or remote)."""
    return [p.name for p in as_path(path).iterdir()] if is_remote(path) else os.listdir(to_str(path))


def _check_backend(path: str, what: str) -> None:
    name = scheme(path)
    try:
        import fsspec

        fsspec.get_filesystem_class(name)
    except ImportError:
        raise UsageError(f"{what} {path!r}: {name}:// paths need the {REMOTE_SCHEMES[name]} package "
                         f"(pip install 'dpft[gcs]' or pip install {REMOTE_SCHEMES[name]})") from None


def check_supported(path: Any, what: str) -> None:
    """Raise UsageError when `path` (named `what` in the message) is a URL dpft cannot read or
    write: a scheme other than REMOTE_SCHEMES, or one whose fsspec package is not installed."""
    if not path or not is_url(path):
        return
    path = to_str(path)
    if not is_remote(path):
        supported = ", ".join(f"{s}://" for s in REMOTE_SCHEMES)
        raise UsageError(f"{what} {path!r}: {scheme(path)}:// paths are not supported; use a local or "
                         f"mounted path, or one of {supported}")
    _check_backend(path, what)


def check_credentials(path: Any, what: str) -> None:
    """For a `gs://` path that dpft will write through the real gcsfs: UsageError at once when
    google-auth (what gcsfs authenticates with) finds no credentials. Without this check gcsfs falls
    back to anonymous access and retries each request for about a minute before failing with a
    traceback. Other schemes, and gs:// served by another fsspec implementation, are not checked."""
    if not path or scheme(to_str(path)) != "gs":
        return
    import fsspec

    if not fsspec.get_filesystem_class("gs").__module__.startswith("gcsfs"):
        return
    try:
        import google.auth
        import google.auth.exceptions
    except ImportError:  # pragma: no cover - gcsfs depends on google-auth
        return
    try:
        google.auth.default()
    except google.auth.exceptions.DefaultCredentialsError as e:
        raise UsageError(f"{what} {to_str(path)!r}: no Google Cloud credentials found ({str(e).splitlines()[0]}); "
                         f"run `gcloud auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS to a "
                         f"service-account key file (on GCE/TPU VMs the VM's service account is used)") from None


def check_local(path: Any, what: str, why: str = "") -> None:
    """Raise UsageError when `path` is any URL (for inputs that must be on a local or mounted disk)."""
    if path and is_url(path):
        path = to_str(path)
        reason = f" ({why})" if why else ""
        raise UsageError(f"{what} {path!r}: {scheme(path)}:// paths are not supported here{reason}; use a "
                         f"local or mounted path (e.g. gcsfuse --implicit-dirs BUCKET /mnt/BUCKET)")
