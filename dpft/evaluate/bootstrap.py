"""Cluster (patient-level) bootstrap as weight matrices.

A replicate draws P patients with replacement from the P distinct patient ids; every image of a
patient drawn k times gets weight k. Metrics computed with these weights (dpft/metrics.py) equal the
metrics of the explicitly resampled data set, but all replicates share one sort / one matrix
product, so 200 replicates over 10k predictions take about a second.

Confidence intervals are percentile intervals over the replicates, ignoring replicates where a
metric is undefined (NaN); `n_valid` says how many were defined.
"""
from __future__ import annotations

from typing import Callable, Hashable, Mapping

import numpy as np


def resample_counts(patient_id: np.ndarray, n_resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(counts int [R, P], codes int [N]): how often each patient is drawn per replicate, and each
    example's patient index. Patients are ordered as np.unique orders their ids."""
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    _, codes = np.unique(np.asarray(patient_id).astype(str), return_inverse=True)
    p = int(codes.max()) + 1 if codes.size else 0
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(p, np.full(p, 1.0 / p), size=n_resamples) if p else np.zeros((n_resamples, 0), int)
    return counts, codes.reshape(-1)


def patient_weights(patient_id: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """float64 [R, N]: bootstrap weight of each example in each replicate (its patient's count)."""
    counts, codes = resample_counts(patient_id, n_resamples, seed)
    return counts[:, codes].astype(np.float64)


def bootstrap(fn: Callable[[np.ndarray], Mapping[Hashable, np.ndarray]], patient_id: np.ndarray, *,
              n_resamples: int = 200, seed: int = 0, max_weights: int = 20_000_000) -> dict[Hashable, np.ndarray]:
    """Replicates of every metric: fn(weights [r, N]) -> {key: [r]}, evaluated on chunks of replicates
    so at most `max_weights` weights are in memory; returns {key: [R]}. Same seed -> same result."""
    counts, codes = resample_counts(patient_id, n_resamples, seed)
    chunk = max(1, int(max_weights // max(1, codes.size)))
    parts: dict[Hashable, list[np.ndarray]] = {}
    for start in range(0, n_resamples, chunk):
        w = counts[start:start + chunk][:, codes].astype(np.float64)
        for key, value in fn(w).items():
            parts.setdefault(key, []).append(np.asarray(value, np.float64))
    return {key: np.concatenate(v) for key, v in parts.items()}


def confidence_interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float, int]:
    """(low, high, n_valid): percentile interval of the non-NaN replicates [R] (NaN, NaN if none)."""
    if not 0 < level < 1:
        raise ValueError(f"ci level must be in (0, 1), got {level}")
    s = np.asarray(samples, np.float64)
    s = s[~np.isnan(s)]
    if s.size == 0:
        return float("nan"), float("nan"), 0
    lo, hi = np.quantile(s, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi), int(s.size)
