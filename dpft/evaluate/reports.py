"""Evaluate a predictions file: metrics.json, report.md and PNG plots in WORKDIR/eval/<step>/.

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
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from dpft.errors import UsageError
from dpft.evaluate import bootstrap as bs
from dpft.evaluate import fairness as fair
from dpft.evaluate.fairness import THRESHOLD_METHODS, group_index
from dpft.evaluate.metrics import NO_FINDING, EvalInputs, headline_metrics, higher_is_better, make_inputs
from dpft.evaluate.predictions import Predictions, load_predictions, split_paths

INDIVIDUAL_EPSILON_FILE = "individual_epsilon.npz"
DEFAULT_RESAMPLES = 1000


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Options of `evaluate_predictions` (all keyword arguments)."""

    n_resamples: int = DEFAULT_RESAMPLES  # bootstrap replicates (patient-level)
    seed: int = 0  # bootstrap seed
    ci_level: float = 0.95
    min_group_size: int = 30  # groups with fewer patients are flagged "small"
    threshold_method: str = "youden"  # "youden" | "fpr" | "f1" | "fixed" (on validation predictions)
    target_fpr: float = 0.1  # for threshold_method="fpr"
    fixed_threshold: float = 0.5  # for "fixed", and the fallback where a method does not apply
    max_ovr_classes: int = 20  # multiclass: per-class AUC/TPR/FPR/parity only up to this many classes
    exclude_small_groups: bool = False  # leave "small" groups out of gaps and parity
    intersections: tuple[str, ...] = ()  # e.g. ("sex*race",): intersectional attributes
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
    for name in ("intersections", "exclude_groups"):
        if name in cfg:
            value = cfg[name]
            cfg[name] = (value,) if isinstance(value, str) else tuple(value or ())
    c = EvalConfig(**cfg)
    checks = [("n_resamples", c.n_resamples >= 1), ("ci_level", 0 < c.ci_level < 1),
              ("min_group_size", c.min_group_size >= 1), ("threshold_method", c.threshold_method in THRESHOLD_METHODS),
              ("target_fpr", 0 < c.target_fpr < 1), ("max_ovr_classes", c.max_ovr_classes >= 0),
              ("fixed_threshold", 0 <= c.fixed_threshold <= 1)]
    for name, ok in checks:
        if not ok:
            raise UsageError(f"evaluate: invalid {name}={getattr(c, name)!r}")
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


def _out_dir(preds: Predictions, cfg: EvalConfig) -> Path:
    if cfg.out_dir is not None:
        return Path(cfg.out_dir)
    npz = Path(preds.path)
    if npz.parent.parent.name != "predictions":
        raise UsageError(f"{npz}: not under WORKDIR/predictions/<step>/; pass out_dir")
    return npz.parent.parent.parent / "eval" / str(preds.step)


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
        "epsilon": preds.epsilon, "delta": preds.delta, "predictions": preds.path, "n_examples": preds.n,
        "n_patients": int(np.unique(preds.patient_id).size),
        "thresholds": {"method": config.threshold_method if (val is not None or config.threshold_method == "fixed")
                       else "default", "source": threshold_source, "values": thresholds, "per_task": per_task},
        "bootstrap": {"n_resamples": config.n_resamples, "seed": config.seed, "ci_level": config.ci_level,
                      "unit": "patient"},
        "headline": headline_metrics(inp), "config": dataclasses.asdict(config),
        "rules": fair.rules(threshold_source, config.exclude_small_groups, config.min_group_size),
        "notes": notes + result.pop("notes"), **extra,
    }
    out = _out_dir(preds, config)
    out.mkdir(parents=True, exist_ok=True)
    eps_path = Path(config.individual_epsilon_path) if config.individual_epsilon_path else (
        Path(preds.path).parent.parent.parent / INDIVIDUAL_EPSILON_FILE)
    if eps_path.is_file():
        eps, eps_attrs = load_individual_epsilon(eps_path)
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
    (out / "metrics.json").write_text(json.dumps(result, indent=2, allow_nan=False), encoding="utf-8")
    (out / "report.md").write_text(render_markdown(result), encoding="utf-8")
    if config.plots:
        write_group_plots(result, out)
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
    try:
        attrs = fair.add_intersections(attrs, config.intersections)
        exclusions = fair.parse_exclusions(config.exclude_groups, attrs)
    except ValueError as e:
        raise UsageError(f"evaluate: {e}") from None
    groups_meta: dict[str, dict[str, Any]] = {}
    included: dict[str, list[str]] = {}
    for attr, values in attrs.items():
        groups_meta[attr], included[attr] = {}, []
        for g, idx in group_index(values).items():
            info = fair.group_info(inp.subset(idx), patient_id[idx], config.min_group_size)
            info["excluded"] = fair.excluded_by_user(attr, g, exclusions)
            if info["excluded"] is None and info["small"] and config.exclude_small_groups:
                info["excluded"] = f"small group left out ({info['small_reason']})"
            info["flags"] = _group_flags(info)
            groups_meta[attr][g] = info
            if info["excluded"] is None:
                included[attr].append(g)
        for g in exclusions.get(attr, ()):
            if g not in groups_meta[attr]:
                raise UsageError(f"evaluate: group exclusion {attr}={g}: no such group; have {sorted(groups_meta[attr])}")
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
    flagged = [f"{a}={g}" for a, gm in groups_meta.items() for g, m in gm.items() if m["small"]]
    if flagged:
        verb = "excluded from" if config.exclude_small_groups else "included in"
        result["notes"].append(f"small groups (< {config.min_group_size} patients; {verb} gaps and parity): "
                               + ", ".join(flagged))
    user = [f"{a}={g}" for a, gm in groups_meta.items() for g, m in gm.items()
            if m["excluded"] and m["excluded"].startswith("excluded by the user")]
    if user:
        result["notes"].append("excluded by the user from gaps and parity: " + ", ".join(user))
    result["meta_extra"] = {
        "groups_compared": {a: list(v) for a, v in plan.included.items()},
        "common_tasks": {a: {m: list(t) for m, t in v.items()} for a, v in plan.common_tasks.items()},
        "parity_tasks": {a: {m: list(t) for m, t in v.items()} for a, v in plan.parity_tasks.items()},
    }
    return result


# ----------------------------------------------------------------------------- individual epsilon hook

def load_individual_epsilon(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(epsilon float [N], attrs {name: str [N]}) from individual_epsilon.npz (epsilon, attr_<name>)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: cannot read ({e})") from None
    if "epsilon" not in arrays:
        raise UsageError(f"{path}: field 'epsilon': missing (keys present: {sorted(arrays)})")
    eps = np.asarray(arrays["epsilon"], np.float64).reshape(-1)
    attrs = {k[5:]: arrays[k].astype(str) for k in sorted(arrays) if k.startswith("attr_")}
    for k, v in attrs.items():
        if v.shape != eps.shape:
            raise UsageError(f"{path}: field 'attr_{k}': shape {v.shape}, expected {eps.shape}")
    return eps, attrs


def individual_epsilon_summary(epsilon: np.ndarray, attrs: Mapping[str, np.ndarray], *,
                               png_path: str | os.PathLike | None = None,
                               min_group_size: int | None = None) -> dict[str, Any]:
    """Quantiles of per-example epsilon [N], overall and per group of each attribute (str [N]),
    by `dpft.privacy.individual.summarise` (keys n, mean, q05..q95; groups smaller than
    `min_group_size` only {"n", "suppressed"}). Writes a histogram PNG (groups of at least
    `min_group_size` examples only) if asked."""
    from dpft.privacy import individual

    k = individual.MIN_GROUP_SIZE if min_group_size is None else int(min_group_size)
    eps = np.asarray(epsilon, np.float64).reshape(-1)
    for attr, values in attrs.items():
        if np.asarray(values).shape != eps.shape:
            raise ValueError(f"attribute {attr!r} has shape {np.asarray(values).shape}, epsilon has {eps.shape}")
    summary = individual.summarise(eps, attrs, min_group_size=k)
    out: dict[str, Any] = {"overall": summary["overall"], "groups": summary["by_attribute"], "min_group_size": k}
    if png_path is not None:
        plt = _pyplot()
        panels = list(attrs) or [None]
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.2), squeeze=False)
        bins = np.histogram_bin_edges(eps, bins=30) if eps.size else 10
        for ax, attr in zip(axes[0], panels):
            if attr is None:
                ax.hist(eps, bins=bins, color="tab:blue")
            else:
                values = np.asarray(attrs[attr]).astype(str)
                for g, idx in group_index(values).items():
                    if idx.size >= k:  # no histogram of a group too small to summarise
                        ax.hist(eps[idx], bins=bins, histtype="step", density=True, label=f"{g} (n={idx.size})")
                ax.legend(fontsize=7)
                ax.set_title(attr)
            ax.set_xlabel("individual epsilon")
        fig.tight_layout()
        fig.savefig(png_path, dpi=100)
        plt.close(fig)
        out["png"] = str(png_path)
    return out


# ----------------------------------------------------------------------------- Markdown and plots

def fmt_stat(stat: Mapping[str, Any] | None, digits: int = 3, reason: bool = True) -> str:
    """'0.812 [0.790, 0.833]'; 'n/a (reason)' where undefined ('n/a' without reason=True or a reason)."""
    if not stat or stat.get("value") is None:
        why = (stat or {}).get("undefined") if reason else None
        return f"n/a ({why})" if why else "n/a"
    lo, hi = stat["ci"]
    ci = "" if lo is None else f" [{lo:.{digits}f}, {hi:.{digits}f}]"
    return f"{stat['value']:.{digits}f}{ci}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows] + [""]


def _direction(metric: str) -> str:
    if metric.startswith("selection_rate"):
        return "no better direction"
    return "higher is better" if higher_is_better(metric) else "lower is better"


def render_markdown(result: Mapping[str, Any]) -> str:
    """report.md: meta and rules, overall table, per attribute a group table, gaps, gap to best, parity."""
    meta = result["meta"]
    level = int(round(meta["bootstrap"]["ci_level"] * 100))
    eps = "non-private" if meta.get("epsilon") is None else f"epsilon={meta['epsilon']:.2f}, delta={meta['delta']:g}"
    lines = [f"# Evaluation: {meta['split']} at step {meta['step']} ({meta['params']} params)", "",
             f"- task: {meta['task']}; {eps}",
             f"- {meta['n_examples']} examples (images) from {meta['n_patients']} patients",
             f"- {level}% CIs: percentile bootstrap, {meta['bootstrap']['n_resamples']} resamples of patients "
             f"(seed {meta['bootstrap']['seed']})",
             f"- thresholds: {meta['thresholds']['source']}"]
    per_task = meta["thresholds"].get("per_task") or {}
    for t, info in per_task.items():
        how = f"fallback: {info['fallback']}" if info.get("fallback") else info["method"]
        lines.append(f"  - {t}: {info['value']:.3f} ({how})")
    lines += [f"- note: {n}" for n in meta["notes"]]
    lines += ["", "Rules that change numbers:", ""] + [f"- {r}" for r in meta.get("rules", [])[1:]] + [""]
    many = meta["task"] == "multiclass" and len(result["overall"]) > 60
    rows = [(m, fmt_stat(s)) for m, s in result["overall"].items() if not (many and m.startswith("class_accuracy/"))]
    lines += ["## Overall", ""] + _table(["metric", f"value [{level}% CI]"], rows)
    head = list(meta["headline"])
    for attr, groups in result["groups"].items():
        compared = meta.get("groups_compared", {}).get(attr, list(groups))
        common = meta.get("common_tasks", {}).get(attr, {})
        lines += [f"## Subgroups: {attr}", "",
                  f"Groups compared in gaps and parity: {', '.join(compared) or 'none'}."]
        for mean, tasks in common.items():
            lines.append(f"Group {mean} averages the tasks defined in every compared group: "
                         f"{', '.join(tasks) or 'none (undefined)'}.")
        lines.append("")
        rows = [[g, str(e["n"]), str(e["n_patients"])] + [fmt_stat(e["metrics"].get(m)) for m in head]
                + ["; ".join(e["flags"]) or "-"] for g, e in groups.items()]
        lines += _table(["group", "images", "patients"] + head + ["flags"], rows)
        gaps = result["gaps"].get(attr, {})
        rows = [[m, _direction(m), fmt_stat(e["gap"]), str(e["worst_group"] or "-"), fmt_stat(e["worst"], reason=False),
                 str(e["best_group"] or "-")] for m, e in gaps.items()]
        lines += [f"### Gaps over {attr} (max - min over compared groups)", ""]
        lines += _table(["metric", "direction", f"gap [{level}% CI]", "worst group",
                         f"worst value [{level}% CI of the min over groups]", "best group"], rows)
        if gaps:
            rows = [[m] + [fmt_stat(e["gap_to_best"].get(g), reason=False) for g in compared]
                    for m, e in gaps.items() if m in head]
            lines += [f"### Gap to the best group ({attr}; lower is better)", ""] + _table(["metric"] + compared, rows)
        parity = result["parity"].get(attr, {})
        if parity:
            lines += [f"### Parity over {attr} (fairlearn's definitions, between groups; differences: lower is "
                      "better, ratios: higher is better)", ""]
            lines += _table(["metric", f"value [{level}% CI]"], [(m, fmt_stat(s)) for m, s in parity.items()])
    ind = result.get("individual_epsilon")
    if ind:
        lines += ["## Individual privacy (per-example epsilon estimates; not a formal guarantee)", ""]
        qkeys = ["q05", "q25", "q50", "q75", "q95"]
        small = ind.get("min_group_size")

        def cells(s: Mapping[str, Any]) -> list[str]:
            if s.get("suppressed"):
                return [f"suppressed (n < {small})"] + [""] * (len(qkeys) - 1)
            return [f"{s[k]:.3g}" for k in qkeys]
        rows = [["all", "all", str(ind["overall"]["n"])] + cells(ind["overall"])]
        for attr, groups in ind["groups"].items():
            rows += [[attr, g, str(s["n"])] + cells(s) for g, s in groups.items()]
        lines += _table(["attribute", "group", "n"] + qkeys, rows)
        notes = [f"no min/max and no statistics for groups of fewer than {small} examples (they would "
                 "reveal individuals); the per-example file stays owner-only in the workdir"]
        run_eps = ind.get("run_epsilon") or {}
        if run_eps.get("value") is not None:
            notes.append(f"the run's epsilon ({run_eps.get('accountant')}, the same accountant as the individual "
                         f"values, which never exceed it): {run_eps['value']:.4g}")
        sp = ind.get("spearman_loss") or {}
        if sp.get("rho") is not None:
            notes.append(f"Spearman correlation of individual epsilon with training loss: rho = {sp['rho']:.3f} "
                         f"(p = {sp.get('pvalue', float('nan')):.2g})")
        if notes:
            lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib
    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_metrics(result: Mapping[str, Any]) -> list[str]:
    """The metrics drawn per group: multilabel auc_mean, accuracy_mean(, underdiagnosis); multiclass top1(, auc_macro)."""
    head = result["meta"]["headline"]
    wanted = ("auc_mean", "accuracy_mean", "underdiagnosis", "top1", "auc_macro")
    return [m for m in wanted if m in head]


def draw_interval(ax: Any, x: float, stat: Mapping[str, Any] | None, *, color: str = "tab:blue",
                  hollow: bool = False, horizontal: bool = False, label: str | None = None) -> bool:
    """A point and its CI drawn as a segment from low to high (valid even when the percentile CI
    excludes the point). Returns False (draws nothing) where the value is undefined."""
    if not stat or stat.get("value") is None:
        return False
    v = stat["value"]
    lo, hi = (stat.get("ci") or [None, None])
    if lo is not None and hi is not None:  # end caps as markers: their size does not depend on the axis scale
        xs, ys = ([lo, hi], [x, x]) if horizontal else ([x, x], [lo, hi])
        ax.plot(xs, ys, color=color, lw=1.5, marker="|" if horizontal else "_", ms=9)
    xy = ([v], [x]) if horizontal else ([x], [v])
    ax.plot(*xy, "o", color=color, mfc="white" if hollow else color, label=label)
    return True


def plot_group_metric(result: Mapping[str, Any], attr: str, metric: str, ax: Any) -> None:
    """One metric per group of `attr` with its CI on a matplotlib Axes. Hollow markers: groups that
    are small or left out of the gaps; undefined values are written as 'n/a' at the axis bottom."""
    groups = result["groups"][attr]
    names = list(groups)
    level = int(round(result["meta"]["bootstrap"]["ci_level"] * 100))
    for i, g in enumerate(names):
        s = groups[g]["metrics"].get(metric, {})
        hollow = bool(groups[g]["small"] or groups[g].get("excluded"))
        if not draw_interval(ax, i, s, hollow=hollow):
            ax.annotate("n/a", (i, 0.02), xycoords=("data", "axes fraction"), ha="center", fontsize=7, color="tab:red")
    ax.set_xticks(range(len(names)), [f"{g}\n{groups[g]['n_patients']} pat. / {groups[g]['n']} img."
                                      for g in names], fontsize=6)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_xlabel(attr, fontsize=8)
    ax.set_ylabel(f"{metric} ({_direction(metric)})", fontsize=8)
    gap = result["gaps"].get(attr, {}).get(metric, {}).get("gap")
    ax.set_title(f"{metric} by {attr}" + (f"\ngap (max - min) {fmt_stat(gap)}" if gap else ""), fontsize=8)
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], marker="o", color="tab:blue", lw=1.5, label=f"value, {level}% CI (patient bootstrap)"),
               Line2D([], [], marker="o", color="tab:blue", mfc="white", lw=0, label="small / not compared")]
    ax.legend(handles=handles, fontsize=6, loc="best")


def write_group_plots(result: Mapping[str, Any], out_dir: str | os.PathLike) -> list[str]:
    """One PNG per attribute, `groups_<attr>.png`, a panel per plotted metric. Returns the paths."""
    plt = _pyplot()
    paths = []
    metrics = plot_metrics(result)
    for attr in result["groups"]:
        width = max(4.0, 0.9 * len(result["groups"][attr]))
        fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(width * max(1, len(metrics)), 3.8), squeeze=False)
        for ax, m in zip(axes[0], metrics):
            plot_group_metric(result, attr, m, ax)
        fig.tight_layout()
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in attr)
        path = os.path.join(out_dir, f"groups_{safe}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
