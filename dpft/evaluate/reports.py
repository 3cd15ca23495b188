"""Evaluate a predictions file: metrics.json, report.md, groups.csv (tidy, `dpft.evaluate.tidy`) and PNG
plots in WORKDIR/eval/<step>/.

This module assembles the result; `render` writes the Markdown, `plots` the PNGs.

`evaluate_predictions(test_path, val_path=None, **cfg)` is the entry point (cfg: see EvalConfig).
metrics.json layout (every statistic is `{"value", "ci": [low, high], "n_valid"}` plus
`"undefined": reason` where the value is null; NaN is never written, undefined is never 0):
  meta:     task, split, step, params, epsilon, delta, n_examples, n_patients, thresholds
            {method, source, values, per_task: {T: {value, method, fallback}}}, bootstrap
            {n_resamples, seed, ci_level, unit}, config, rules, notes, groups_compared {attr: [g]},
            common_tasks {attr: {mean metric: [T]}}, parity_tasks {attr: {parity metric: [T]}}
  overall:  {metric: stat}
  groups:   {attr: {group: {n, n_patients, small, small_reason, missing_class: {T: "p positive / q negative"},
            excluded (reason or null), flags: [..], metrics: {metric: stat}}}}
  gaps:     {attr: {metric: {gap, worst, best: stat, worst_group, best_group, gap_to_best: {group: stat}}}}
  parity:   {attr: {"<parity metric>/T" and "<parity metric>/mean": stat}} (fairness.PARITY_METRICS)
  individual_epsilon (only if WORKDIR/individual_epsilon.npz exists): see individual_epsilon_summary.
Intersectional attributes ("sex&race", groups "F & White") are attributes like any other.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

import numpy as np

from dpft import atomic_io, paths
from dpft.config.fields import FLOAT, INT, STR, Range
from dpft.config.options import dataclass_problems, option
from dpft.data.coverage import MISSING
from dpft.data.subgroups import RACE_RULE
from dpft.errors import UsageError
from dpft.evaluate import bootstrap as bs
from dpft.evaluate import fairness as fair
from dpft.evaluate import plots, render, tidy
from dpft.evaluate.fairness import THRESHOLD_METHODS, group_index
from dpft.metrics import NO_FINDING, EvalInputs, headline_metrics, higher_is_better, make_inputs
from dpft.workdir import contract
from dpft.workdir.predictions import Predictions, digest, load_predictions, split_paths

INDIVIDUAL_EPSILON_FILE = "individual_epsilon.npz"
MISSING_GROUP = MISSING  # an attribute value that is missing or empty (dpft.data.coverage)
DEFAULT_RESAMPLES = 1000


_UNIT_OPEN = Range(0.0, 1.0, low_open=True, high_open=True)  # (0, 1)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Options of `evaluate_predictions` (all keyword arguments): plain data, a dataclass (no saved
    config to upgrade), each field with its record (`dpft.config.fields.option`), which `make_config`
    checks and `dpft evaluate` takes its options from."""

    n_resamples: int = option(DEFAULT_RESAMPLES, INT, "patient-level bootstrap replicates", range=Range(1))
    seed: int = option(0, INT, "bootstrap seed")
    ci_level: float = option(0.95, FLOAT, "confidence level of the CIs", range=_UNIT_OPEN)
    min_group_size: int = option(30, INT, "flag groups with fewer patients (\"small\")", range=Range(1))
    threshold_method: str = option("youden", STR, "multilabel decision threshold, chosen on validation predictions",
                                   choices=THRESHOLD_METHODS)
    target_fpr: float = option(0.1, FLOAT, "the FPR of threshold_method fpr", range=_UNIT_OPEN)
    fixed_threshold: float = option(0.5, FLOAT, "the threshold of threshold_method fixed, and the fallback where a "
                                    "method does not apply", range=Range(0.0, 1.0))
    max_ovr_classes: int = option(20, INT, "multiclass: per-class AUC/TPR/FPR/parity only up to this many classes",
                                  range=Range(0))
    exclude_small_groups: bool = False  # leave "small" groups out of gaps and parity
    intersections: tuple[str, ...] = ()  # e.g. ("sex*race",): intersectional attributes
    control_features: tuple[str, ...] = ()  # e.g. ("age",): every other attribute compared within each age bin
    exclude_groups: tuple[str, ...] = ()  # e.g. ("race=Unknown",): left out of gaps and parity
    out_dir: str | None = None  # default WORKDIR/eval/<step>
    plots: bool = True
    individual_epsilon_path: str | None = None  # default WORKDIR/individual_epsilon.npz


def make_config(**cfg: Any) -> EvalConfig:
    """EvalConfig from keyword arguments; UsageError names an unknown or invalid field."""
    fields = {f.name for f in dataclasses.fields(EvalConfig)}
    unknown = sorted(set(cfg) - fields)
    if unknown:
        raise UsageError(f"evaluate: unknown option(s) {unknown}; known: {sorted(fields)}")
    for name in ("intersections", "exclude_groups", "control_features"):
        if name in cfg:
            value = cfg[name]
            cfg[name] = (value,) if isinstance(value, str) else tuple(value or ())
    c = EvalConfig(**cfg)
    for name, value, problem in dataclass_problems(c):
        raise UsageError(f"evaluate: invalid {name}={value!r}: {problem}")
    return c


def _clean(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def _stat(point: np.ndarray, reps: np.ndarray | None, level: float, reason: str | None = None) -> dict[str, Any]:
    value = float(np.asarray(point).reshape(-1)[0])
    lo, hi, n_valid = bs.confidence_interval(reps, level) if reps is not None else (math.nan, math.nan, 0)
    out = {"value": _clean(value), "ci": [_clean(lo), _clean(hi)], "n_valid": n_valid}
    if out["value"] is None:
        out["undefined"] = reason or "undefined"
    return out


def _method_words(cfg: EvalConfig) -> str:
    return {"youden": "Youden's J", "fpr": f"FPR <= {cfg.target_fpr:g}", "f1": "max F1",
            "fixed": f"fixed {cfg.fixed_threshold:g}"}[cfg.threshold_method]


def _thresholds(preds: Predictions, val: Predictions | None,
                cfg: EvalConfig) -> tuple[dict[str, float], dict[str, dict[str, Any]], str]:
    """(values {T: thr}, per_task {T: {value, method, fallback}}, source sentence)."""
    if preds.task != "multilabel":
        return {}, {}, "multiclass: argmax decision, no threshold"
    names = list(preds.eval_tasks or preds.class_names)
    if NO_FINDING in preds.class_names and NO_FINDING not in names:
        names.append(NO_FINDING)
    if val is None and cfg.threshold_method != "fixed":
        reason = f"no validation predictions: fixed {cfg.fixed_threshold:g}"
        per = {n: {"value": cfg.fixed_threshold, "method": cfg.threshold_method, "fallback": reason} for n in names}
        return ({n: cfg.fixed_threshold for n in names}, per,
                f"no validation predictions given: threshold {cfg.fixed_threshold:g} for every task")
    if cfg.threshold_method == "fixed":
        per = {n: {"value": cfg.fixed_threshold, "method": "fixed", "fallback": None} for n in names}
        return {n: cfg.fixed_threshold for n in names}, per, f"fixed value {cfg.fixed_threshold:g} for every task"
    chosen = fair.choose_thresholds(val.probabilities(), val.label, val.label_mask, val.class_names, names,
                                    cfg.threshold_method, cfg.target_fpr, cfg.fixed_threshold, detail=True)
    per = {n: dataclasses.asdict(t) for n, t in chosen.items()}
    fallbacks = [n for n, t in chosen.items() if t.fallback]
    source = f"chosen on validation predictions {val.path} by {_method_words(cfg)}"
    if fallbacks:
        source += f"; fallback to {cfg.fixed_threshold:g} for {', '.join(fallbacks)} (one class in validation)"
    return {n: t.value for n, t in chosen.items()}, per, source


def default_out_dir(predictions_path: str | os.PathLike) -> Any:
    """The report folder of a predictions file in a workdir, an `etils.epath.Path` (local, or gs://...):
    `WORKDIR/eval/<step>` for `WORKDIR/predictions/<step>/<split>.npz` and `WORKDIR/eval/<step>/<params>`
    for `WORKDIR/predictions/<step>/<params>/<split>.npz` (`contract.predictions_path`)."""
    npz = paths.as_path(predictions_path)
    step_dir, params = npz.parent, None
    if step_dir.name in contract.PARAMS_ITEMS and step_dir.parent.parent.name == contract.PREDICTIONS_DIR:
        step_dir, params = step_dir.parent, step_dir.name
    if step_dir.parent.name != contract.PREDICTIONS_DIR or not step_dir.name.isdigit():
        raise UsageError(f"{npz}: not under WORKDIR/predictions/<step>/; pass out_dir")
    return paths.as_path(contract.eval_dir(str(step_dir.parent.parent), int(step_dir.name), params))


def _out_dir(preds: Predictions, cfg: EvalConfig) -> Any:
    """An `etils.epath.Path` (local, or gs://... for a remote workdir)."""
    return paths.as_path(cfg.out_dir) if cfg.out_dir is not None else default_out_dir(preds.path)


def evaluate_predictions(test_path: str | os.PathLike, val_path: str | os.PathLike | None = None,
                         **cfg: Any) -> dict[str, Any]:
    """Metrics, subgroup gaps and parity with patient-level bootstrap CIs; writes metrics.json,
    report.md and PNGs to out_dir (default WORKDIR/eval/<step>). Returns the metrics.json dict."""
    config = make_config(**cfg)
    preds = load_predictions(test_path)
    val = load_predictions(val_path) if val_path is not None else None
    if val is not None and (val.task, val.class_names) != (preds.task, preds.class_names):
        raise UsageError(f"{val.path}: task/class_names differ from {preds.path}")
    thresholds, per_task, threshold_source = _thresholds(preds, val, config)
    inp = make_inputs(preds.task, preds.class_names, preds.logits, preds.probabilities(), preds.label,
                      preds.label_mask, preds.eval_tasks, thresholds, config.max_ovr_classes)
    result = evaluate_inputs(inp, preds.patient_id, preds.attrs, config)
    notes = []
    if preds.task == "multiclass" and not inp.tasks:
        notes.append(f"{len(preds.class_names)} classes > max_ovr_classes={config.max_ovr_classes}: "
                     "no per-class AUC/TPR/FPR/parity")
    if not preds.attrs:
        notes.append("no attr_* fields in the predictions: no subgroup analysis")
    extra = result.pop("meta_extra")
    result["meta"] = {
        "task": preds.task, "split": split_paths(preds.path)[0].stem, "step": preds.step, "params": preds.params,
        "epsilon": preds.epsilon, "delta": preds.delta, "guarantee_valid": preds.guarantee_valid,
        "privacy_unit": preds.privacy_unit, "predictions": preds.path, "predictions_sha256": digest(preds.path),
        "validation_predictions": None if val is None else val.path,
        "validation_sha256": None if val is None else digest(val.path), "n_examples": preds.n,
        "n_patients": int(np.unique(preds.patient_id).size),
        "thresholds": {"method": config.threshold_method if (val is not None or config.threshold_method == "fixed")
                       else "default", "source": threshold_source, "values": thresholds, "per_task": per_task},
        "bootstrap": {"n_resamples": config.n_resamples, "seed": config.seed, "ci_level": config.ci_level,
                      "unit": "patient"},
        "headline": headline_metrics(inp), "config": dataclasses.asdict(config),
        "rules": fair.rules(threshold_source, config.exclude_small_groups, config.min_group_size) + (
            [RACE_RULE] if "Conflicting" in set(np.asarray(preds.attrs.get("race", [])).tolist()) else []),
        "notes": notes + result.pop("notes"), **extra,
    }
    out = _out_dir(preds, config)
    out.mkdir(parents=True, exist_ok=True)
    eps_path = paths.as_path(config.individual_epsilon_path) if config.individual_epsilon_path else (
        paths.as_path(preds.path).parent.parent.parent / INDIVIDUAL_EPSILON_FILE)
    if eps_path.is_file():
        from dpft.privacy.individual import files as individual_files

        arrays = individual_files.read_individual_epsilons(eps_path)
        eps = arrays["epsilon"]
        eps_attrs = {k[len("attr_"):]: v for k, v in arrays.items() if k.startswith("attr_")}
        # The training loop's summary beside it: the run's epsilon and accountant (the same one
        # as the individual values), the Spearman correlation with per-example training loss.
        side = eps_path.with_suffix(".json")
        extra_eps = json.loads(side.read_text(encoding="utf-8")) if side.is_file() else {}
        result["individual_epsilon"] = individual_epsilon_summary(
            eps, eps_attrs, png_path=out / "individual_epsilon.png" if config.plots else None,
            min_group_size=extra_eps.get("min_group_size"))
        result["individual_epsilon"]["source"] = str(eps_path)
        if extra_eps:
            for key in ("worst_case_epsilon", "run_epsilon", "spearman_loss", "accountant", "clipping"):
                if key in extra_eps:
                    result["individual_epsilon"][key] = extra_eps[key]
    atomic_io.write_json(out / "metrics.json", result, indent=2, allow_nan=False)
    atomic_io.write_text(out / "report.md", render.render_markdown(result))
    tidy.write_tidy_csv(result, out / "groups.csv")
    if config.plots:
        plots.write_group_plots(result, out)
        plots.write_curve_plots(inp, {a: np.asarray(v).astype(str) for a, v in preds.attrs.items()},
                                result["meta"]["groups_compared"], out)
    return result


def _group_flags(info: Mapping[str, Any]) -> list[str]:
    flags = [f"small: {info['small_reason']}"] if info["small"] else []
    flags += [f"{t}: {why}" for t, why in info["missing_class"].items()]
    if info.get("excluded"):
        flags.append(info["excluded"])
    return flags


def evaluate_inputs(inp: EvalInputs, patient_id: np.ndarray, attrs: Mapping[str, np.ndarray],
                    config: EvalConfig) -> dict[str, Any]:
    """overall / groups / gaps / parity (nested, with CIs and reasons for undefined values) for
    prepared inputs, plus `notes` and `meta_extra`; no files written."""
    patient_id = np.asarray(patient_id).astype(str)
    # An empty attribute value is a missing one: the group "Unknown", which --exclude-group can name.
    attrs = {a: np.where(np.char.strip(np.asarray(v).astype(str)) == "", MISSING_GROUP, np.asarray(v).astype(str))
             for a, v in attrs.items()}
    try:
        attrs = fair.add_intersections(attrs, config.intersections)
        attrs, strata = fair.add_conditionals(attrs, config.control_features)
        exclusions = fair.parse_exclusions(config.exclude_groups, attrs)
    except ValueError as e:
        raise UsageError(f"evaluate: {e}") from None
    groups_meta: dict[str, dict[str, Any]] = {}
    included: dict[str, list[str]] = {}
    for attr, values in attrs.items():
        groups_meta[attr], included[attr] = {}, []
        for g, idx in group_index(values).items():
            info = fair.group_info(inp.subset(idx), patient_id[idx], config.min_group_size)
            outside = attr in strata and g == fair.OUTSIDE_STRATUM
            info["excluded"] = (f"rows outside the stratum {strata[attr]} (control feature)" if outside
                                else fair.excluded_by_user(attr, g, exclusions))
            if info["excluded"] is None and info["small"] and config.exclude_small_groups:
                info["excluded"] = f"small group left out ({info['small_reason']})"
            info["flags"] = _group_flags(info)
            groups_meta[attr][g] = info
            if info["excluded"] is None:
                included[attr].append(g)
    # Excluding a group this split does not have is a note, not an error (a test split may lack it).
    absent = [f"{attr}={g} (groups: {', '.join(sorted(str(x) for x in groups_meta[attr]))})"
              for attr, groups in exclusions.items() for g in sorted(groups) if g not in groups_meta[attr]]
    plan = fair.plan_groups(inp, attrs, included)
    point = fair.all_metrics(inp, plan, None)
    reps = bs.bootstrap(lambda w: fair.all_metrics(inp, plan, w), patient_id,
                        n_resamples=config.n_resamples, seed=config.seed)

    def st(key):
        undefined = np.isnan(np.asarray(point[key], np.float64).reshape(-1)[0])
        reason = fair.undefined_reason(key, inp, plan, point) if undefined else None
        return _stat(point[key], reps.get(key), config.ci_level, reason)

    result: dict[str, Any] = {"overall": {}, "groups": {}, "gaps": {}, "parity": {}, "notes": []}
    for key in point:
        kind = key[0]
        if kind == "overall":
            result["overall"][key[1]] = st(key)
        elif kind == "group":
            _, attr, g, m = key
            entry = result["groups"].setdefault(attr, {}).setdefault(g, dict(groups_meta[attr][g], metrics={}))
            entry["metrics"][m] = st(key)
        elif kind == "gap":
            _, attr, m, s = key
            if s == "n_defined":
                continue
            entry = result["gaps"].setdefault(attr, {}).setdefault(m, {"gap_to_best": {}})
            if s.startswith("gap_to_best/"):
                entry["gap_to_best"][s[len("gap_to_best/"):]] = st(key)
            else:
                entry[s] = st(key)
        elif kind == "parity":
            result["parity"].setdefault(key[1], {})[key[2]] = st(key)
    for attr, metrics in result["gaps"].items():
        for m, entry in metrics.items():
            vals = {g: result["groups"][attr][g]["metrics"][m]["value"] for g in entry["gap_to_best"]}
            vals = {g: v for g, v in vals.items() if v is not None}
            lo, hi = (min(vals, key=vals.get), max(vals, key=vals.get)) if len(vals) >= 2 else (None, None)
            worst, best = (lo, hi) if higher_is_better(m) else (hi, lo)
            entry["worst_group"], entry["best_group"] = worst, best
    flagged = [f"{a}={g}" for a, gm in groups_meta.items() for g, m in gm.items()
               if m["small"] and g != fair.OUTSIDE_STRATUM]
    if flagged:
        verb = "excluded from" if config.exclude_small_groups else "included in"
        result["notes"].append(f"small groups (< {config.min_group_size} patients; {verb} gaps and parity): "
                               + ", ".join(flagged))
    user = [f"{a}={g}" for a, gm in groups_meta.items() for g, m in gm.items()
            if m["excluded"] and m["excluded"].startswith("excluded by the user")]
    if user:
        result["notes"].append("excluded by the user from gaps and parity: " + ", ".join(user))
    if absent:
        result["notes"].append("group exclusions that match no group of this split (nothing excluded): "
                               + "; ".join(absent))
    result["meta_extra"] = {
        "groups_compared": {a: list(v) for a, v in plan.included.items()},
        "common_tasks": {a: {m: list(t) for m, t in v.items()} for a, v in plan.common_tasks.items()},
        "parity_tasks": {a: {m: list(t) for m, t in v.items()} for a, v in plan.parity_tasks.items()},
    }
    return result


# ----------------------------------------------------------------------------- individual epsilon

def individual_epsilon_summary(epsilon: np.ndarray, attrs: Mapping[str, np.ndarray], *,
                               png_path: str | os.PathLike | None = None,
                               min_group_size: int | None = None) -> dict[str, Any]:
    """Quantiles of per-example epsilon [N], overall and per group of each attribute (str [N]),
    by `dpft.privacy.individual.groups.summarise` (keys n, mean, q05..q95; groups smaller than
    `min_group_size` only {"n", "suppressed"}). Draws the histogram PNG (`plots.individual_epsilon_histogram`)
    if asked."""
    from dpft.privacy.individual import groups as individual_groups

    k = individual_groups.MIN_GROUP_SIZE if min_group_size is None else int(min_group_size)
    eps = np.asarray(epsilon, np.float64).reshape(-1)
    for attr, values in attrs.items():
        if np.asarray(values).shape != eps.shape:
            raise ValueError(f"attribute {attr!r} has shape {np.asarray(values).shape}, epsilon has {eps.shape}")
    summary = individual_groups.summarise(eps, attrs, min_group_size=k)
    out: dict[str, Any] = {"overall": summary["overall"], "groups": summary["by_attribute"], "min_group_size": k}
    if png_path is not None:
        out["png"] = plots.individual_epsilon_histogram(eps, attrs, png_path, min_group_size=k)
    return out
