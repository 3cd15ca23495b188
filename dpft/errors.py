"""The error types every layer of dpft raises for *expected* failures, with their exit codes.

The `dpft` command (`dpft/cli.py`) prints any `DpftError` as one line
`dpft <command>: error: <message>` and exits with its `exit_code`; any other exception
is a bug and keeps its traceback. Filesystem failures (`OSError` with one of
`FILESYSTEM_ERRNOS`, e.g. disk full or a read-only directory) are expected too: the
CLI prints them on one line with `FilesystemError.exit_code`.

| exit | type | meaning |
|---|---|---|
| 2 | `UsageError`, `ConfigError` | an invalid value given by the user (refused before any data is loaded) |
| 2 | `DataError` | the data on disk is missing, unreadable or malformed (the user's input too) |
| 3 | `CheckpointError` | no intact checkpoint to resume from, or a checkpoint that fails its checks |
| 4 | `WorkdirBusyError` | another process holds the workdir |
| 5 | `FilesystemError` | the filesystem refused a write (full, read-only, not a directory, ...) |
| 6 | `NonFiniteError` | training produced a non-finite loss, gradient or parameter |
| 75 | `STOPPED_EARLY_EXIT_CODE` | `dpft train` stopped early (SIGTERM/SIGINT/SIGUSR1, e.g. a SLURM time limit or preemption) after saving its last completed update: not done; rerun the same command to resume (75 = EX_TEMPFAIL) |

This module imports nothing from dpft (it is the lowest layer).
"""
from __future__ import annotations

import errno

#: errno values of OSErrors that are the environment's fault, not a bug: reported in one line.
FILESYSTEM_ERRNOS = frozenset({
    errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
    errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.EMFILE, errno.ENFILE, errno.EIO,
})


#: `dpft train` stopped by a signal before the end, its last completed update saved: rerun to resume.
#: Not an error (nothing is lost) but not success either, so `afterok` dependencies and sweeps wait.
STOPPED_EARLY_EXIT_CODE = 75


class DpftError(Exception):
    """Base of every expected dpft failure; the CLI prints the message and exits with `exit_code`."""

    exit_code = 1


class UsageError(DpftError, ValueError):
    """Invalid user input; the CLI prints its message on one line and exits with 2."""

    exit_code = 2


class ConfigError(UsageError):
    """An invalid run config value or combination (exit 2)."""


class DataError(UsageError):
    """Bad data on disk or bad data options: the message names file, row, column and value (exit 2)."""


class CheckpointError(DpftError):
    """No intact checkpoint, or one that fails its checksum/ledger checks (exit 3)."""

    exit_code = 3


class WorkdirBusyError(DpftError):
    """Another process holds the workdir's lock (exit 4)."""

    exit_code = 4


class FilesystemError(DpftError, OSError):
    """The filesystem refused an operation (disk full, read-only, not a directory; exit 5).

    Built like an OSError: `FilesystemError(errno, message, path)`; `str()` is the message.
    """

    exit_code = 5

    def __str__(self) -> str:
        return self.strerror if self.strerror else super().__str__()


class NonFiniteError(DpftError, FloatingPointError):
    """Training produced a non-finite loss, gradient or parameter (exit 6)."""

    exit_code = 6


def filesystem_cause(exc: BaseException) -> OSError | None:
    """The first OSError with an errno in FILESYSTEM_ERRNOS in `exc`'s cause/context chain."""
    seen: set[int] = set()
    node: BaseException | None = exc
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        if isinstance(node, OSError) and node.errno in FILESYSTEM_ERRNOS:
            return node
        node = node.__cause__ or node.__context__
    return None


def describe_oserror(err: OSError) -> str:
    """`'<path>: <strerror>'` for an OSError (one line)."""
    where = err.filename if err.filename is not None else ""
    text = err.strerror or str(err)
    return f"{where}: {text}" if where else text
