"""Metric files of a run (metrics.jsonl, metrics.csv, TensorBoard) and a progress line.

`MetricWriter(workdir)` appends one record per call to `write(step, metrics)`:
  - metrics.jsonl: `{"step": step, **metrics}` per line (every value, strings included);
  - metrics.csv: columns `step` + every key seen so far, in first-seen order. When a
    record brings a new key the header grows: the file is rewritten (atomically, through
    `dpft.atomic_io`) with the wider header and empty cells for old rows.
    Re-opening an existing workdir (resume) continues the same files;
  - TensorBoard event files (tensorboardX) in WORKDIR for the numeric values, each under its name
    or the tag `write(..., tensorboard_tags=)` gives it (a run without a privacy guarantee logs
    epsilon as "epsilon/NO_GUARANTEE_public_noise"; local workdirs only: on a `gs://` workdir the
    JSONL and CSV files are the record).
Only process 0 writes (multi-host runs log once). Appends on a remote workdir rewrite the whole
object (`atomic_io.append_text`).

`Progress(total_updates)` formats one line per log step:
  "update 120/1000 (12.0%) | 512.3 ex/s | loss 0.6931 | eps 1.23 | ETA 0:14:02"
("eps 1.23 (NO GUARANTEE: public noise)" in a run whose noise was public).
examples/s and ETA use the time between consecutive log calls (an injectable clock).
"""
from __future__ import annotations

import csv
import datetime
import io
import json
import math
import numbers
import os
import time
from typing import Any, Callable, Mapping

import numpy as np

from dpft import atomic_io, paths
from dpft.workdir import contract


def _plain(value: Any) -> Any:
    """numpy/jax scalars -> Python numbers; other values unchanged."""
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _read_text(path: str) -> str:
    if paths.is_remote(path):
        return paths.as_path(path).read_text(encoding="utf-8")
    with open(path, newline="", encoding="utf-8") as f:
        return f.read()


def _csv_text(columns: list[str], rows: list[Mapping[str, Any]], *, header: bool = False) -> str:
    """CSV lines of `rows` under the columns `step` + `columns` (with the header line if asked)."""
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=["step"] + columns, restval="")
    if header:
        w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


class MetricWriter:
    """Writes metrics to WORKDIR/metrics.jsonl, WORKDIR/metrics.csv and TensorBoard."""

    JSONL = "metrics.jsonl"
    CSV = "metrics.csv"

    def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = True, process_index: int | None = None):
        if process_index is None:
            import jax

            process_index = jax.process_index()
        self.workdir = paths.to_str(workdir)
        self.active = process_index == 0
        self._columns: list[str] = []
        self._tb = None
        if not self.active:
            return
        atomic_io.make_dir(self.workdir)
        self._jsonl_path = paths.join(self.workdir, self.JSONL)
        self._csv_path = paths.join(self.workdir, self.CSV)
        if paths.exists(self._csv_path):
            header = next(csv.reader(io.StringIO(_read_text(self._csv_path))), None)
            self._columns = [c for c in (header or []) if c != "step"]
        if tensorboard and paths.is_remote(self.workdir):
            print(f"note: {self.workdir} is remote: no TensorBoard event files (metrics.jsonl/csv are written)")
        elif tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=self.workdir)

    def write(self, step: int, metrics: Mapping[str, Any], *,
              tensorboard_tags: Mapping[str, str] | None = None) -> None:
        """Record `metrics` (name -> scalar, bool or string) for update `step`; in TensorBoard the
        finite numbers (not bools), under the tag `tensorboard_tags` gives a name (default the name)."""
        if not self.active:
            return
        record = {str(k): _plain(v) for k, v in metrics.items()}
        if "step" in record:
            raise ValueError("metric name 'step' is reserved")
        atomic_io.append_text(self._jsonl_path, json.dumps({"step": int(step), **record}, default=str) + "\n")
        self._write_csv(int(step), record)
        if self._tb is not None:
            for k, v in record.items():
                if _is_number(v) and math.isfinite(float(v)):
                    self._tb.add_scalar((tensorboard_tags or {}).get(k, k), float(v), int(step))

    def _write_csv(self, step: int, record: Mapping[str, Any]) -> None:
        new = [k for k in record if k not in self._columns]
        if new or not paths.exists(self._csv_path):
            old_rows: list[dict[str, str]] = []
            if paths.exists(self._csv_path):
                old_rows = list(csv.DictReader(io.StringIO(_read_text(self._csv_path))))
            self._columns += new
            atomic_io.write_text(self._csv_path, _csv_text(self._columns, old_rows, header=True))
        atomic_io.append_text(self._csv_path, _csv_text(self._columns, [{"step": step, **record}]))

    def flush(self) -> None:
        if self._tb is not None:
            with atomic_io.naming(self._tb.logdir):
                self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            tb, self._tb = self._tb, None
            with atomic_io.naming(tb.logdir):
                tb.close()

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class PrivateStatsWriter:
    """Per-update statistics of private batches -> WORKDIR/private/update_stats.jsonl (owner-only).

    These numbers (realised batch sizes, training loss and accuracy on private batches, clipped
    fractions) are NOT covered by the DP guarantee: keep them out of anything you publish.
    Only process 0 writes. The directory is created on the first write.
    """

    DIR = "private"
    JSONL = "update_stats.jsonl"

    def __init__(self, workdir: str | os.PathLike, *, process_index: int | None = None):
        if process_index is None:
            import jax

            process_index = jax.process_index()
        self.active = process_index == 0
        self.directory = paths.join(workdir, self.DIR)
        self.path = paths.join(self.directory, self.JSONL)

    def write(self, step: int, stats: Mapping[str, Any]) -> None:
        if not self.active:
            return
        atomic_io.make_dir(self.directory, private=True)
        record = {"step": int(step), **{str(k): _plain(v) for k, v in stats.items()}}
        atomic_io.append_text(self.path, json.dumps(record, default=str) + "\n", private=True)

    def __enter__(self) -> "PrivateStatsWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def format_duration(seconds: float) -> str:
    """Seconds -> 'H:MM:SS' ('D days, H:MM:SS' beyond a day); '?' when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    return str(datetime.timedelta(seconds=int(round(seconds))))


class Progress:
    """One-line progress reports; `clock` (seconds) is injectable for tests.

    Call `log(step, examples=..., loss=..., epsilon=...)` at each log step, where `step` is
    the number of updates completed and `examples` the number of (real) examples processed
    since the previous call. Rates use the interval since the previous call (or since
    construction / `restart()`), so compilation time only affects the first line.
    """

    def __init__(
        self,
        total_updates: int,
        *,
        start_step: int = 0,
        clock: Callable[[], float] = time.monotonic,
        print_fn: Callable[[str], Any] | None = print,
        unit: str = "ex",
    ):
        self.total = int(total_updates)
        self.unit = unit  # what the rate counts: "ex" (examples) or "patients" (privacy.unit="patient")
        self._clock = clock
        self._print = print_fn
        self._last_step = int(start_step)
        self._last_time = clock()

    @property
    def last_step(self) -> int:
        """The step of the previous `log` (or of construction / `restart`)."""
        return self._last_step

    def restart(self, step: int) -> None:
        """Reset the reference point (e.g. after an evaluation pause)."""
        self._last_step = int(step)
        self._last_time = self._clock()

    def line(self, step: int, *, examples: float, loss: float | None = None, epsilon: float | None = None,
             expected: bool = False, guarantee_valid: bool | None = None) -> str:
        """The progress line for `step` (updates done); advances the reference point.

        expected=True: `examples` is the expected count (updates x expected batch size), shown
        as "~... ex/s (expected batch)" -- private runs never show realised batch sizes.
        guarantee_valid=False (the plan's: public noise): "eps 1.23 (NO GUARANTEE: public noise)"."""
        now = self._clock()
        dt = now - self._last_time
        dsteps = step - self._last_step
        rate = examples / dt if dt > 0 else float("nan")
        sec_per_update = dt / dsteps if dsteps > 0 else float("nan")
        eta = (self.total - step) * sec_per_update
        self._last_time, self._last_step = now, step
        width = len(str(self.total))
        parts = [f"update {step:>{width}d}/{self.total} ({100.0 * step / max(self.total, 1):5.1f}%)"]
        unit = f"{self.unit}/s (expected batch)" if expected else f"{self.unit}/s"
        parts.append((f"{'~' if expected else ''}{rate:.1f} {unit}") if math.isfinite(rate) else f"? {unit}")
        if loss is not None:
            parts.append(f"loss {float(loss):.4f}")
        if epsilon is not None:
            parts.append(contract.mark_epsilon(f"eps {float(epsilon):.3g}", guarantee_valid))
        parts.append(f"ETA {format_duration(eta)}")
        return " | ".join(parts)

    def log(self, step: int, *, examples: float, loss: float | None = None, epsilon: float | None = None,
            expected: bool = False, guarantee_valid: bool | None = None) -> str:
        """Format (see `line`) and print the line; returns it."""
        text = self.line(step, examples=examples, loss=loss, epsilon=epsilon, expected=expected,
                         guarantee_valid=guarantee_valid)
        if self._print is not None:
            self._print(text)
        return text
