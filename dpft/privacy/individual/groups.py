"""Subgroup statistics of individual epsilons, with the small-group rules of invariant 9: no min or
max anywhere (each is one individual's value), no statistics at all for groups below
`min_group_size`. The result is aggregates only, safe to report."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

QUANTILES: dict[str, float] = {"q05": 0.05, "q25": 0.25, "q50": 0.5, "q75": 0.75, "q95": 0.95}
MIN_GROUP_SIZE = 20


def group_stats(x: np.ndarray, min_group_size: int = MIN_GROUP_SIZE) -> dict[str, Any]:
    """{"n", "mean", "q05".."q95"} of the values x [n]; only {"n", "suppressed": True} when
    n < min_group_size (statistics of tiny groups reveal individuals). Never min or max."""
    x = np.asarray(x, np.float64).reshape(-1)
    out: dict[str, Any] = {"n": int(x.size)}
    if x.size < max(int(min_group_size), 1):
        out["suppressed"] = True
        return out
    out.update({k: float(np.quantile(x, q)) for k, q in QUANTILES.items()})
    out["mean"] = float(np.mean(x))
    return out


def summarise(eps: np.ndarray, attrs: Mapping[str, Sequence[str]] | None, labels: np.ndarray | None = None,
              losses: np.ndarray | None = None, *, worst_case_epsilon: float | None = None,
              class_names: Sequence[str] | None = None, min_group_size: int = MIN_GROUP_SIZE) -> dict[str, Any]:
    """Distribution of individual epsilons [N], overall, per subgroup and per class.

    Args:
      eps: float [N]. attrs: name -> str [N]. labels: int [N] (multi-class) or 0/1
        [N, L] (multi-label: a class's group is its positive examples).
      losses: float [N] per-example training loss, for the Spearman correlation.
      min_group_size: groups (and classes) with fewer examples get no statistics (`group_stats`).
    Returns: {"num_examples", "worst_case_epsilon", "min_group_size", "overall": group_stats,
      "by_attribute": {name: {value: group_stats}}, "by_class": {name: group_stats},
      "spearman_loss": {"rho", "pvalue"} | None}.
    """
    eps = np.asarray(eps, np.float64).reshape(-1)
    n = eps.shape[0]
    stats = lambda x: group_stats(x, min_group_size)  # noqa: E731
    out: dict[str, Any] = {"num_examples": n, "worst_case_epsilon": worst_case_epsilon,
                           "min_group_size": int(min_group_size), "overall": stats(eps), "by_attribute": {},
                           "by_class": {}, "spearman_loss": None}
    for name, values in (attrs or {}).items():
        values = np.asarray(values).astype(str)
        if values.shape != (n,):
            raise ValueError(f"summarise: attribute {name!r} has shape {values.shape}; expected ({n},)")
        out["by_attribute"][name] = {v: stats(eps[values == v]) for v in sorted(set(values.tolist()))}
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape[0] != n or labels.ndim not in (1, 2):
            raise ValueError(f"summarise: labels have shape {labels.shape}; expected ({n},) or ({n}, L)")
        if labels.ndim == 1:
            groups = {int(c): labels == c for c in np.unique(labels)}
        else:
            groups = {c: labels[:, c] > 0.5 for c in range(labels.shape[1])}
        for c, sel in groups.items():
            name = str(class_names[c]) if class_names is not None else str(c)
            out["by_class"][name] = stats(eps[sel])
    if losses is not None:
        out["spearman_loss"] = _spearman(eps, np.asarray(losses, np.float64).reshape(-1))
    return out


def _spearman(eps: np.ndarray, losses: np.ndarray) -> dict[str, float] | None:
    """{"rho", "pvalue"} of eps [N] vs losses [N] over finite pairs; None below 3 pairs or without spread."""
    import scipy.stats

    if losses.shape != eps.shape:
        raise ValueError(f"summarise: losses have shape {losses.shape}; expected {eps.shape}")
    finite = np.isfinite(eps) & np.isfinite(losses)
    if finite.sum() >= 3 and np.ptp(eps[finite]) > 0 and np.ptp(losses[finite]) > 0:
        res = scipy.stats.spearmanr(eps[finite], losses[finite])
        return {"rho": float(res.statistic), "pvalue": float(res.pvalue)}
    return None
