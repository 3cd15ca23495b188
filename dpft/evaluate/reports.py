"""Evaluate a predictions file: metrics.json, report.md and PNG plots in WORKDIR/eval/<step>/.

`evaluate_predictions(test_path, val_path=None, **cfg)` is the entry point (cfg: see EvalConfig).
metrics.json layout (every statistic is `{"value", "ci": [low, high], "n_valid"}`, NaN -> null):
  meta:     task, split, step, params, epsilon, delta, n_examples, n_patients, thresholds
            {method, source, values}, bootstrap {n_resamples, seed, ci_level, unit}, config, notes
  overall:  {metric: stat}
  groups:   {attr: {group: {n, n_patients, flags: [..], small: bool, metrics: {metric: stat}}}}
  gaps:     {attr: {metric: {gap, worst, best: stat, worst_group, best_group, gap_to_best: {group: stat}}}}
  parity:   {attr: {"demographic_parity_difference/T" | "equal_opportunity_difference/T": stat}}
  individual_epsilon (only if WORKDIR/individual_epsilon.npz exists): see individual_epsilon_summary.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from dpft.cli import UsageError
from dpft.evaluate import bootstrap as bs
from dpft.evaluate.fairness import THRESHOLD_METHODS, all_metrics, choose_thresholds, group_flags, group_index
from dpft.evaluate.metrics import NO_FINDING, EvalInputs, headline_metrics, make_inputs
from dpft.evaluate.predictions import Predictions, load_predictions, split_paths

INDIVIDUAL_EPSILON_FILE = "individual_epsilon.npz"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Options of `evaluate_predictions` (all keyword arguments)."""

    n_resamples: int = 200  # bootstrap replicates (patient-level)
    seed: int = 0  # bootstrap seed
    ci_level: float = 0.95
    min_group_size: int = 30  # groups with fewer examples are flagged
    threshold_method: str = "youden"  # "youden" or "fpr" (on validation predictions)
    target_fpr: float = 0.1  # for threshold_method="fpr"
    max_ovr_classes: int = 20  # multiclass: per-class AUC/TPR/FPR/parity only up to this many classes
    exclude_small_groups: bool = False  # leave flagged groups out of gaps and parity
    out_dir: str | None = None  # default WORKDIR/eval/<step>
    plots: bool = True
    individual_epsilon_path: str | None = None  # default WORKDIR/individual_epsilon.npz


def make_config(**cfg: Any) -> EvalConfig:
    """EvalConfig from keyword arguments; UsageError names an unknown or invalid field."""
    fields = {f.name for f in dataclasses.fields(EvalConfig)}
    unknown = sorted(set(cfg) - fields)
    if unknown:
        raise UsageError(f"evaluate: unknown option(s) {unknown}; known: {sorted(fields)}")
    c = EvalConfig(**cfg)
    checks = [("n_resamples", c.n_resamples >= 1), ("ci_level", 0 < c.ci_level < 1),
              ("min_group_size", c.min_group_size >= 1), ("threshold_method", c.threshold_method in THRESHOLD_METHODS),
              ("target_fpr", 0 < c.target_fpr < 1), ("max_ovr_classes", c.max_ovr_classes >= 0)]
    for name, ok in checks:
        if not ok:
            raise UsageError(f"evaluate: invalid {name}={getattr(c, name)!r}")
    return c


def _stat(point: np.ndarray, reps: np.ndarray | None, level: float) -> dict[str, Any]:
    value = float(np.asarray(point).reshape(-1)[0])
    lo, hi, n_valid = bs.confidence_interval(reps, level) if reps is not None else (math.nan, math.nan, 0)
    clean = lambda x: None if math.isnan(x) else x  # noqa: E731
    return {"value": clean(value), "ci": [clean(lo), clean(hi)], "n_valid": n_valid}


def _thresholds(preds: Predictions, val: Predictions | None, cfg: EvalConfig) -> tuple[dict[str, float], str]:
    if preds.task != "multilabel":
        return {}, "multiclass: argmax decision, no threshold"
    names = list(preds.eval_tasks or preds.class_names)
    if NO_FINDING in preds.class_names and NO_FINDING not in names:
        names.append(NO_FINDING)
    if val is None:
        return {n: 0.5 for n in names}, "no validation predictions given: threshold 0.5 for every task"
    thr = choose_thresholds(val.probabilities(), val.label, val.label_mask, val.class_names, names,
                            cfg.threshold_method, cfg.target_fpr)
    how = "Youden's J" if cfg.threshold_method == "youden" else f"FPR <= {cfg.target_fpr}"
    return thr, f"chosen on validation predictions {val.path} by {how}"


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
    thresholds, threshold_source = _thresholds(preds, val, config)
    inp = make_inputs(preds.task, preds.class_names, preds.logits, preds.probabilities(), preds.label,
                      preds.label_mask, preds.eval_tasks, thresholds, config.max_ovr_classes)
    result = evaluate_inputs(inp, preds.patient_id, preds.attrs, config)
    notes = [f"thresholds: {threshold_source}"]
    if preds.task == "multiclass" and not inp.tasks:
        notes.append(f"{len(preds.class_names)} classes > max_ovr_classes={config.max_ovr_classes}: "
                     "no per-class AUC/TPR/FPR/parity")
    if not preds.attrs:
        notes.append("no attr_* fields in the predictions: no subgroup analysis")
    result["meta"] = {
        "task": preds.task, "split": split_paths(preds.path)[0].stem, "step": preds.step, "params": preds.params,
        "epsilon": preds.epsilon, "delta": preds.delta, "predictions": preds.path, "n_examples": preds.n,
        "n_patients": int(np.unique(preds.patient_id).size),
        "thresholds": {"method": config.threshold_method if val is not None else "default",
                       "source": threshold_source, "values": thresholds},
        "bootstrap": {"n_resamples": config.n_resamples, "seed": config.seed, "ci_level": config.ci_level,
                      "unit": "patient"},
        "headline": headline_metrics(inp), "config": dataclasses.asdict(config),
        "notes": notes + result.pop("notes"),
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
        extra = json.loads(side.read_text(encoding="utf-8")) if side.is_file() else {}
        result["individual_epsilon"] = individual_epsilon_summary(
            eps, eps_attrs, png_path=out / "individual_epsilon.png" if config.plots else None,
            min_group_size=extra.get("min_group_size"))
        result["individual_epsilon"]["source"] = str(eps_path)
        if extra:
            for key in ("worst_case_epsilon", "run_epsilon", "spearman_loss", "accountant", "clipping"):
                if key in extra:
                    result["individual_epsilon"][key] = extra[key]
    (out / "metrics.json").write_text(json.dumps(result, indent=2, allow_nan=False), encoding="utf-8")
    (out / "report.md").write_text(render_markdown(result), encoding="utf-8")
    if config.plots:
        write_group_plots(result, out)
    return result


def evaluate_inputs(inp: EvalInputs, patient_id: np.ndarray, attrs: Mapping[str, np.ndarray],
                    config: EvalConfig) -> dict[str, Any]:
    """overall / groups / gaps / parity (nested, with CIs) for prepared inputs; no files written."""
    patient_id = np.asarray(patient_id).astype(str)
    groups_meta: dict[str, dict[str, Any]] = {}
    for attr, values in attrs.items():
        groups_meta[attr] = {}
        for g, idx in group_index(values).items():
            flags = group_flags(inp.subset(idx), patient_id[idx], config.min_group_size)
            groups_meta[attr][g] = {"n": int(idx.size), "n_patients": int(np.unique(patient_id[idx]).size),
                                    "flags": flags, "small": bool(flags)}
    gap_groups = None
    if config.exclude_small_groups:
        gap_groups = {a: [g for g, m in gm.items() if not m["small"]] for a, gm in groups_meta.items()}
    point = all_metrics(inp, attrs, None, gap_groups)
    reps = bs.bootstrap(lambda w: all_metrics(inp, attrs, w, gap_groups), patient_id,
                        n_resamples=config.n_resamples, seed=config.seed)
    st = lambda key: _stat(point[key], reps.get(key), config.ci_level)  # noqa: E731
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
            lo, hi = (min(vals, key=vals.get), max(vals, key=vals.get)) if vals else (None, None)
            worst, best = (lo, hi) if m.split("/")[0] not in ("fpr", "underdiagnosis") else (hi, lo)
            entry["worst_group"], entry["best_group"] = worst, best
    if result["gaps"]:
        result["notes"].append("gap CIs are percentile intervals of max - min over groups; max - min is biased "
                               "upwards when groups are alike, so such an interval can lie above the estimate")
    small = [f"{a}={g}" for a, gm in groups_meta.items() for g, m in gm.items() if m["small"]]
    if small:
        verb = "excluded from" if config.exclude_small_groups else "included in"
        result["notes"].append(f"flagged groups ({verb} gaps and parity): {', '.join(small)}")
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

def fmt_stat(stat: Mapping[str, Any] | None, digits: int = 3) -> str:
    """'0.812 [0.790, 0.833]'; 'n/a' where undefined."""
    if not stat or stat.get("value") is None:
        return "n/a"
    lo, hi = stat["ci"]
    ci = "" if lo is None else f" [{lo:.{digits}f}, {hi:.{digits}f}]"
    return f"{stat['value']:.{digits}f}{ci}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows] + [""]


def render_markdown(result: Mapping[str, Any]) -> str:
    """report.md: meta, overall table, per attribute a group table, a gap table and parity."""
    meta = result["meta"]
    level = int(round(meta["bootstrap"]["ci_level"] * 100))
    eps = "non-private" if meta.get("epsilon") is None else f"epsilon={meta['epsilon']:g}, delta={meta['delta']:g}"
    lines = [f"# Evaluation: {meta['split']} at step {meta['step']} ({meta['params']} params)", "",
             f"- task: {meta['task']}; {eps}",
             f"- {meta['n_examples']} examples from {meta['n_patients']} patients",
             f"- {level}% CIs: percentile bootstrap, {meta['bootstrap']['n_resamples']} resamples of patients "
             f"(seed {meta['bootstrap']['seed']})",
             f"- thresholds: {meta['thresholds']['source']}"]
    values = meta["thresholds"]["values"]
    if values:
        lines.append("  (" + ", ".join(f"{k}: {v:.3f}" for k, v in values.items()) + ")")
    lines += [f"- note: {n}" for n in meta["notes"][1:]] + [""]
    many = meta["task"] == "multiclass" and len(result["overall"]) > 60
    rows = [(m, fmt_stat(s)) for m, s in result["overall"].items() if not (many and m.startswith("class_accuracy/"))]
    lines += ["## Overall", ""] + _table(["metric", f"value [{level}% CI]"], rows)
    head = [m for m in meta["headline"]]
    for attr, groups in result["groups"].items():
        lines += [f"## Subgroups: {attr}", ""]
        rows = [[g, str(e["n"]), str(e["n_patients"])] + [fmt_stat(e["metrics"].get(m)) for m in head]
                + ["; ".join(e["flags"]) or "-"] for g, e in groups.items()]
        lines += _table(["group", "n", "patients"] + head + ["flags"], rows)
        gaps = result["gaps"].get(attr, {})
        rows = [[m, fmt_stat(e["gap"]), str(e["worst_group"]), fmt_stat(e["worst"]), str(e["best_group"])]
                for m, e in gaps.items()]
        lines += [f"### Gaps over {attr} (max - min)", ""]
        lines += _table(["metric", f"gap [{level}% CI]", "worst group", "worst value", "best group"], rows)
        if gaps:
            groups_order = list(groups)
            rows = [[m] + [fmt_stat(e["gap_to_best"].get(g)) for g in groups_order] for m, e in gaps.items()
                    if m in head]
            lines += [f"### Gap to the best group ({attr})", ""] + _table(["metric"] + groups_order, rows)
        parity = result["parity"].get(attr, {})
        if parity:
            lines += [f"### Parity over {attr} (fairlearn, between groups)", ""]
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


def plot_group_metric(result: Mapping[str, Any], attr: str, metric: str, ax: Any) -> None:
    """Draw one metric per group of `attr` with CI error bars on a matplotlib Axes; flagged groups hollow."""
    groups = result["groups"][attr]
    names = list(groups)
    for i, g in enumerate(names):
        s = groups[g]["metrics"].get(metric, {})
        v = s.get("value")
        if v is None:
            continue
        lo, hi = s["ci"]
        err = None if lo is None else [[v - lo], [hi - v]]
        ax.errorbar([i], [v], yerr=err, fmt="o", capsize=4, color="tab:blue",
                    mfc="white" if groups[g]["small"] else "tab:blue")
    ax.set_xticks(range(len(names)), [f"{g}\n(n={groups[g]['n']})" for g in names], fontsize=7)
    gap = result["gaps"].get(attr, {}).get(metric, {}).get("gap")
    ax.set_title(f"{metric} by {attr}" + (f"\ngap {fmt_stat(gap)}" if gap else ""), fontsize=8)


def write_group_plots(result: Mapping[str, Any], out_dir: str | os.PathLike) -> list[str]:
    """One PNG per attribute, `groups_<attr>.png`, a panel per plotted metric. Returns the paths."""
    plt = _pyplot()
    paths = []
    metrics = plot_metrics(result)
    for attr in result["groups"]:
        fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(4 * max(1, len(metrics)), 3.4), squeeze=False)
        for ax, m in zip(axes[0], metrics):
            plot_group_metric(result, attr, m, ax)
        fig.tight_layout()
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in attr)
        path = os.path.join(out_dir, f"groups_{safe}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
