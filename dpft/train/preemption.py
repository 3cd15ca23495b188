"""Stopping a run cleanly on a signal: SIGTERM / SIGINT / SIGUSR1 become a flag the loop polls."""
from __future__ import annotations

import signal
import threading
import types
from typing import Any


class PreemptionFlag:
    """Context manager turning SIGTERM/SIGINT into a flag the training loop polls.

        with PreemptionFlag() as flag:
            for step in ...:
                ...
                if flag.requested:
                    save a checkpoint; break

    The first signal sets `requested` (and `signal_name`); a second SIGINT raises
    KeyboardInterrupt so Ctrl-C twice still stops a stuck run. Previous handlers are
    restored on exit. Signal handlers can only be installed from the main thread; from
    another thread the flag is inert (never set by signals) but `request()` still works.
    Multi-host: each host sees its own signal; agree before acting (e.g. with
    `jax.experimental.multihost_utils.process_allgather` of the flag).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, signals: tuple[int, ...] | None = None):
        self._signals = tuple(signals) if signals is not None else self.SIGNALS
        self._previous: dict[int, Any] = {}
        self.requested = False
        self.signal_name: str | None = None

    def request(self, name: str = "manual") -> None:
        """Set the flag as a signal would."""
        self.requested = True
        self.signal_name = name

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.request(signal.Signals(signum).name)

    def __enter__(self) -> "PreemptionFlag":
        if threading.current_thread() is threading.main_thread():
            for s in self._signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
