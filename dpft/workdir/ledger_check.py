"""The restored ledger must describe exactly the updates the checkpoint holds.

`check_ledger` is pure: given the ledger of a checkpoint, its update counter, its data
position and the run's plan (q, sigma), it raises `CheckpointError` unless
  * the ledger composes exactly `updates` DP-SGD events (none for a non-private run),
  * every one of them has the plan's sampling rate and noise multiplier, the ledger the plan's
    mechanism (`bands`: None for DP-SGD, else BandMF's), and
  * the data iterator stands at the same update.
A ledger edited to report fewer updates (a smaller epsilon) is refused, not trusted: by `dpft train`
before it resumes, and by `dpft evaluate` before it reports an epsilon (`dpft.workdir.contract`).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from dpft.errors import CheckpointError


def _close(a: float, b: float) -> bool:
    return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)


def check_ledger(ledger: Any, *, updates: int, sampling_rate: float, noise_multiplier: float,
                 private: bool, data_state: Mapping[str, Any] | None = None, where: str = "checkpoint",
                 action: str = "resume", bands: int | None = None) -> None:
    """Raise CheckpointError unless `ledger` (a `dpft.privacy.accounting.Ledger`) matches the checkpoint.

    Args:
      ledger: the restored ledger (entries of (sampling_rate, noise_multiplier, steps)).
      updates: the checkpoint's update counter.
      sampling_rate, noise_multiplier: the run's plan (q, sigma).
      private: False for a non-private run (its ledger must be empty).
      data_state: the checkpoint's data-iterator state; its `update_index` must equal `updates`.
      where: names the checkpoint in the message.
      action: what is refused ("resume", "report an epsilon").
      bands: the plan's BandMF bands, None for DP-SGD; the ledger's `bands` must be the same.
    """
    if private and getattr(ledger, "bands", None) != bands:
        raise CheckpointError(
            f"{where}: the ledger records mechanism {getattr(ledger, 'mechanism', '?')!r} (bands "
            f"{getattr(ledger, 'bands', None)!r}) but the run's plan has bands {bands!r}; refusing to {action}")
    entries = list(getattr(ledger, "entries", []))
    total = sum(int(e.steps) for e in entries)
    expected = int(updates) if private else 0
    if total != expected:
        raise CheckpointError(
            f"{where}: the ledger records {total} update(s) but the checkpoint is at update {updates}"
            f"{'' if private else ' of a non-private run (expected an empty ledger)'}; "
            f"refusing to {action} with an epsilon that does not match what ran")
    for i, e in enumerate(entries):
        if not (_close(e.sampling_rate, sampling_rate) and _close(e.noise_multiplier, noise_multiplier)):
            raise CheckpointError(
                f"{where}: ledger entry {i} has (q={e.sampling_rate!r}, sigma={e.noise_multiplier!r}) but the "
                f"run's plan is (q={sampling_rate!r}, sigma={noise_multiplier!r}); refusing to {action}")
    if data_state is not None and "update_index" in data_state and int(data_state["update_index"]) != int(updates):
        raise CheckpointError(f"{where}: the data iterator is at update {data_state['update_index']} but the "
                              f"checkpoint at update {updates}; refusing to {action}")
