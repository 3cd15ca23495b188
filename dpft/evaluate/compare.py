"""Sweep comparison over any config axis, seeds aggregated: utility, gap and every parity metric.

Each run dir holds `config.json` and `eval/<step>/metrics.json` (written by reports.py). The swept
fields are read from each run's config.json (nested `{"privacy": {"epsilon": 8}}` or dotted
top-level keys `"privacy.epsilon"`). `privacy.epsilon` is special: a run is non-private (value
None, shown as "non-private") if `privacy.enabled` is false or epsilon is null / "inf".

Runs with the same (series, x) values form a cell; their other config fields may differ only in
seeds (fields whose last name contains "seed"), else the comparison refuses (pass the differing
field as --series). Per cell and quantity: the mean over seeds of the runs' point estimates and a
t confidence interval over seeds (level `ci_level`; undefined with one seed); runs whose value
is undefined are counted, never averaged as 0.

Quantities per run: the headline utility (auc_mean / top1) and, per subgroup attribute, its gap
(max - min over compared groups) and every parity metric averaged over tasks
(`<parity metric>/mean` of metrics.json).

A run whose metrics say `guarantee_valid: false` (public noise: its epsilon is nominal) is marked
"(NO GUARANTEE: public noise)" (`contract.mark_epsilon`) wherever it shows: its row of the runs
table, and the x label of every cell and paired difference it is in (tables and plot ticks);
compare.json lists such runs per cell as "no_guarantee_runs".

`compare_runs(run_dirs, out_dir, x=..., series=...)` writes compare.json, compare.md and compare.png.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from dpft import atomic_io
from dpft.config.base import flatten
from dpft.errors import UsageError
from dpft.evaluate.fairness import PARITY_METRICS
from dpft.evaluate import selected
from dpft.evaluate.plots import draw_interval, pyplot, save_figure
from dpft.workdir import contract
from dpft.workdir.predictions import check_digest
from dpft.evaluate.render import fmt_stat

EPSILON = "privacy.epsilon"
PLOTTED_PARITY = PARITY_METRICS  # every parity metric gets a panel (differences, then ratios)
_MISSING = object()


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise UsageError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not valid JSON ({e})") from None


def config_field(config: dict[str, Any], field: str, path: Path) -> Any:
    """A dotted field of a config.json (nested or dotted keys); _MISSING if absent."""
    if not isinstance(config, dict):
        raise UsageError(f"{path}: expected a JSON object")
    return flatten(config).get(field, _MISSING)


def read_epsilon(run_dir: str | os.PathLike) -> float | None:
    """epsilon of a run from its config.json; None for a non-private run."""
    path = Path(run_dir) / "config.json"
    config = _read_json(path)
    enabled = config_field(config, "privacy.enabled", path)
    eps = config_field(config, EPSILON, path)
    if enabled is not _MISSING and not isinstance(enabled, bool):
        raise UsageError(f"{path}: field 'privacy.enabled': expected true/false, got {enabled!r}")
    if enabled is False or eps is None or eps is _MISSING:
        return None
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise UsageError(f"{path}: field 'privacy.epsilon': expected a number, got {eps!r}") from None
    if math.isnan(value) or value <= 0:
        raise UsageError(f"{path}: field 'privacy.epsilon': must be > 0, got {eps!r}")
    return None if math.isinf(value) else value


def axis_value(run_dir: Path, config: dict[str, Any], field: str | None) -> Any:
    """The value of a swept field for one run (privacy.epsilon: None = non-private)."""
    if field is None:
        return None
    if field == EPSILON:
        return read_epsilon(run_dir)
    value = config_field(config, field, run_dir / "config.json")
    if value is _MISSING:
        raise UsageError(f"{run_dir / 'config.json'}: no field {field!r} to compare over")
    return value


def find_metrics(run_dir: str | os.PathLike, step: int | None = None) -> Path:
    """Path of eval/<step>/metrics.json (the largest integer step if step is None)."""
    eval_dir = Path(run_dir) / "eval"
    if step is not None:
        path = eval_dir / str(step) / "metrics.json"
        if not path.is_file():
            raise UsageError(f"{path}: file not found")
        return path
    steps = sorted(int(p.name) for p in eval_dir.glob("*") if p.name.isdigit() and (p / "metrics.json").is_file())
    if not steps:
        raise UsageError(f"{eval_dir}: no <step>/metrics.json found (run `dpft evaluate` on this run first)")
    return eval_dir / str(steps[-1]) / "metrics.json"


def _is_seed(field: str) -> bool:
    return "seed" in field.split(".")[-1]


def _row(run_dir: Path, step: int | None, x: str, series: str | None) -> dict[str, Any]:
    path = find_metrics(run_dir, step)
    m = _read_json(path)
    meta = m.get("meta", {}) if isinstance(m, dict) else {}
    for file, sha in ((meta.get("predictions"), meta.get("predictions_sha256")),
                      (meta.get("validation_predictions"), meta.get("validation_sha256"))):
        if file and sha:  # the predictions these metrics were computed from, unchanged
            check_digest(file, sha, str(path))
    config = _read_json(run_dir / "config.json")
    flat = flatten(config)
    try:
        utility = m["meta"]["headline"][0]
        row = {"run": run_dir.name, "run_dir": str(run_dir), "metrics_path": str(path),
               "x": axis_value(run_dir, config, x), "series": axis_value(run_dir, config, series),
               "seeds": {k: v for k, v in flat.items() if _is_seed(k)},
               "epsilon": read_epsilon(run_dir), "epsilon_spent": m["meta"].get("epsilon"),
               "guarantee_valid": m["meta"].get("guarantee_valid"), "privacy_unit": m["meta"].get("privacy_unit"),
               "step": m["meta"]["step"], "task": m["meta"]["task"],
               "utility_metric": utility, "utility": m["overall"][utility], "gaps": {}, "parity": {}}
        for attr, metrics in m["gaps"].items():
            g = metrics.get(utility)
            if g is not None:
                row["gaps"][attr] = {"gap": g["gap"], "worst_group": g["worst_group"], "worst": g["worst"]}
        for attr, par in m.get("parity", {}).items():
            row["parity"][attr] = {p: par[f"{p}/mean"] for p in PARITY_METRICS if f"{p}/mean" in par}
    except (KeyError, IndexError, TypeError) as e:
        raise UsageError(f"{path}: missing field {e} (not written by dpft.evaluate.reports?)") from None
    row["train_groups"] = train_groups(run_dir, flat)
    row["_config"] = flat
    return row


def train_groups(run_dir: Path, flat_config: dict[str, Any]) -> dict[str, dict[str, int]]:
    """{attribute: {group: examples}} of the run's training split (its attribute_coverage.json; {} where
    the run has none or predates the per-split counts): the realised subgroup sizes of a study."""
    path = run_dir / "attribute_coverage.json"
    if not path.is_file():
        return {}
    split = str(flat_config.get("data.train_split", "train"))
    attrs = _read_json(path).get("attributes", {})
    return {a: dict(e["splits"][split]["groups"]) for a, e in attrs.items()
            if isinstance(e, dict) and "groups" in e.get("splits", {}).get(split, {})}


def seed_summary(values: Sequence[float | None], level: float = 0.95,
                 bounds: tuple[float, float] | None = (0.0, 1.0)) -> dict[str, Any]:
    """Mean over seeds and its t interval: values (None = undefined in that run) ->
    {"value", "ci", "n", "n_undefined", "values"} (+ "undefined": reason where there is no mean).
    The interval is clipped to `bounds` (every compared metric is a rate, AUC, difference or ratio in [0, 1])."""
    from scipy import stats

    defined = np.array([v for v in values if v is not None], np.float64)
    out: dict[str, Any] = {"value": None, "ci": [None, None], "n": int(defined.size),
                           "n_undefined": len(values) - int(defined.size), "values": list(values)}
    if defined.size == 0:
        out["undefined"] = f"undefined in all {len(values)} run(s)"
        return out
    mean = float(defined.mean())
    out["value"] = mean
    if defined.size >= 2:
        half = float(stats.t.ppf((1 + level) / 2, defined.size - 1) * defined.std(ddof=1) / math.sqrt(defined.size))
        lo, hi = mean - half, mean + half
        if bounds is not None:
            lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
        out["ci"] = [lo, hi]
    return out


def cell_summary(stats: Sequence[Mapping[str, Any] | None], level: float = 0.95) -> dict[str, Any]:
    """`seed_summary` of the runs' statistics ({"value", "ci"} dicts; None = undefined); "ci_kind" says
    which interval: "t over seeds" (>= 2 defined values), or, where one run gives the only value, that
    run's own bootstrap interval over patients ("bootstrap of one run", at its `dpft evaluate --ci-level`),
    so a single-run cell still shows its uncertainty."""
    out = seed_summary([(s or {}).get("value") for s in stats], level)
    out["ci_kind"] = "t over seeds" if out["n"] >= 2 else None
    if out["n"] == 1:
        (one,) = [s for s in stats if s and s.get("value") is not None]
        ci = one.get("ci") or [None, None]
        if None not in ci:
            out["ci"], out["ci_kind"] = [float(ci[0]), float(ci[1])], "bootstrap of one run"
    return out


def fmt_cell(stat: Mapping[str, Any] | None) -> str:
    """A compare.md cell: `fmt_stat`, a trailing * where the interval is one run's bootstrap, and
    "(n k/m)" where only k of the cell's m runs define the value."""
    text = fmt_stat(stat) + ("*" if (stat or {}).get("ci_kind") == "bootstrap of one run" else "")
    missing = (stat or {}).get("n_undefined", 0)
    return f"{text} (n {stat['n']}/{stat['n'] + missing})" if missing and stat.get("n") else text


def _sort_key(v: Any) -> tuple:
    if v is None:
        return (2, 0.0, "")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (0, float(v), "")
    return (1, 0.0, str(v))


def fmt_value(field: str | None, v: Any) -> str:
    """How a swept value is printed: epsilon with two decimals, None epsilon 'non-private'."""
    if field == EPSILON:
        return "non-private" if v is None else f"{v:.2f}"
    if isinstance(v, float):
        return f"{v:g}"
    return "-" if v is None else str(v)


def no_guarantee_runs(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Names of the `runs` (rows of `_row`) whose metrics say guarantee_valid false (public noise)."""
    return [r["run"] for r in runs if r.get("guarantee_valid") is False]


def axis_label(field: str | None, v: Any, group: Mapping[str, Any] | None = None) -> str:
    """`fmt_value` of a cell's (or paired difference's) axis value, marked "(NO GUARANTEE: public noise)"
    where `group` (a cell of compare.json) holds a run without a guarantee."""
    flagged = bool((group or {}).get("no_guarantee_runs"))
    return contract.mark_epsilon(fmt_value(field, v), False if flagged else None)


def compare_runs(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *, step: int | None = None,
                 x: str = EPSILON, series: str | None = None, attribute: str | None = None,
                 ci_level: float = 0.95, select_by: str | None = None) -> dict[str, Any]:
    """Cells (series, x) over runs, seeds aggregated; per cell: utility, gap and parity (mean over
    seeds, CI over seeds); "paired": private minus non-private gaps (`paired_differences`); "selection":
    the selected run and the privacy of releasing it (`dpft.evaluate.selected`: accounted for the trials
    of a private selection, said to be unaccounted for `select_by` over other runs). Writes
    compare.{json,md,png} to out_dir and returns the compare.json dict."""
    if not run_dirs:
        raise UsageError("compare: no run directories given")
    record = selected.selection_record(run_dirs)
    if series is not None and series == x:
        raise UsageError(f"compare: --x and --series are the same field {x!r}")
    rows = [_row(Path(d), step, x, series) for d in run_dirs]
    kinds = {(r["task"], r["utility_metric"]) for r in rows}
    if len(kinds) > 1:
        raise UsageError(f"compare: runs mix tasks/metrics {sorted(kinds)}; compare runs of one data set")
    attrs = sorted({a for r in rows for a in r["gaps"]} | {a for r in rows for a in r["parity"]})
    if attribute is not None:
        if attribute not in attrs:
            raise UsageError(f"compare: no attribute {attribute!r} in the runs' metrics; have {attrs}")
        attrs = [attribute]
    rows.sort(key=lambda r: (_sort_key(r["series"]), _sort_key(r["x"]), r["run"]))
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((_freeze(r["series"]), _freeze(r["x"])), []).append(r)
    _check_cells(cells, x, series, free=[f for f, _ in record[2]["axes"]] if record else ())
    out_cells = []
    for (_, _), runs in cells.items():
        cell = {"series": runs[0]["series"], "x": runs[0]["x"], "runs": [r["run"] for r in runs],
                "n_runs": len(runs), "seeds": [r["seeds"] for r in runs], "no_guarantee_runs": no_guarantee_runs(runs),
                "utility": cell_summary([r["utility"] for r in runs], ci_level), "gaps": {}, "parity": {}}
        for a in attrs:
            cell["gaps"][a] = cell_summary([(r["gaps"].get(a) or {}).get("gap") for r in runs], ci_level)
            cell["parity"][a] = {p: cell_summary([(r["parity"].get(a) or {}).get(p) for r in runs], ci_level)
                                 for p in PARITY_METRICS}
        out_cells.append(cell)
    paired = paired_differences(cells, x, series, attrs, ci_level)
    choice = (selected.private_selection(*record, run_dirs, select_by) if record
              else selected.plain_selection(rows, select_by) if select_by else None)
    for r in rows:
        del r["_config"]
    result = {"x": x, "series": series, "utility_metric": rows[0]["utility_metric"], "attributes": attrs,
              "ci_level": ci_level, "cells": out_cells, "runs": rows, "paired": paired}
    if choice is not None:
        result["selection"] = choice
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_io.write_json(out / "compare.json", result, indent=2, allow_nan=False, default=str)
    atomic_io.write_text(out / "compare.md", render_compare_markdown(result))
    plot_compare(result, out / "compare.png")
    result["files"] = {k: str(out / f"compare.{k}") for k in ("json", "md", "png")}
    return result


def paired_differences(cells: dict[tuple, list[dict]], x: str, series: str | None, attrs: Sequence[str],
                       level: float) -> list[dict[str, Any]]:
    """For each cell of private runs that has a non-private baseline cell (the epsilon axis None, the other
    axis equal), per attribute: the gap of the private runs minus the baseline's, paired by seed on the same
    test rows (`dpft.evaluate.paired`). [] when the epsilon axis is not compared or there is no baseline."""
    from dpft.evaluate import paired

    if EPSILON not in (x, series):
        return []
    eps_is_x = x == EPSILON
    out, cache = [], {}  # a baseline shared by several private cells is resampled once
    for key, runs in cells.items():
        eps = key[1] if eps_is_x else key[0]
        if eps is None:
            continue
        base = cells.get((key[0], None) if eps_is_x else (None, key[1]))
        if not base:
            continue
        by_seed = {json.dumps(r["seeds"], sort_keys=True): r for r in base}
        pairs = [(r, by_seed[json.dumps(r["seeds"], sort_keys=True)]) for r in runs
                 if json.dumps(r["seeds"], sort_keys=True) in by_seed]
        if not pairs:
            continue
        docs = [((_read_json(Path(a["metrics_path"])), a["metrics_path"]),
                 (_read_json(Path(b["metrics_path"])), b["metrics_path"])) for a, b in pairs]
        for attr in attrs:
            out.append({"series": runs[0]["series"], "x": runs[0]["x"], "attribute": attr,
                        "runs": [[a["run"], b["run"]] for a, b in pairs],
                        "no_guarantee_runs": no_guarantee_runs([a for a, _ in pairs]),
                        **paired.paired_gap_difference(docs, attr, level=level, cache=cache)})
    return out


def _freeze(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def _check_cells(cells: dict[tuple, list[dict]], x: str, series: str | None, free: Sequence[str] = ()) -> None:
    """Runs of one cell may differ only in seed fields (and the privacy fields a non-private run drops), and
    in `free` fields (a private selection's axes: its trials are random draws of them)."""
    for runs in cells.values():
        if len(runs) < 2:
            continue
        keys = set().union(*(r["_config"] for r in runs))
        differ = sorted(k for k in keys if not _is_seed(k) and k not in (x, series) and k not in free
                        and len({repr(r["_config"].get(k)) for r in runs}) > 1)
        if differ:
            names = ", ".join(r["run"] for r in runs)
            raise UsageError(f"compare: runs {names} share {x}={fmt_value(x, runs[0]['x'])}"
                             + (f" and {series}={fmt_value(series, runs[0]['series'])}" if series else "")
                             + f" but differ in {differ}; pass one of them as --series (or --x)")


def _cell_label(result: dict[str, Any], cell: dict[str, Any]) -> str:
    return fmt_value(result["series"], cell["series"]) if result["series"] else ""


def render_compare_markdown(result: dict[str, Any]) -> str:
    """compare.md: one table of cells (mean over seeds [CI over seeds]) and one of the single runs."""
    m, attrs, x, series = result["utility_metric"], result["attributes"], result["x"], result["series"]
    level = int(round(result["ci_level"] * 100))
    lines = [f"# Sweep: {m}, subgroup gap and parity over {x}" + (f" and {series}" if series else ""), "",
             f"Each cell: mean over its runs (seeds) [{level}% t interval over seeds, clipped to [0, 1]; a "
             "cell of one run: that run's bootstrap interval over patients, marked *]; (n k/m): only k of "
             "its m runs define the value. "
             f"Gap = max - min of {m} over the compared groups; parity metrics are fairlearn's "
             "(between groups), averaged over the tasks where each is defined. Differences: lower is "
             "better; ratios: higher is better. Undefined values are n/a, never 0.", ""]
    if any(c.get("no_guarantee_runs") for c in result["cells"]):
        lines += [f"Marked ({contract.NO_GUARANTEE}): a cell with a run whose noise was public (an insecure "
                  "fixed noise seed, or updates before a resume without a secret); its epsilon is nominal, not a "
                  "differential-privacy guarantee.", ""]
    par_short = {"demographic_parity_difference": "DP diff", "equal_opportunity_difference": "EO diff",
                 "equalized_odds_difference": "EqOdds diff", "demographic_parity_ratio": "DP ratio",
                 "equal_opportunity_ratio": "EO ratio", "equalized_odds_ratio": "EqOdds ratio"}
    for a in attrs or [None]:
        header = ([series] if series else []) + [x, "runs", m]
        if a is not None:
            header += [f"{m} gap ({a})"] + [f"{par_short[p]} ({a})" for p in PARITY_METRICS]
        rows = []
        for c in result["cells"]:
            cells = ([fmt_value(series, c["series"])] if series else []) + [axis_label(x, c["x"], c), str(c["n_runs"]),
                                                                             fmt_cell(c["utility"])]
            if a is not None:
                cells += [fmt_cell(c["gaps"][a])] + [fmt_cell(c["parity"][a][p]) for p in PARITY_METRICS]
            rows.append(cells)
        if a is not None:
            lines += [f"## Attribute {a}", ""]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(s.replace("|", "\\|") for s in r) + " |" for r in rows] + [""]
    if result.get("paired"):
        lines += ["## Private minus non-private gap (paired)", "",
                  f"Per cell of private runs: the mean over seeds of ({m} gap of the private run - gap of the "
                  "non-private run of the same seed), both on the same test rows, with the "
                  f"{level}% percentile interval of a paired bootstrap resampling patients and seeds together "
                  "(> 0: DP widens the gap).", "",
                  "| " + " | ".join(([series] if series else []) + [x, "attribute", "seeds", "difference"]) + " |",
                  "|" + "---|" * (4 + bool(series))]
        for p in result["paired"]:
            cells = ([fmt_value(series, p["series"])] if series else []) + [
                axis_label(x, p["x"], p), p["attribute"], str(p["n_pairs"]), fmt_stat(p)]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append("")
    lines += ["## Runs", "", "| run | " + (f"{series} | " if series else "") + f"{x} | epsilon spent | step | seeds | {m} "
              "| training examples per group |", "|" + "---|" * (7 + bool(series))]
    for r in result["runs"]:
        spent = "-" if r["epsilon_spent"] is None else f"{r['epsilon_spent']:.2f}"
        if r["epsilon_spent"] is not None and r.get("privacy_unit"):
            spent = f"{spent} per {r['privacy_unit']}"
        if r["epsilon_spent"] is not None:
            spent = contract.mark_epsilon(spent, r.get("guarantee_valid"))
        seeds = ", ".join(f"{k}={v}" for k, v in r["seeds"].items()) or "-"
        groups = "; ".join(f"{a}: " + ", ".join(f"{g} {n}" for g, n in counts.items())
                           for a, counts in r.get("train_groups", {}).items() if a in (attrs or [])) or "-"
        cells = [r["run"]] + ([fmt_value(series, r["series"])] if series else []) + [
            fmt_value(x, r["x"]), spent, str(r["step"]), seeds, fmt_stat(r["utility"]), groups]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    if result.get("selection"):
        lines += selected.render(result["selection"])
    return "\n".join(lines) + "\n"


def _numeric(values: Sequence[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def tick_label(result: Mapping[str, Any], v: Any) -> str:
    """The plot's tick label of x value `v`: `axis_label`, marked where a cell at `v` (any series) holds a
    run without a guarantee; the mark on a line of its own."""
    flagged = {"no_guarantee_runs": [n for c in result["cells"] if _freeze(c["x"]) == _freeze(v)
                                     for n in c.get("no_guarantee_runs", [])]}
    return axis_label(result["x"], v, flagged).replace(f" ({contract.NO_GUARANTEE})", f"\n({contract.NO_GUARANTEE})")


def plot_compare(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Panels over x: utility, then per attribute its gap and every parity metric; one line per
    series with CI bars over seeds. Runs without an x value (non-private when x is epsilon) are
    dashed horizontal lines."""
    plt = pyplot()
    attrs = result["attributes"]
    panels = [("utility", None, None)] + [(q, a, p) for a in attrs for q, p in
                                          [("gap", None)] + [("parity", p) for p in PLOTTED_PARITY]]
    ncol = min(4, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.4 * nrow), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    x, series, m = result["x"], result["series"], result["utility_metric"]
    level = int(round(result["ci_level"] * 100))
    xs_all = [c["x"] for c in result["cells"] if c["x"] is not None]
    numeric = bool(xs_all) and _numeric(xs_all)
    positions = {} if numeric else {v: i for i, v in enumerate(sorted({_freeze(v) for v in xs_all}, key=_sort_key))}
    log = numeric and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 10
    span = (max(xs_all) - min(xs_all) or 1.0) if numeric else 1.0
    series_vals = sorted({_freeze(c["series"]) for c in result["cells"]}, key=_sort_key)
    for k, (kind, a, p) in enumerate(panels):
        ax = axes[k // ncol][k % ncol]
        for i, sv in enumerate(series_vals):
            color = colors[i % len(colors)]
            cells = [c for c in result["cells"] if _freeze(c["series"]) == sv]
            label = fmt_value(series, sv) if series else None
            stat = lambda c: (c["utility"] if kind == "utility" else c["gaps"][a] if kind == "gap"  # noqa: E731
                              else c["parity"][a][p])
            pts = [(c["x"], stat(c)) for c in cells if c["x"] is not None and stat(c)["value"] is not None]
            shift = (i - (len(series_vals) - 1) / 2) * 0.06  # dodge the series so their intervals do not overlap
            xs = [(v * (1 + shift) if log else v + shift * span) if numeric else positions[_freeze(v)] + shift
                  for v, _ in pts]
            if pts:
                ax.plot(xs, [s["value"] for _, s in pts], color=color,
                        ls="--" if series == EPSILON and sv is None else "-")
                for xv, (_, s) in zip(xs, pts):
                    draw_interval(ax, xv, s, color=color, label=None)
                ax.plot([], [], "o-", color=color, label=label)
            for c in cells:
                if c["x"] is None and stat(c)["value"] is not None:
                    s = stat(c)
                    ax.axhline(s["value"], ls="--", color=color,
                               label=(f"{label}, " if label else "") + axis_label(x, None, c))
                    if s["ci"][0] is not None:
                        ax.axhspan(s["ci"][0], s["ci"][1], color=color, alpha=0.12)
        if numeric:
            if log:
                ax.set_xscale("log")
            ticks = sorted(set(xs_all))
            ax.set_xticks(ticks, [tick_label(result, t) for t in ticks], fontsize=7)
            ax.minorticks_off()
        else:
            ax.set_xticks(list(positions.values()), [tick_label(result, v) for v in positions], fontsize=7)
        ax.set_xlabel(x, fontsize=8)
        if kind == "utility":
            ax.set_ylabel(f"{m} (higher is better)", fontsize=8)
            ax.set_title(f"{m}", fontsize=9)
        elif kind == "gap":
            ax.set_ylabel(f"{m} gap, max - min over groups (lower is better)", fontsize=7)
            ax.set_title(f"{m} gap over {a}", fontsize=9)
        else:
            better = "higher" if p.endswith("ratio") else "lower"
            ax.set_ylabel(f"{p.replace('_', ' ')}\n(mean over tasks; {better} is better)", fontsize=7)
            ax.set_title(f"{p.replace('_', ' ')} over {a}", fontsize=9)
        ax.set_ylim(-0.02, 1.02)  # every compared metric lies in [0, 1]: a fixed scale, so noise never looks large
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, title=series, title_fontsize=6)
    for k in range(len(panels), nrow * ncol):
        axes[k // ncol][k % ncol].axis("off")
    fig.suptitle(f"mean over seeds with {level}% t intervals over seeds, clipped to [0, 1] (one run: its bootstrap "
                 "interval over patients); y from 0 to 1; series dodged along x for legibility", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
