"""Subgroup fairness: thresholds from validation, groups, per-group metrics, gaps, parity metrics.

Choices (also stated in every report, see `rules`):
- Threshold (multilabel): per task, on the *validation* predictions, by Youden's J (argmax
  TPR - FPR over sklearn's ROC curve), "fpr" (the lowest threshold whose validation FPR is <=
  target_fpr), "f1" (argmax F1 over sklearn's precision-recall curve) or "fixed" (one given
  value). A task whose validation labels have one class falls back to the fixed value, and the
  fallback is stated per task. Without validation predictions every threshold is the fixed value.
- Binary decisions for parity: multilabel per task (thresholded); multiclass one-vs-rest per class
  with the argmax decision (only when C <= max_ovr_classes).
- Parity metrics (fairlearn's definitions, method "between_groups"), per task T over the groups
  that count: demographic parity difference/ratio = max - min / min / max of the selection rate;
  equal opportunity difference/ratio = the same for the TPR; equalized odds difference = max of
  the TPR and FPR differences, ratio = min of the TPR and FPR ratios that are defined (fairlearn: a
  TPR ratio of 0 with every FPR 0, a 0/0 FPR ratio, is an equalized-odds ratio of 0, the worst
  disparity, not undefined). A group without positives
  (negatives) of T has no TPR (FPR) and is left out of that rate's comparison (fairlearn would
  count it as 0). Any comparison over fewer than two groups with a defined value is undefined
  (NaN), never 0; a ratio with max = 0 is undefined.
- gap = max - min over groups of a metric; worst / best = min / max over groups (reversed for
  FPR/underdiagnosis); gap_to_best/<group> = how far a group is behind the best one (>= 0). Only
  groups with a defined value count; fewer than two -> undefined. In the bootstrap, "worst" is the
  minimum over groups in each replicate, so its CI is the CI of the minimum, not of the worst
  group's own value (which is in the group table).
- Mean metrics of a group (auc_mean, accuracy_mean, auc_macro) average only the tasks whose
  metric is defined in *every* compared group of that attribute, so groups are compared on the
  same tasks.
- Groups that count for gaps and parity: all groups, minus those the user excludes
  ("race=Unknown", which also drops intersections containing it) and, with exclude_small_groups,
  those with fewer patients than min_group_size. A group lacking a class for one task is never
  dropped: only its metrics that need that class are undefined.

Every function works on one weight matrix (see dpft/metrics.py): None for the plain estimate, or
[R, N] bootstrap weights. Point estimates equal fairlearn / scikit-learn (tests compare them).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Mapping, Sequence

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_curve

from dpft.metrics import EvalInputs, higher_is_better, metric_suite

Key = tuple[str, ...]
THRESHOLD_METHODS = ("youden", "fpr", "f1", "fixed")
INTERSECTION_SEP = "&"  # attribute "sex&race", group "F & White"
MEAN_METRICS = {"auc_mean": "auc", "accuracy_mean": "accuracy", "auc_macro": "auc"}  # mean -> component prefix
PARITY_METRICS = ("demographic_parity_difference", "demographic_parity_ratio", "equal_opportunity_difference",
                  "equal_opportunity_ratio", "equalized_odds_difference", "equalized_odds_ratio")
#: fairlearn's other methods: each group against the whole split (`method="to_overall"`: the largest
#: |rate_g - rate_overall|, the smallest min(rate_g / rate_overall, rate_overall / rate_g)) and equalized
#: odds aggregated by the mean of its TPR and FPR components (`agg="mean"`; the six above are
#: `between_groups` with `agg="worst_case"`). In metrics.json and the report; the sweep compares the six.
MORE_PARITY_METRICS = tuple(f"{m}_to_overall" for m in PARITY_METRICS) + (
    "equalized_odds_difference_mean_agg", "equalized_odds_ratio_mean_agg")
ALL_PARITY_METRICS = PARITY_METRICS + MORE_PARITY_METRICS


# ----------------------------------------------------------------------------- thresholds

@dataclasses.dataclass(frozen=True)
class Threshold:
    """A decision threshold with how it was chosen; `fallback` says why the method did not apply."""

    value: float
    method: str
    fallback: str | None = None


def select_threshold(y: np.ndarray, score: np.ndarray, method: str = "youden", target_fpr: float = 0.1,
                     fixed: float = 0.5) -> Threshold:
    """Decision threshold on scores [N] from validation labels y (bool [N]); positive when score >= it.

    "youden": maximises TPR - FPR; "fpr": the lowest threshold with FPR <= target_fpr; "f1":
    maximises F1; "fixed": `fixed`. With a single class in y (or no rows) -> `fixed`, with the reason.
    """
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"threshold method must be one of {THRESHOLD_METHODS}, got {method!r}")
    if method == "fixed":
        return Threshold(float(fixed), "fixed")
    y = np.asarray(y).astype(bool)
    if y.all() or not y.any():
        return Threshold(float(fixed), method, f"validation has {int(y.sum())} positive / {int((~y).sum())} negative: "
                                               f"fixed {fixed:g}")
    score = np.asarray(score, np.float64)
    if method == "f1":
        prec, rec, thr = precision_recall_curve(y, score)
        prec, rec = prec[:-1], rec[:-1]  # the last point (recall 0) has no threshold
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.where(prec + rec > 0, 2 * prec * rec / np.where(prec + rec > 0, prec + rec, 1.0), 0.0)
        return Threshold(float(thr[int(np.argmax(f1))]), method)
    fpr, tpr, thr = roc_curve(y, score, drop_intermediate=False)
    finite = np.isfinite(thr)  # sklearn's first threshold is +inf (nothing positive)
    fpr, tpr, thr = fpr[finite], tpr[finite], thr[finite]
    if method == "youden":
        return Threshold(float(thr[int(np.argmax(tpr - fpr))]), method)
    ok = np.flatnonzero(fpr <= target_fpr)
    return Threshold(float(thr[ok[-1]]) if ok.size else float(thr[0]), method)


def choose_threshold(y: np.ndarray, score: np.ndarray, method: str = "youden", target_fpr: float = 0.1,
                     fixed: float = 0.5) -> float:
    """The value of `select_threshold` (0.5 by default when y has a single class)."""
    return select_threshold(y, score, method, target_fpr, fixed).value


def choose_thresholds(probs: np.ndarray, label: np.ndarray, label_mask: np.ndarray, class_names: Sequence[str],
                      names: Sequence[str], method: str = "youden", target_fpr: float = 0.1,
                      fixed: float = 0.5, detail: bool = False) -> dict[str, float] | dict[str, Threshold]:
    """Per class name in `names`: the threshold on validation rows where label_mask > 0
    (float values, or `Threshold`s with detail=True)."""
    out = {}
    for name in names:
        j = list(class_names).index(name)
        keep = np.asarray(label_mask)[:, j] > 0
        t = select_threshold(np.asarray(label)[keep, j] > 0.5, probs[keep, j], method, target_fpr, fixed)
        out[name] = t if detail else t.value
    return out


# ----------------------------------------------------------------------------- groups

def group_index(values: np.ndarray) -> dict[str, np.ndarray]:
    """Group name -> row indices (int [n_g]), groups sorted by name."""
    values = np.asarray(values).astype(str)
    return {g: np.flatnonzero(values == g) for g in np.unique(values)}


def parse_intersection(spec: str, known: Sequence[str]) -> tuple[str, ...]:
    """'sex*race', 'sex&race' or 'sex,race' -> ('sex', 'race'); ValueError on unknown/duplicate names."""
    parts = tuple(p.strip() for p in spec.replace("*", ",").replace(INTERSECTION_SEP, ",").split(",") if p.strip())
    if len(parts) < 2 or len(set(parts)) != len(parts):
        raise ValueError(f"intersection {spec!r}: give two or more distinct attributes, e.g. 'sex*race'")
    missing = [p for p in parts if p not in known]
    if missing:
        raise ValueError(f"intersection {spec!r}: unknown attribute(s) {missing}; known: {sorted(known)}")
    return parts


def add_intersections(attrs: Mapping[str, np.ndarray], specs: Sequence[str]) -> dict[str, np.ndarray]:
    """attrs plus one attribute per intersection spec: name 'sex&race', values 'F & White' (str [N])."""
    out = {k: np.asarray(v).astype(str) for k, v in attrs.items()}
    for spec in specs:
        parts = parse_intersection(spec, list(attrs))
        vals = out[parts[0]]
        for p in parts[1:]:
            vals = np.char.add(np.char.add(vals, f" {INTERSECTION_SEP} "), out[p])
        out[INTERSECTION_SEP.join(parts)] = vals
    return out


#: The group of a conditional attribute's rows outside its stratum (never compared).
OUTSIDE_STRATUM = "(outside the stratum)"


def add_conditionals(attrs: Mapping[str, np.ndarray], controls: Sequence[str]) -> tuple[dict[str, np.ndarray],
                                                                                         dict[str, str]]:
    """attrs plus, for each control feature C (fairlearn's `control_features`) and every other attribute A
    and value c of C, the attribute 'A|C=c': A's groups within the rows where C == c, OUTSIDE_STRATUM
    elsewhere (left out of its gaps and parity) -> (attrs, {conditional attribute: its stratum 'C=c'}).
    Its gaps and parity compare A's groups within the stratum, its `*_to_overall` metrics each group with
    the whole stratum (as fairlearn's `method="to_overall"` with control features). ValueError for an
    unknown control."""
    out = {k: np.asarray(v).astype(str) for k, v in attrs.items()}
    strata: dict[str, str] = {}
    for control in controls:
        if control not in attrs:
            raise ValueError(f"control feature {control!r}: unknown attribute; known: {sorted(attrs)}")
        levels = out[control]
        for a in [k for k in attrs if k != control and control not in k.split(INTERSECTION_SEP)]:
            for c in sorted(set(levels.tolist())):
                name = f"{a}|{control}={c}"
                out[name] = np.where(levels == c, out[a], OUTSIDE_STRATUM)
                strata[name] = f"{control}={c}"
    return out, strata


def parse_exclusions(specs: Sequence[str], attrs: Mapping[str, np.ndarray]) -> dict[str, set[str]]:
    """['race=Unknown', ...] -> {'race': {'Unknown'}}; ValueError on a malformed spec or unknown attribute."""
    out: dict[str, set[str]] = {}
    for spec in specs:
        attr, sep, group = spec.partition("=")
        attr, group = attr.strip(), group.strip()
        if not sep or not attr or not group:
            raise ValueError(f"group exclusion {spec!r} must look like ATTRIBUTE=GROUP, e.g. race=Unknown")
        if attr not in attrs:
            raise ValueError(f"group exclusion {spec!r}: unknown attribute {attr!r}; known: {sorted(attrs)}")
        out.setdefault(attr, set()).add(group)
    return out


def excluded_by_user(attr: str, group: str, exclusions: Mapping[str, set[str]]) -> str | None:
    """Why the user's exclusions drop group `group` of `attr` (also via a component of an intersection)."""
    if group in exclusions.get(attr, ()):
        return f"excluded by the user ({attr}={group})"
    parts, values = attr.split(INTERSECTION_SEP), group.split(f" {INTERSECTION_SEP} ")
    if len(parts) > 1 and len(parts) == len(values):
        for a, v in zip(parts, values):
            if v in exclusions.get(a, ()):
                return f"excluded by the user ({a}={v})"
    return None


def group_info(inp: EvalInputs, patient_id: np.ndarray, min_group_size: int) -> dict[str, object]:
    """Facts about one group's rows: n, n_patients, `small` (fewer patients than min_group_size) with
    its reason, and `missing_class` {task: 'p positive / q negative'} for tasks lacking a class."""
    n_pat = int(np.unique(np.asarray(patient_id).astype(str)).size)
    small = n_pat < min_group_size
    missing = {}
    y = inp.binary_label
    for t, j in zip(inp.tasks, inp.task_index):
        pos = int((y[:, j] & inp.valid[:, j]).sum())
        neg = int((~y[:, j] & inp.valid[:, j]).sum())
        if pos == 0 or neg == 0:
            missing[t] = f"{pos} positive / {neg} negative"
    return {"n": inp.n, "n_patients": n_pat, "small": small,
            "small_reason": f"{n_pat} patients < {min_group_size}" if small else None, "missing_class": missing}


# ----------------------------------------------------------------------------- comparisons over groups

def _defined_count(v: np.ndarray) -> np.ndarray:
    return (~np.isnan(v)).sum(axis=0)


def summarise_groups(values: Mapping[str, np.ndarray], metric: str) -> dict[str, np.ndarray]:
    """Gap statistics of one metric over groups: {group: [R]} -> {"gap", "worst", "best", "n_defined",
    "gap_to_best/<g>"}; NaN in a replicate where fewer than two groups have a defined value."""
    names = list(values)
    v = np.stack([np.asarray(values[g], np.float64) for g in names])  # [G, R]
    ok = _defined_count(v) >= 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices -> NaN
        hi, lo = np.nanmax(v, axis=0), np.nanmin(v, axis=0)
    hi, lo = np.where(ok, hi, np.nan), np.where(ok, lo, np.nan)
    best, worst = (hi, lo) if higher_is_better(metric) else (lo, hi)
    out = {"gap": hi - lo, "worst": worst, "best": best, "n_defined": _defined_count(v).astype(np.float64)}
    for g, row in zip(names, v):
        out[f"gap_to_best/{g}"] = np.abs(best - row)
    return out


def rate_difference(v: np.ndarray) -> np.ndarray:
    """max - min over groups of rates v [G, R] -> [R]; NaN where fewer than two groups are defined."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        d = np.nanmax(v, axis=0) - np.nanmin(v, axis=0)
    return np.where(_defined_count(v) >= 2, d, np.nan)


def rate_ratio(v: np.ndarray) -> np.ndarray:
    """min / max over groups of rates v [G, R] -> [R]; NaN with fewer than two defined groups or max 0."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        hi, lo = np.nanmax(v, axis=0), np.nanmin(v, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(hi > 0, lo / np.where(hi > 0, hi, 1.0), np.nan)
    return np.where(_defined_count(v) >= 2, r, np.nan)


def difference_to_overall(v: np.ndarray, overall: np.ndarray) -> np.ndarray:
    """max over groups of |rate_g - rate_overall|: v [G, R], overall [R] -> [R] (NaN with fewer than two
    defined groups: one group is the whole split, nothing is compared)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        d = np.nanmax(np.abs(v - overall[None, :]), axis=0)
    return np.where((_defined_count(v) >= 2) & ~np.isnan(overall), d, np.nan)


def ratio_to_overall(v: np.ndarray, overall: np.ndarray) -> np.ndarray:
    """min over groups of min(rate_g / rate_overall, rate_overall / rate_g) -> [R]; a 0/0 pair is left out
    (as fairlearn: NaN, then ignored), a group rate 0 against a positive overall rate gives 0."""
    o = overall[None, :]
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r = np.fmin(np.where(o > 0, v / np.where(o > 0, o, 1.0), np.nan), np.where(v > 0, o / np.where(v > 0, v, 1.0),
                                                                                   np.nan))
        r = np.nanmin(np.where(np.isnan(v) | np.isnan(o), np.nan, r), axis=0)
    return np.where(_defined_count(v) >= 2, r, np.nan)


def parity_metrics(selection: np.ndarray, tpr: np.ndarray, fpr: np.ndarray,
                   overall: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The six parity metrics (fairlearn's between-groups definitions) from per-group rates [G, R]; with
    `overall` (the whole split's selection rate, TPR and FPR, each [R]) also MORE_PARITY_METRICS."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        tpr_d, fpr_d, tpr_r, fpr_r = rate_difference(tpr), rate_difference(fpr), rate_ratio(tpr), rate_ratio(fpr)
        eqo_d = np.where(np.isnan(tpr_d) | np.isnan(fpr_d), np.nan, np.fmax(tpr_d, fpr_d))
        eqo_r = np.fmin(tpr_r, fpr_r)  # the smaller of the defined ratios; NaN only when neither is defined
    out = {"demographic_parity_difference": rate_difference(selection),
           "demographic_parity_ratio": rate_ratio(selection),
           "equal_opportunity_difference": tpr_d, "equal_opportunity_ratio": tpr_r,
           "equalized_odds_difference": eqo_d, "equalized_odds_ratio": eqo_r}
    if overall is None:
        return out
    sel_o, tpr_o, fpr_o = (np.asarray(x, np.float64) for x in overall)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        tpr_do, fpr_do = difference_to_overall(tpr, tpr_o), difference_to_overall(fpr, fpr_o)
        tpr_ro, fpr_ro = ratio_to_overall(tpr, tpr_o), ratio_to_overall(fpr, fpr_o)
        out.update({
            "demographic_parity_difference_to_overall": difference_to_overall(selection, sel_o),
            "demographic_parity_ratio_to_overall": ratio_to_overall(selection, sel_o),
            "equal_opportunity_difference_to_overall": tpr_do, "equal_opportunity_ratio_to_overall": tpr_ro,
            "equalized_odds_difference_to_overall": np.where(np.isnan(tpr_do) | np.isnan(fpr_do), np.nan,
                                                             np.fmax(tpr_do, fpr_do)),
            "equalized_odds_ratio_to_overall": np.fmin(tpr_ro, fpr_ro),
            "equalized_odds_difference_mean_agg": (tpr_d + fpr_d) / 2.0,
            "equalized_odds_ratio_mean_agg": (tpr_r + fpr_r) / 2.0})
    return out


def parity(y_true: np.ndarray, y_pred: np.ndarray, sensitive: np.ndarray,
           sample_weight: np.ndarray | None = None) -> dict[str, float]:
    """Every parity metric (ALL_PARITY_METRICS) of binary y_true, y_pred [N] over the groups of sensitive
    (str [N]). Groups without positives (negatives) are left out of the TPR (FPR) comparisons; undefined -> NaN."""
    y_true, y_pred = np.asarray(y_true).astype(bool), np.asarray(y_pred).astype(np.float64)
    w = np.ones(y_true.shape[0]) if sample_weight is None else np.asarray(sample_weight, np.float64)

    def rates_of(yt, yp, wg) -> dict[str, float]:
        out = {}
        for key, rows in (("sel", np.ones_like(yt)), ("tpr", yt), ("fpr", ~yt)):
            den = float((wg * rows).sum())
            out[key] = float((wg * rows * yp).sum()) / den if den > 0 else np.nan
        return out

    groups = [rates_of(y_true[idx], y_pred[idx], w[idx]) for idx in group_index(sensitive).values()]
    if not groups:
        return {m: float("nan") for m in ALL_PARITY_METRICS}
    arr = {k: np.asarray([g[k] for g in groups], np.float64).reshape(-1, 1) for k in ("sel", "tpr", "fpr")}
    whole = rates_of(y_true, y_pred, w)
    overall = tuple(np.asarray([whole[k]]) for k in ("sel", "tpr", "fpr"))
    return {m: float(v[0]) for m, v in parity_metrics(arr["sel"], arr["tpr"], arr["fpr"], overall).items()}


# ----------------------------------------------------------------------------- the whole evaluation

@dataclasses.dataclass(frozen=True)
class GroupPlan:
    """Which groups count and which tasks enter the mean metrics, fixed from the point estimates so
    every bootstrap replicate compares the same things.

    attrs: attribute -> str [N]; included: attribute -> groups that count for gaps and parity;
    common_tasks: attribute -> {mean metric: tasks defined in every included group};
    parity_tasks: attribute -> {parity metric: tasks where it is defined} (for the mean over tasks).
    """

    attrs: Mapping[str, np.ndarray]
    included: Mapping[str, tuple[str, ...]]
    common_tasks: Mapping[str, Mapping[str, tuple[str, ...]]]
    parity_tasks: Mapping[str, Mapping[str, tuple[str, ...]]]


def _group_suites(inp: EvalInputs, values: np.ndarray, weights: np.ndarray | None) -> dict[str, dict[str, np.ndarray]]:
    return {g: metric_suite(inp.subset(idx), None if weights is None else weights[:, idx])
            for g, idx in group_index(values).items()}


def _reference_suite(inp: EvalInputs, values: np.ndarray, weights: np.ndarray | None,
                     whole: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    """What `*_to_overall` compares an attribute's groups with: the whole split (`whole`), or for a
    conditional attribute (`add_conditionals`) the rows of its stratum, all of its groups together."""
    inside = np.flatnonzero(np.asarray(values).astype(str) != OUTSIDE_STRATUM)
    if inside.size == inp.n:
        return whole
    return metric_suite(inp.subset(inside), None if weights is None else weights[:, inside], overall=True)


def plan_groups(inp: EvalInputs, attrs: Mapping[str, np.ndarray],
                included: Mapping[str, Sequence[str]] | None = None) -> GroupPlan:
    """A GroupPlan from the point estimates (included default: every group)."""
    inc, common, ptasks = {}, {}, {}
    whole = metric_suite(inp)
    for attr, values in attrs.items():
        per_group = _group_suites(inp, values, None)
        inc[attr] = tuple(g for g in per_group if included is None or g in included.get(attr, per_group))
        common[attr] = {}
        for mean, prefix in MEAN_METRICS.items():
            if not per_group or mean not in next(iter(per_group.values())):
                continue
            common[attr][mean] = tuple(t for t in inp.tasks if inc[attr] and all(
                not np.isnan(per_group[g][f"{prefix}/{t}"][0]) for g in inc[attr]))
        ptasks[attr] = {m: [] for m in ALL_PARITY_METRICS}
        reference = _reference_suite(inp, values, None, whole)
        for t in inp.tasks:
            p = _parity_of(per_group, inc[attr], t, reference)
            for m in ALL_PARITY_METRICS:
                if not np.isnan(p[m][0]):
                    ptasks[attr][m].append(t)
        ptasks[attr] = {m: tuple(v) for m, v in ptasks[attr].items()}
    return GroupPlan(attrs=dict(attrs), included=inc, common_tasks=common, parity_tasks=ptasks)


def _parity_of(per_group: Mapping[str, Mapping[str, np.ndarray]], included: Sequence[str], t: str,
               overall: Mapping[str, np.ndarray]) -> dict:
    """Every parity metric of task t over the included groups (`overall`: the metric suite `*_to_overall`
    compares with, `_reference_suite`)."""
    if not included:
        return {m: np.array([np.nan]) for m in ALL_PARITY_METRICS}
    rates = [np.stack([per_group[g][f"{r}/{t}"] for g in included]) for r in ("selection_rate", "tpr", "fpr")]
    return parity_metrics(*rates, overall=tuple(overall[f"{r}/{t}"] for r in ("selection_rate", "tpr", "fpr")))


def _mean_rows(cols: Sequence[np.ndarray], r: int) -> np.ndarray:
    if not cols:
        return np.full(r, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.stack(cols), axis=0)


def all_metrics(inp: EvalInputs, plan: GroupPlan, weights: np.ndarray | None = None) -> dict[Key, np.ndarray]:
    """Every metric of the evaluation as a flat dict key -> [R].

    Keys: ("overall", m), ("group", attr, g, m), ("gap", attr, m, stat) with stat in gap / worst /
    best / n_defined / gap_to_best/<g>, ("parity", attr, "<parity metric>/T") and
    ("parity", attr, "<parity metric>/mean") = the mean over plan.parity_tasks. Group mean
    metrics average plan.common_tasks.
    """
    r = 1 if weights is None else int(np.asarray(weights).shape[0])
    whole = metric_suite(inp, weights, overall=True)
    out: dict[Key, np.ndarray] = {("overall", m): v for m, v in whole.items()}
    for attr, values in plan.attrs.items():
        per_group = _group_suites(inp, values, weights)
        for g, suite in per_group.items():
            for mean, prefix in MEAN_METRICS.items():
                if mean in suite:
                    suite[mean] = _mean_rows([suite[f"{prefix}/{t}"] for t in plan.common_tasks[attr][mean]], r)
            out.update({("group", attr, g, m): v for m, v in suite.items()})
        included = plan.included[attr]
        if not included:
            continue
        for m in per_group[included[0]]:
            stats = summarise_groups({g: per_group[g][m] for g in included}, m)
            out.update({("gap", attr, m, s): v for s, v in stats.items()})
        reference = _reference_suite(inp, values, weights, whole)
        per_task = {t: _parity_of(per_group, included, t, reference) for t in inp.tasks}
        for t, p in per_task.items():
            out.update({("parity", attr, f"{m}/{t}"): v for m, v in p.items()})
        if inp.tasks:
            for m in ALL_PARITY_METRICS:
                out[("parity", attr, f"{m}/mean")] = _mean_rows([per_task[t][m] for t in plan.parity_tasks[attr][m]], r)
    return out


# ----------------------------------------------------------------------------- reasons for undefined values

def undefined_reason(key: Key, inp: EvalInputs, plan: GroupPlan, point: Mapping[Key, np.ndarray]) -> str:
    """Why the point estimate of `key` is undefined (NaN), in words for the report."""
    kind = key[0]
    if kind in ("overall", "group"):
        metric = key[-1]
        sub = inp if kind == "overall" else inp.subset(np.flatnonzero(np.asarray(plan.attrs[key[1]]).astype(str) == key[2]))
        where = "overall" if kind == "overall" else f"in {key[1]}={key[2]}"
        if metric in MEAN_METRICS:
            if kind == "group":
                return f"no task has {MEAN_METRICS[metric]} defined in every compared group of {key[1]}"
            return f"no task has {MEAN_METRICS[metric]} defined"
        name, _, task = metric.partition("/")
        if metric == "underdiagnosis" and inp.no_finding is not None:
            name, task = "fpr", inp.class_names[inp.no_finding]
        if task and task in inp.class_names and name in ("auc", "tpr", "fpr", "accuracy", "selection_rate"):
            j = inp.class_names.index(task)
            y, v = sub.binary_label[:, j], sub.valid[:, j]
            pos, neg = int((y & v).sum()), int((~y & v).sum())
            need = {"auc": "both classes", "tpr": "positives", "fpr": "negatives"}.get(name, "labelled examples")
            return f"{task}: {pos} positive / {neg} negative {where} (needs {need})"
        if name.startswith("class_accuracy"):
            return f"class {task} absent {where}"
        return f"no examples {where}"
    if kind == "gap":
        _, attr, metric, _stat = key
        n_def = int(point.get(("gap", attr, metric, "n_defined"), np.array([0]))[0])
        if _stat.startswith("gap_to_best/") and n_def >= 2:
            return f"{metric} of {attr}={_stat.split('/', 1)[1]} is undefined"
        return f"{metric} defined in {n_def} of {len(plan.included[attr])} compared groups of {attr} (needs 2)"
    if kind == "parity":
        _, attr, name = key
        metric, _, task = name.partition("/")
        if task == "mean":
            return f"{metric} is undefined for every task"
        rates = {"demographic": ["selection_rate"], "equal_opportunity": ["tpr"], "equalized_odds": ["tpr", "fpr"]}
        needed = next(v for k, v in rates.items() if metric.startswith(k))
        parts = []
        words = {"selection_rate": "labelled examples", "tpr": "positives", "fpr": "negatives"}
        for rate in needed:
            vals = [point[("group", attr, g, f"{rate}/{task}")][0] for g in plan.included[attr]]
            n_def = sum(not np.isnan(v) for v in vals)
            if n_def < 2:
                parts.append(f"{n_def} of {len(plan.included[attr])} compared groups have {words[rate]} (needs 2)")
            elif metric.endswith("ratio") and np.nanmax(vals) == 0:
                parts.append(f"every compared group has {rate} 0 (ratio 0/0)")
        return f"{task}: " + "; ".join(parts or ["undefined"])
    return "undefined"


def rules(method_note: str, exclude_small: bool, min_group_size: int) -> list[str]:
    """The rules that change numbers, stated in every report."""
    return [
        f"thresholds: {method_note}",
        "undefined values (a metric needing a class a group lacks; a comparison with fewer than two groups "
        "defined) are null in metrics.json and 'n/a (reason)' here, never 0",
        "equal opportunity / equalized odds: groups without positives (negatives) of a task are left out of "
        "its TPR (FPR) comparison (fairlearn would count their rate as 0)",
        "equalized odds ratio = the smaller of the TPR and FPR ratios that are defined (as fairlearn: a 0/0 FPR "
        "ratio, every FPR 0, does not hide a TPR ratio of 0)",
        "*_to_overall: each compared group against the whole split (all its rows, as fairlearn's method='to_overall'; "
        "for a conditional attribute 'A|C=c', against all rows of the stratum C=c); "
        "*_mean_agg: the mean of the TPR and FPR components (fairlearn's agg='mean'); the others compare the "
        "groups with each other (method='between_groups', agg='worst_case')",
        "group mean metrics (auc_mean, accuracy_mean, auc_macro) average only the tasks defined in every "
        "compared group of the attribute (listed per attribute)",
        "'worst' in gap tables is the minimum over groups (maximum for FPR/underdiagnosis); its CI is the CI "
        "of that minimum over bootstrap replicates, not the CI of the worst group's own value (group table)",
        "gap CIs are percentile intervals of max - min over groups; max - min is biased upwards when groups "
        "are alike, so such an interval can lie above (exclude) the estimate",
        "parity '/mean' = mean over the tasks where that parity metric is defined",
        (f"groups with fewer than {min_group_size} patients are flagged 'small' and "
         + ("left out of gaps and parity" if exclude_small else "kept in gaps and parity")),
    ]
