"""Paired comparison of a subgroup gap: a private run against its non-private baseline, seed by seed.

The imbalance study asks whether DP widens the gap between groups at each minority fraction. Two
runs evaluated on the same test rows differ by their models only, so their gaps are compared on the
same bootstrap resamples of patients (a paired bootstrap: the shared patient noise cancels), and
the seeds are resampled with them: replicate r draws the study's seeds with replacement and averages
their differences on patient resample r. The interval is the percentile interval of that average;
the point estimate is the mean over seeds of the point differences.

Each run's gap is its utility metric's max - min over the groups its own report compared (metrics.json:
`groups.<attr>.<group>.excluded` null), with its report's decision thresholds, recomputed from its
predictions file (whose SHA-256 metrics.json records).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from dpft.errors import UsageError
from dpft.evaluate import bootstrap as bs
from dpft.evaluate import fairness as fair
from dpft.metrics import make_inputs
from dpft.workdir.predictions import check_digest, load_predictions


def gap_replicates(metrics: Mapping[str, Any], metrics_path: str, attribute: str, n_resamples: int,
                   seed: int) -> tuple[float, np.ndarray, np.ndarray]:
    """(point gap, gap on each of `n_resamples` patient resamples [R], example ids [N]) of one run's
    utility metric over `attribute`, from the predictions its metrics.json was computed from."""
    meta = metrics["meta"]
    if meta.get("predictions_sha256"):  # the file these metrics came from, unchanged
        check_digest(meta["predictions"], meta["predictions_sha256"], metrics_path)
    preds = load_predictions(meta["predictions"])
    if attribute not in preds.attrs:
        raise UsageError(f"{meta['predictions']}: no attribute {attribute!r} to compare gaps over")
    utility = meta["headline"][0]
    inp = make_inputs(preds.task, preds.class_names, preds.logits, preds.probabilities(), preds.label,
                      preds.label_mask, preds.eval_tasks, meta["thresholds"]["values"],
                      meta["config"]["max_ovr_classes"])
    values = np.asarray(preds.attrs[attribute]).astype(str)
    included = [g for g, info in metrics["groups"].get(attribute, {}).items() if info.get("excluded") is None]
    plan = fair.plan_groups(inp, {attribute: values}, {attribute: included})
    key = ("gap", attribute, utility, "gap")
    point = fair.all_metrics(inp, plan, None)[key][0]
    weights = bs.patient_weights(np.asarray(preds.patient_id).astype(str), n_resamples, seed)
    return float(point), fair.all_metrics(inp, plan, weights)[key], np.asarray(preds.example_id)


def paired_gap_difference(pairs: Sequence[tuple[tuple[Mapping, str], tuple[Mapping, str]]], attribute: str, *,
                          n_resamples: int = 200, seed: int = 0, level: float = 0.95,
                          cache: dict | None = None) -> dict[str, Any]:
    """Mean over seeds of (gap of the private run - gap of its baseline), with the paired interval (module
    doc). `pairs`: ((metrics, path) of the private run, (metrics, path) of its baseline), one per seed.
    `cache`: {(path, attribute): gap_replicates} shared between calls, so a baseline that several private
    cells pair with is read and resampled once."""
    if not pairs:
        raise ValueError("paired_gap_difference: no pairs")
    cache = {} if cache is None else cache

    def replicates(metrics: Mapping, path: str) -> tuple[float, np.ndarray, np.ndarray]:
        if (path, attribute) not in cache:
            cache[path, attribute] = gap_replicates(metrics, path, attribute, n_resamples, seed)
        return cache[path, attribute]

    points, reps = [], []
    for (m_dp, p_dp), (m_np, p_np) in pairs:
        g_dp, r_dp, ids_dp = replicates(m_dp, p_dp)
        g_np, r_np, ids_np = replicates(m_np, p_np)
        if not np.array_equal(ids_dp, ids_np):
            raise UsageError(f"{p_dp} and {p_np}: evaluated on different test rows; a paired comparison needs the same")
        points.append(g_dp - g_np)
        reps.append(r_dp - r_np)
    diff = np.stack(reps)  # [S, R]
    rng = np.random.default_rng([seed, 0x9A1])
    drawn = rng.integers(0, diff.shape[0], size=(diff.shape[1], diff.shape[0]))  # [R, S] seeds per replicate
    with np.errstate(invalid="ignore"):
        means = np.nanmean(diff[drawn, np.arange(diff.shape[1])[:, None]], axis=1)
    lo, hi, n_valid = bs.confidence_interval(means, level)
    value = float(np.nanmean(points)) if np.any(~np.isnan(points)) else None
    ci = [None, None] if n_valid == 0 else [lo, hi]
    return {"value": value, "ci": ci, "n_valid": n_valid, "n_pairs": len(pairs),
            "per_seed": [None if np.isnan(p) else float(p) for p in points]}
