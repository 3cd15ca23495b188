"""The workdir lock on an object store (`gs://...`): a create-if-absent lock object, a lease kept
alive by a heartbeat object, and a stale-lock takeover by compare-and-delete.

An object store has no `flock`, and nothing drops a lock when its holder dies. The lock object
`WORKDIR/.dpft.lock` is only ever *created* (never overwritten) and *deleted by generation*, the
two conditional operations GCS offers through fsspec/gcsfs:

- create-if-absent: `fs.pipe_file(path, data, mode="create")`, sent by gcsfs as
  `ifGenerationMatch=0`: of any number of racing writers exactly one succeeds, the others get
  FileExistsError;
- compare-and-delete: `fs.rm_file(f"{path}#{generation}")` on a version-aware filesystem
  (`version_aware=True`), sent as `DELETE ...?generation=G`: it deletes that generation of the
  object and nothing else; once the object was deleted or replaced (a new generation) it fails
  with FileNotFoundError. (`info(path)["generation"]` names the generation; every write makes a new one.)

Protocol:
- Acquire: create the lock object with a random token and the holder (`pid`, `host`, `since`,
  `lease_s`); remember its generation.
- Heartbeat: a daemon thread rewrites the holder's own beat object `WORKDIR/.dpft.lock.beat.<token>`
  (`renewed` = now) every `lease_s / 3` seconds. Nobody else ever writes that object, so a
  renewal can never overwrite another process's lock. It then checks that the lock object still
  has our generation; if not, the lock was taken over: `lost` is set and a warning printed.
- Busy: a lock renewed (beat object, else the lock object's own `renewed`) less than
  `stale_after_s` ago belongs to a live run: `WorkdirBusyError` (exit 4) naming it.
- Takeover of a stale lock (a crashed holder's, not renewed for `stale_after_s`): delete exactly
  the generation that was read and judged stale, then create-if-absent. Of two processes that
  both judged one lock stale, at most one deletion removes anything, and exactly one create wins;
  the other gets `WorkdirBusyError`. A fresh lock can never be deleted by a takeover, because its
  generation differs from the stale one. Stores without object generations (s3://, az:// through
  their fsspec packages) never take a lock over: the error says to delete the lock object by hand.
- Release: the heartbeat stops, the lock object is deleted by generation (never someone else's)
  and the beat object removed.
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
BEAT_SUFFIX = ".beat."


def _fs(url: str) -> tuple[Any, str]:
    """The version-aware fsspec filesystem of `url` (`path#generation` names one generation)."""
    import fsspec

    return fsspec.core.url_to_fs(url, version_aware=True)


class RemoteLease:
    """Holds `lock_url` (an object-store URL) until `release()`; see the module docstring."""

    def __init__(self, lock_url: str, workdir: str, *, lease_s: float = LEASE_S,
                 stale_after_s: float = STALE_AFTER_S, clock: Callable[[], float] = time.time):
        self.url, self.workdir = lock_url, workdir
        self.lease_s, self.stale_after_s, self._clock = float(lease_s), float(stale_after_s), clock
        self.token = uuid.uuid4().hex
        self.lost = False
        self.generation: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fs, self._path = _fs(lock_url)

    # -- reading
    def _beat_path(self, token: str) -> str:
        return f"{self._path}{BEAT_SUFFIX}{token}"

    def _generation(self) -> str | None:
        """The generation of the lock object now; None when absent (or the store has none)."""
        self._fs.invalidate_cache(self._path)  # ask the store, not a listing cached earlier
        try:
            gen = self._fs.info(self._path).get("generation")
        except FileNotFoundError:
            return None
        return None if gen is None else str(gen)

    def _read_json(self, path: str) -> dict[str, Any]:
        try:
            data = json.loads(self._fs.cat_file(path) or b"{}")
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _snapshot(self) -> tuple[str | None, dict[str, Any]]:
        """(generation, holder) of one version of the lock object ((None, {}) when absent); the
        holder's `renewed` is its beat object's when there is one."""
        for _ in range(5):
            gen = self._generation()
            if gen is None:
                return None, self._read_json(self._path)
            holder = self._read_json(f"{self._path}#{gen}")  # exactly that generation
            if holder:
                break
        else:
            return gen, {}
        token = holder.get("token")
        if isinstance(token, str) and token:
            beat = self._read_json(self._beat_path(token))
            if isinstance(beat.get("renewed"), (int, float)):
                holder["renewed"] = max(float(beat["renewed"]), float(holder.get("renewed") or 0.0))
        return gen, holder

    def read_holder(self) -> dict[str, Any]:
        """The lock object's content with its latest renewal ({} when absent or unreadable)."""
        return self._snapshot()[1]

    # -- writing
    def _record(self, now: float) -> bytes:
        return json.dumps({"token": self.token, "pid": os.getpid(), "host": socket.gethostname(),
                           "since": now, "renewed": now, "lease_s": self.lease_s}).encode()

    def _create(self) -> bool:
        try:
            self._fs.pipe_file(self._path, self._record(self._clock()), mode="create")
        except FileExistsError:
            return False
        except OSError as e:
            raise FilesystemError(e.errno or 0, f"--workdir {self.workdir}: cannot create the lock object "
                                  f"{self.url} ({e})", self.url) from e
        self.generation = self._generation()
        return True

    def _delete_generation(self, gen: str) -> bool:
        """Compare-and-delete: remove generation `gen` of the lock object; False if it is gone."""
        try:
            self._fs.rm_file(f"{self._path}#{gen}")
            return True
        except FileNotFoundError:
            return False

    def acquire(self, describe: Callable[[dict[str, Any]], str]) -> None:
        """Take the lock or raise WorkdirBusyError (message from `describe(holder)`)."""
        if not self._create():
            gen, holder = self._snapshot()
            if gen is None and not holder and self._create():  # released meanwhile
                return self._start()
            renewed = holder.get("renewed")
            age = self._clock() - renewed if isinstance(renewed, (int, float)) else None
            if age is None or age < self.stale_after_s:
                raise WorkdirBusyError(f"{self.workdir} is in use by {describe(holder)}: one run per workdir; "
                                       f"wait for it to finish or use another --workdir (lock object {self.url})")
            if gen is None:
                raise WorkdirBusyError(
                    f"{self.workdir}: the lock of {describe(holder)} was not renewed for {age:.0f} s, but this "
                    f"store gives no object generations to take it over safely; if no run uses the workdir, "
                    f"delete {self.url} and retry")
            print(f"WARNING: {self.url}: taking over a stale lock of {describe(holder)} "
                  f"(not renewed for {age:.0f} s)", file=sys.stderr, flush=True)
            self._delete_generation(gen)  # exactly the generation judged stale: never a fresh lock
            if not self._create():
                raise WorkdirBusyError(f"{self.workdir} is in use by {describe(self.read_holder())}: another "
                                       f"process took the stale lock first (lock object {self.url})")
            old = holder.get("token")
            if isinstance(old, str) and old and old != self.token:
                try:
                    self._fs.rm_file(self._beat_path(old))  # the dead holder's beat: garbage now
                except OSError:
                    pass
        self._start()

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._heartbeat, name="dpft-lock-lease", daemon=True)
        self._thread.start()

    def _still_ours(self) -> bool:
        if self.generation is not None:
            return self._generation() == self.generation
        return self._read_json(self._path).get("token") == self.token  # a store without generations

    def renew(self) -> bool:
        """Refresh our beat object if the lock object is still ours; False (and `lost`) when not."""
        if not self.lost and self._still_ours():
            self._fs.pipe_file(self._beat_path(self.token), json.dumps({"renewed": self._clock()}).encode())
            if self._still_ours():
                return True
        if not self.lost:
            print(f"WARNING: {self.url}: the workdir lock was taken over by another process; "
                  f"this run no longer holds {self.workdir}", file=sys.stderr, flush=True)
        self.lost = True
        return False

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                if not self.renew():
                    return
            except OSError as e:  # a transient store error: try again at the next beat
                print(f"WARNING: {self.url}: could not renew the workdir lock ({e})", file=sys.stderr, flush=True)

    def release(self) -> None:
        """Stop the heartbeat; delete the lock object if it is still ours, and our beat object."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.generation is not None:
            self._delete_generation(self.generation)
        elif self._read_json(self._path).get("token") == self.token:
            try:
                self._fs.rm_file(self._path)
            except FileNotFoundError:
                pass
        try:
            self._fs.rm_file(self._beat_path(self.token))
        except FileNotFoundError:
            pass
