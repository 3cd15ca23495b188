"""Where the libraries' own failure reports go during `dpft train`: a file in the workdir.

orbax's writer threads, tensorboardX's flushing thread and their exit clean-ups report failures by
themselves (absl logging, uncaught exceptions in threads, exceptions in atexit callbacks): on a full
disk, hundreds of traceback lines around dpft's one-line verdict (issue 31). `route_to(workdir)` sends
them to `WORKDIR/logs/libraries.log` instead (created at the first message; a message that cannot be
written, e.g. on that full disk, is dropped, never raised), and says once on stderr where they go.
dpft's own lines (its prints, its warnings, the error line last) are unchanged. `DPFT_DEBUG=1`, or a
workdir on an object store, leaves everything on stderr.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any

#: The file, relative to the workdir.
LOG_NAME = os.path.join("logs", "libraries.log")
#: The loggers of the libraries whose records go to the file (absl: orbax, dp-accounting).
LIBRARY_LOGGERS = ("absl",)


class _FileOnly(logging.Handler):
    """Appends each record to `path` (its folder made at the first record); a failed write is dropped."""

    def __init__(self, path: str, announce: bool = True) -> None:
        super().__init__()
        self.path = path
        self._announce = announce
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if self._announce and record.levelno >= logging.ERROR:
            self._announce = False
            print(f"dpft train: the libraries' own messages go to {self.path}", file=sys.stderr, flush=True)
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - e.g. the full disk that caused the message: drop it
            pass


def route_to(workdir: str) -> str | None:
    """Send the libraries' log records, uncaught thread exceptions and exceptions of atexit callbacks to
    `WORKDIR/logs/libraries.log` for the rest of this process -> that path (None: left on stderr)."""
    from dpft import paths

    if os.environ.get("DPFT_DEBUG") == "1" or paths.is_remote(workdir):
        return None
    path = os.path.join(paths.absolute(workdir), LOG_NAME)
    handler = _FileOnly(path)
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.propagate = False
    sink = logging.getLogger("dpft.libraries")
    sink.handlers, sink.propagate, sink.level = [handler], False, logging.INFO

    def thread_exception(args: Any) -> None:
        sink.error("uncaught exception in thread %s", getattr(args.thread, "name", "?"),
                   exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    def unraisable(u: Any) -> None:
        sink.error("%s %r", u.err_msg or "exception ignored in", u.object,
                   exc_info=(u.exc_type, u.exc_value, u.exc_traceback))

    threading.excepthook = thread_exception
    sys.unraisablehook = unraisable
    return path


__all__ = ["LOG_NAME", "route_to"]
