"""Individual epsilons: each example's recorded norms turned into its own DP-SGD events, composed
with the run's accountant (`accounting.make_accountant`) -- Yu et al. 2023.

An example that adds c < S (the sensitivity) to the clipped sum is protected by the effective
noise multiplier sigma * S / c. Update t charges it PoissonSampled(q, Gaussian(sigma * S / c_t)),
c_t the plan's `contribution_norm` of its rounded-up norm at the latest record <= t; c_t = 0
charges nothing; updates before the first record and missing records charge c_t = S (worst case).
An example whose norm was always >= C therefore gets exactly the run's epsilon.

Both accountants compose one history per example from per-level pieces:
- PLD: `accounting.dpsgd_pld(q, sigma_u, n_u)` per (level u, count n_u), cached and composed in
  level order (`accounting.pld_epsilon`): what `make_accountant("pld")` computes for the
  ComposedDpEvent of those `dpsgd_event`s, number for number.
- RDP: one update's RDP [O] per level from `make_accountant("rdp")`; a history's RDP is
  counts @ table (what the accountant adds up), converted to epsilon vectorised at the
  accountant's own orders. Individual RDP now uses the run's orders, `accounting.RDP_ORDERS`
  (until issue 29 it used dp-accounting's default orders, so it was not the run's accountant).

The values are estimates, as in the paper: norms are measured every `every` updates with the
parameters of that update and held until the next record. They are *not* a formal guarantee for
any individual; the run's worst-case epsilon is.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from dpft.privacy import accounting
from dpft.privacy.individual.norms import MAX_BIN, MISSING, NormRecorder, update_counts

Contribution = Callable[[np.ndarray], np.ndarray]  # norms float64 [U] -> L2 contributions [U]


def contribution_levels(recorder: NormRecorder, sensitivity: float, contribution: Contribution | None
                        ) -> tuple[np.ndarray, np.ndarray, int]:
    """Distinct contribution norms and, per (record, example), the index of its level.

    Returns (levels float64 [U] in [0, S], sorted, the last being S; level index int [R, N];
    index of S). A MISSING record counts as S (worst case); a contribution is clipped to S;
    `contribution` defaults to min(n, S).
    """
    uniq_bins, inv = np.unique(np.append(recorder.bins.reshape(-1), MISSING), return_inverse=True)
    norms = uniq_bins.astype(np.float64) * recorder.grid_width
    values = norms if contribution is None else np.asarray(contribution(norms), np.float64)
    values = np.where(uniq_bins == MISSING, sensitivity, np.minimum(values, sensitivity))
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError("contribution norms must be finite and >= 0")
    levels, level_of_bin = np.unique(values, return_inverse=True)
    inverse = level_of_bin[inv[:-1]].reshape(recorder.bins.shape)
    top = int(level_of_bin[inv[-1]])  # the level of MISSING, i.e. S (levels are <= S)
    return levels, inverse, top


def histograms(recorder: NormRecorder, inverse: np.ndarray, top: int, num_levels: int, num_updates: int,
               start: int, stop: int) -> np.ndarray:
    """Number of updates int64 [stop - start, U] each example of ids [start, stop) spent at each level."""
    before, counts = update_counts(recorder.update_indices, int(num_updates))
    hist = np.zeros([stop - start, num_levels], np.int64)
    rows = np.arange(stop - start)
    hist[:, top] += before
    for j, c in enumerate(counts):
        hist[rows, inverse[j, start:stop]] += c  # one entry per row: no duplicate indices
    return hist


def rdp_to_epsilon(orders: np.ndarray, rdp: np.ndarray, delta: float) -> np.ndarray:
    """Epsilon [...] at `delta` from RDP [..., O] (+inf allowed) at `orders` [O]: dp-accounting's
    `rdp_privacy_accountant.compute_epsilon` (Prop. 12 of arXiv:2004.00010, orders <= 1.01 unused),
    vectorised, element by element equal."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1); got {delta}")
    a = np.asarray(orders, np.float64)
    rdp = np.asarray(rdp, np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        eps = rdp + np.log1p(-1 / a) - np.log(delta * a) / (a - 1)
        eps = np.where(a > 1.01, eps, np.inf)
        eps = np.where(delta**2 + np.expm1(-rdp) > 0, 0.0, eps)
        eps = np.where(rdp < 0, 0.0, eps)
    return np.maximum(0.0, eps.min(axis=-1))


class _Rdp:
    """The run's RdpAccountant, per level: table [U, O] of one update's RDP at each level's sigma."""

    def __init__(self, sampling_rate: float, sigmas: np.ndarray):
        self.orders = accounting.make_accountant("rdp").orders
        self.table = np.zeros([len(sigmas), len(self.orders)])
        for u, sigma in enumerate(sigmas):
            if np.isfinite(sigma):  # sigma = inf (contribution 0) charges nothing
                acc = accounting.make_accountant("rdp").compose(accounting.dpsgd_event(sampling_rate, float(sigma), 1))
                self.table[u] = acc.rdp

    def epsilons(self, hist: np.ndarray, delta: float) -> np.ndarray:
        """Epsilon [n] of histories hist int [n, U]: RDP hist @ table, +inf at an order where a level
        with count > 0 is unbounded (dp-accounting gives +inf RDP there; 0 * inf would be NaN)."""
        unbounded = ~np.isfinite(self.table)
        rdp = hist @ np.where(unbounded, 0.0, self.table)
        rdp = np.where((hist > 0).astype(np.int64) @ unbounded.astype(np.int64) > 0, np.inf, rdp)
        return rdp_to_epsilon(self.orders, rdp, delta)


class _Pld:
    """The run's PLD accountant, per history: cached `accounting.dpsgd_pld` pieces per (level, count),
    composed in level order by `accounting.pld_epsilon`."""

    def __init__(self, sampling_rate: float, sigmas: np.ndarray):
        self.q, self.sigmas = float(sampling_rate), sigmas
        self._pieces: dict[tuple[int, int], object] = {}

    def _piece(self, level: int, count: int):
        if (level, count) not in self._pieces:
            self._pieces[level, count] = accounting.dpsgd_pld(self.q, float(self.sigmas[level]), count)
        return self._pieces[level, count]

    def epsilons(self, hist: np.ndarray, delta: float) -> np.ndarray:
        """Epsilon [n] of histories hist int [n, U], one composition per distinct history."""
        uniq, back = np.unique(hist, axis=0, return_inverse=True)
        eps = np.array([accounting.pld_epsilon(
            [self._piece(u, int(c)) for u, c in enumerate(row) if c > 0 and np.isfinite(self.sigmas[u])], delta)
            for row in uniq])
        return eps[np.asarray(back).reshape(-1)]


def individual_epsilons(recorder: NormRecorder, *, sampling_rate: float, noise_multiplier: float,
                        sensitivity: float, num_updates: int, delta: float, accountant: str = "pld",
                        contribution: Contribution | None = None, chunk_size: int = 65536) -> np.ndarray:
    """Individual epsilon float64 [N] of each example after `num_updates` updates, composed with
    `accounting.make_accountant(accountant)`'s construction (see the module doc).

    contribution: the L2 norm an example of rounded-up gradient norm n adds to the clipped sum (the
    plan's `contribution_norm`: min(n, C) flat, C n / (n + gamma) automatic); default min(n, S).
    `PrivacyPlan.individual_epsilons` calls this and caps the result at the run's epsilon.
    """
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate must be in (0, 1]; got {sampling_rate}")
    if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be finite and > 0 for individual accounting; got {noise_multiplier}")
    if not (sensitivity > 0 and math.isfinite(sensitivity)):
        raise ValueError(f"sensitivity must be finite and > 0; got {sensitivity}")
    if accountant not in accounting.ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {accounting.ACCOUNTANTS}; got {accountant!r}")
    if sensitivity > MAX_BIN * recorder.grid_width:
        raise ValueError(f"sensitivity {sensitivity} exceeds the recorder's range {MAX_BIN} * grid_width "
                         f"{recorder.grid_width}; use a coarser grid_width")
    levels, inverse, top = contribution_levels(recorder, sensitivity, contribution)
    sigmas = np.where(levels > 0, noise_multiplier * sensitivity / np.maximum(levels, 1e-300), np.inf)
    composer = (_Pld if accountant == "pld" else _Rdp)(sampling_rate, sigmas)
    n = recorder.num_examples
    out = np.empty([n])
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        hist = histograms(recorder, inverse, top, len(levels), num_updates, start, stop)
        out[start:stop] = composer.epsilons(hist, delta)
    return out
