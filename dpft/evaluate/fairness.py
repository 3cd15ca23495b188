"""Subgroup fairness: thresholds from validation, per-group metrics, gaps, parity (fairlearn).

Choices (also stated in every report):
- Threshold (multilabel): per task, on the *validation* predictions, by Youden's J
  (argmax TPR - FPR over sklearn's ROC curve) or, with method="fpr", the lowest threshold whose
  validation FPR is <= target_fpr. Without validation predictions every threshold is 0.5.
- Binary decisions for parity: multilabel per task (thresholded); multiclass one-vs-rest per class
  with the argmax decision (only when C <= max_ovr_classes).
- Demographic parity difference = max - min over groups of the selection rate; equal opportunity
  difference = max - min of the TPR (fairlearn's definitions, method="between_groups"). Groups with
  no positive example of a task have no TPR and are left out of its equal opportunity difference
  (fairlearn would count their TPR as 0).
- gap = max - min over groups of a metric; worst = the worst group's value (min, or max for
  FPR/underdiagnosis); gap_to_best/<group> = how far a group is behind the best one (>= 0).
  Groups whose value is undefined (NaN) are ignored; small groups are kept but flagged, unless
  the caller passes `gap_groups` without them.

Every function works on one weight matrix (see metrics.py): None for the plain estimate
(sklearn / fairlearn), or [R, N] bootstrap weights.
"""
from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import numpy as np
from fairlearn.metrics import (MetricFrame, count, demographic_parity_difference, equal_opportunity_difference,
                               false_positive_rate, selection_rate, true_positive_rate)
from sklearn.metrics import roc_curve

from dpft.evaluate.metrics import EvalInputs, higher_is_better, metric_suite

Key = tuple[str, ...]
THRESHOLD_METHODS = ("youden", "fpr")


def choose_threshold(y: np.ndarray, score: np.ndarray, method: str = "youden", target_fpr: float = 0.1) -> float:
    """Decision threshold on a score from validation labels y (bool [N]) and scores [N].

    "youden": maximises TPR - FPR; "fpr": the lowest threshold with FPR <= target_fpr.
    Returns 0.5 if y has a single class (no ROC curve). Decide positive when score >= threshold.
    """
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"threshold method must be one of {THRESHOLD_METHODS}, got {method!r}")
    y = np.asarray(y).astype(bool)
    if y.all() or not y.any():
        return 0.5
    fpr, tpr, thr = roc_curve(y, np.asarray(score, np.float64))
    finite = np.isfinite(thr)  # sklearn's first threshold is +inf (nothing positive)
    fpr, tpr, thr = fpr[finite], tpr[finite], thr[finite]
    if method == "youden":
        return float(thr[int(np.argmax(tpr - fpr))])
    ok = np.flatnonzero(fpr <= target_fpr)
    return float(thr[ok[-1]]) if ok.size else float(thr[0])


def choose_thresholds(probs: np.ndarray, label: np.ndarray, label_mask: np.ndarray, class_names: Sequence[str],
                      names: Sequence[str], method: str = "youden", target_fpr: float = 0.1) -> dict[str, float]:
    """Per class name in `names`: choose_threshold on validation rows where label_mask > 0."""
    out = {}
    for name in names:
        j = list(class_names).index(name)
        keep = np.asarray(label_mask)[:, j] > 0
        out[name] = choose_threshold(np.asarray(label)[keep, j] > 0.5, probs[keep, j], method, target_fpr)
    return out


def group_index(values: np.ndarray) -> dict[str, np.ndarray]:
    """Group name -> row indices (int [n_g]), groups sorted by name."""
    values = np.asarray(values).astype(str)
    return {g: np.flatnonzero(values == g) for g in np.unique(values)}


def group_flags(inp: EvalInputs, patient_id: np.ndarray, min_group_size: int) -> list[str]:
    """Why a group's estimates are unreliable: too few examples, or a binary task with one class only."""
    flags = []
    if inp.n < min_group_size:
        flags.append(f"n={inp.n} < {min_group_size}")
    y = inp.binary_label
    if inp.task == "multiclass":
        present = np.unique(inp.label).size
        if present < 2:
            flags.append(f"{present} class present")
    for t, j in zip(inp.tasks, inp.task_index):
        pos = int((y[:, j] & inp.valid[:, j]).sum())
        neg = int((~y[:, j] & inp.valid[:, j]).sum())
        if pos == 0 or neg == 0:
            flags.append(f"{t}: {pos} positive / {neg} negative")
    return flags


def summarise_groups(values: Mapping[str, np.ndarray], metric: str) -> dict[str, np.ndarray]:
    """Gap statistics of one metric over groups: group -> [R] to {"gap", "worst", "best", "gap_to_best/<g>"}."""
    names = list(values)
    v = np.stack([np.asarray(values[g], np.float64) for g in names])  # [G, R]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices -> NaN
        hi, lo = np.nanmax(v, axis=0), np.nanmin(v, axis=0)
    best, worst = (hi, lo) if higher_is_better(metric) else (lo, hi)
    out = {"gap": hi - lo, "worst": worst, "best": best}
    for g, row in zip(names, v):
        out[f"gap_to_best/{g}"] = np.abs(best - row)
    return out


def fairlearn_parity(y_true: np.ndarray, y_pred: np.ndarray, sensitive: np.ndarray,
                     by_group: bool = False) -> dict[str, object]:
    """fairlearn's demographic parity and equal opportunity differences (between groups) and, if
    by_group, a fairlearn MetricFrame by group (selection_rate, tpr, fpr, count; a pandas DataFrame).
    Inputs: y_true, y_pred bool/0-1 [N]; sensitive str [N].

    The N rows are first collapsed to the distinct (y_true, y_pred, group) triples with their
    counts as fairlearn's sample_weight (identical values, O(groups) instead of O(N) time).
    Groups without positives are excluded from the equal opportunity difference (see module doc).
    """
    y_true, y_pred = np.asarray(y_true).astype(int), np.asarray(y_pred).astype(int)
    sensitive = np.asarray(sensitive).astype(str)
    names, codes = np.unique(sensitive, return_inverse=True)
    triples, weight = np.unique(np.stack([y_true, y_pred, codes.reshape(-1)], axis=1), axis=0, return_counts=True)
    yt, yp, g = triples[:, 0], triples[:, 1], names[triples[:, 2]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fairlearn/sklearn warn about groups with a single class
        frame = MetricFrame(metrics={"selection_rate": selection_rate, "tpr": true_positive_rate,
                                     "fpr": false_positive_rate, "count": count},
                            y_true=y_true, y_pred=y_pred, sensitive_features=sensitive) if by_group else None
        dpd = (demographic_parity_difference(yt, yp, sensitive_features=g, sample_weight=weight)
               if yt.size else float("nan"))
        has_pos = np.isin(g, np.unique(g[yt == 1]))
        eod = (equal_opportunity_difference(yt[has_pos], yp[has_pos], sensitive_features=g[has_pos],
                                            sample_weight=weight[has_pos]) if has_pos.any() else float("nan"))
    return {"demographic_parity_difference": float(dpd), "equal_opportunity_difference": float(eod),
            "by_group": None if frame is None else frame.by_group}


def all_metrics(inp: EvalInputs, attrs: Mapping[str, np.ndarray], weights: np.ndarray | None = None,
                gap_groups: Mapping[str, Sequence[str]] | None = None) -> dict[Key, np.ndarray]:
    """Every metric of the evaluation as a flat dict key -> [R].

    Keys: ("overall", m), ("group", attr, g, m), ("gap", attr, m, stat) with stat in gap / worst /
    best / gap_to_best/<g>, ("parity", attr, "demographic_parity_difference/T" |
    "equal_opportunity_difference/T"). `gap_groups[attr]` lists the groups that enter gaps and
    parity (default: all). With weights None, parity comes from fairlearn; otherwise from the
    weighted per-group selection rates and TPRs (the same definitions).
    """
    out: dict[Key, np.ndarray] = {("overall", m): v for m, v in metric_suite(inp, weights, overall=True).items()}
    for attr, values in attrs.items():
        groups = group_index(values)
        per_group = {}
        for g, idx in groups.items():
            w = None if weights is None else weights[:, idx]
            per_group[g] = metric_suite(inp.subset(idx), w)
            out.update({("group", attr, g, m): v for m, v in per_group[g].items()})
        included = list(groups) if gap_groups is None else [g for g in groups if g in gap_groups[attr]]
        if not included:
            continue
        for m in per_group[included[0]]:
            stats = summarise_groups({g: per_group[g][m] for g in included}, m)
            out.update({("gap", attr, m, s): v for s, v in stats.items()})
        for t, j in zip(inp.tasks, inp.task_index):
            if weights is None:
                rows = np.isin(np.asarray(values).astype(str), included) & inp.valid[:, j]
                p = fairlearn_parity(inp.binary_label[rows, j], inp.decision[rows, j], np.asarray(values)[rows])
                dpd, eod = np.array([p["demographic_parity_difference"]]), np.array([p["equal_opportunity_difference"]])
            else:
                dpd = out[("gap", attr, f"selection_rate/{t}", "gap")]
                eod = out[("gap", attr, f"tpr/{t}", "gap")]
            out[("parity", attr, f"demographic_parity_difference/{t}")] = dpd
            out[("parity", attr, f"equal_opportunity_difference/{t}")] = eod
    return out
