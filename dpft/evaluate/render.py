"""Markdown of an evaluation result (the metrics.json dict of `dpft.evaluate.reports`)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from dpft.metrics import higher_is_better


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


def direction(metric: str) -> str:
    if metric.startswith("selection_rate"):
        return "no better direction"
    return "higher is better" if higher_is_better(metric) else "lower is better"


def privacy_text(meta: Mapping[str, Any]) -> str:
    """What a report says of the run's privacy: non-private, "epsilon=.., delta=.. per <unit>" (the unit:
    example or patient, where the predictions record it), or NO guarantee
    where the noise was public (insecure fixed seed, or updates before a resume without a secret)."""
    if meta.get("epsilon") is None:
        return "non-private"
    unit = meta.get("privacy_unit")
    eps = f"epsilon={meta['epsilon']:.2f}, delta={meta['delta']:g}" + (f" per {unit}" if unit else "")
    if meta.get("guarantee_valid") is False:
        return f"NO privacy guarantee (the run's noise was public; nominal {eps})"
    if meta.get("guarantee_valid") is None:  # predictions written before dpft recorded it
        return f"{eps} (whether the noise was secret is not recorded in these predictions)"
    return eps


def render_markdown(result: Mapping[str, Any]) -> str:
    """report.md: meta and rules, overall table, per attribute a group table, gaps, gap to best, parity."""
    meta = result["meta"]
    level = int(round(meta["bootstrap"]["ci_level"] * 100))
    eps = privacy_text(meta)
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
        rows = [[m, direction(m), fmt_stat(e["gap"]), str(e["worst_group"] or "-"), fmt_stat(e["worst"], reason=False),
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
