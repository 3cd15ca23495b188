"""Paths dpft can use: local (or FUSE-mounted) file system paths only, checked up front.

Cloud URLs (`gs://bucket/...`, `s3://...`) are refused with a one-line `UsageError` instead of
being taken for a relative local folder named `gs:`. Workdirs need POSIX locking (fcntl), atomic
renames and hard links, which object stores do not offer; mount the bucket (e.g. `gcsfuse
--implicit-dirs BUCKET /mnt/BUCKET`, or a local disk of the TPU VM and copy the results out).
"""
from __future__ import annotations

import re

from dpft.errors import UsageError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path: str) -> bool:
    """True for `scheme://...` (gs://, s3://, http://, file://, ...)."""
    return bool(_URL.match(str(path)))


def check_local(path: str | None, what: str) -> None:
    """Raise UsageError when `path` (named `what` in the message) is a URL rather than a local path."""
    if path and is_url(path):
        scheme = str(path).split("://", 1)[0]
        raise UsageError(f"{what} {path!r}: {scheme}:// paths are not supported; use a local or mounted path "
                         f"(e.g. gcsfuse --implicit-dirs BUCKET /mnt/BUCKET, then /mnt/BUCKET/...)")
