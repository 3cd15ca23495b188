"""The workdir lock on an object store (`gs://...`): a create-if-absent lock object with a lease.

An object store has no `flock`, and nothing drops a lock when its holder dies. So:

- Acquire: create `WORKDIR/.dpft.lock` only if it does not exist (fsspec `pipe_file(...,
  mode="create")`, which gcsfs sends as `ifGenerationMatch=0`: of two racing writers exactly
  one succeeds). It holds a random token and the holder (`pid`, `host`, `since`, `renewed`,
  `lease_s`).
- Heartbeat: a daemon thread rewrites `renewed` every `lease_s / 3` seconds while the token in
  the object is still ours (if it is not, the lock was taken over: `lost` is set and a warning
  printed).
- Busy: a lock object renewed less than `stale_after_s` ago means another live run:
  `WorkdirBusyError` (exit 4) naming it. One renewed longer ago is a crashed holder's: it is
  deleted and the create retried once (taking over a stale lock is the one step that is not
  race-free without delete preconditions; `stale_after_s` defaults to 5 leases).
- Release: the heartbeat stops and the object is deleted if its token is still ours.
Clocks of the hosts are compared (`renewed` is wall time): keep them NTP-synchronised.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any, Callable

from dpft.errors import FilesystemError, WorkdirBusyError

LEASE_S = 60.0
STALE_AFTER_S = 5 * LEASE_S


def _fs(url: str) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(url)


class RemoteLease:
    """Holds `lock_url` (an object-store URL) until `release()`; see the module docstring."""

    def __init__(self, lock_url: str, workdir: str, *, lease_s: float = LEASE_S,
                 stale_after_s: float = STALE_AFTER_S, clock: Callable[[], float] = time.time):
        self.url, self.workdir = lock_url, workdir
        self.lease_s, self.stale_after_s, self._clock = float(lease_s), float(stale_after_s), clock
        self.token = uuid.uuid4().hex
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fs, self._path = _fs(lock_url)

    def _record(self, since: float) -> bytes:
        return json.dumps({"token": self.token, "pid": os.getpid(), "host": socket.gethostname(),
                           "since": since, "renewed": self._clock(), "lease_s": self.lease_s}).encode()

    def read_holder(self) -> dict[str, Any]:
        """The lock object's content ({} when absent or unreadable)."""
        try:
            data = json.loads(self._fs.cat_file(self._path) or b"{}")
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _create(self) -> bool:
        try:
            self._fs.pipe_file(self._path, self._record(self._clock()), mode="create")
            return True
        except FileExistsError:
            return False
        except OSError as e:
            raise FilesystemError(e.errno or 0, f"--workdir {self.workdir}: cannot create the lock object "
                                  f"{self.url} ({e})", self.url) from e

    def acquire(self, describe: Callable[[dict[str, Any]], str]) -> None:
        """Take the lock or raise WorkdirBusyError (message from `describe(holder)`)."""
        if not self._create():
            holder = self.read_holder()
            renewed = holder.get("renewed")
            age = self._clock() - renewed if isinstance(renewed, (int, float)) else None
            if age is None or age < self.stale_after_s:
                raise WorkdirBusyError(f"{self.workdir} is in use by {describe(holder)}: one run per workdir; "
                                       f"wait for it to finish or use another --workdir "
                                       f"(lock object {self.url})")
            print(f"WARNING: {self.url}: taking over a stale lock of {describe(holder)} "
                  f"(not renewed for {age:.0f} s)", file=sys.stderr, flush=True)
            try:
                self._fs.rm_file(self._path)
            except FileNotFoundError:
                pass
            if not self._create():
                raise WorkdirBusyError(f"{self.workdir} is in use by {describe(self.read_holder())}: another "
                                       f"process took the stale lock first (lock object {self.url})")
        self._since = self._clock()
        self._thread = threading.Thread(target=self._heartbeat, name="dpft-lock-lease", daemon=True)
        self._thread.start()

    def renew(self) -> bool:
        """Rewrite the lease if the object still holds our token; False (and `lost`) when it does not."""
        if self.read_holder().get("token") != self.token:
            if not self.lost:
                print(f"WARNING: {self.url}: the workdir lock was taken over by another process; "
                      f"this run no longer holds {self.workdir}", file=sys.stderr, flush=True)
            self.lost = True
            return False
        self._fs.pipe_file(self._path, self._record(self._since))
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                if not self.renew():
                    return
            except OSError as e:  # a transient store error: try again at the next beat
                print(f"WARNING: {self.url}: could not renew the workdir lock ({e})", file=sys.stderr, flush=True)

    def release(self) -> None:
        """Stop the heartbeat and delete the lock object if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.read_holder().get("token") == self.token:
            try:
                self._fs.rm_file(self._path)
            except FileNotFoundError:
                pass
