"""Sweep comparison: epsilon vs utility vs subgroup gap over several run directories.

Each run dir holds `config.json` and `eval/<step>/metrics.json` (written by reports.py). From
config.json only `privacy.epsilon` (number, or null / "inf" for non-private) and
`privacy.enabled` (bool, default true) are read, as a nested object `{"privacy": {...}}` or as
dotted top-level keys `"privacy.epsilon"`. A run is non-private if enabled is false or epsilon is
null/inf. The latest step under eval/ is used unless `step` is given. The epsilon actually spent
(metrics.json `meta.epsilon`, from the predictions file) is reported beside the configured one.

`compare_runs(run_dirs, out_dir)` writes compare.json, compare.md and compare.png to out_dir.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from dpft.cli import UsageError
from dpft.evaluate.reports import _pyplot, fmt_stat


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise UsageError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not valid JSON ({e})") from None


def _privacy_field(config: dict[str, Any], field: str, path: Path) -> Any:
    if not isinstance(config, dict):
        raise UsageError(f"{path}: expected a JSON object")
    privacy = config.get("privacy")
    if isinstance(privacy, dict) and field in privacy:
        return privacy[field]
    return config.get(f"privacy.{field}")


def read_epsilon(run_dir: str | os.PathLike) -> float | None:
    """epsilon of a run from its config.json; None for a non-private run."""
    path = Path(run_dir) / "config.json"
    config = _read_json(path)
    enabled = _privacy_field(config, "enabled", path)
    eps = _privacy_field(config, "epsilon", path)
    if enabled is not None and not isinstance(enabled, bool):
        raise UsageError(f"{path}: field 'privacy.enabled': expected true/false, got {enabled!r}")
    if enabled is False or eps is None:
        return None
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise UsageError(f"{path}: field 'privacy.epsilon': expected a number, got {eps!r}") from None
    if math.isnan(value) or value <= 0:
        raise UsageError(f"{path}: field 'privacy.epsilon': must be > 0, got {eps!r}")
    return None if math.isinf(value) else value


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


def _row(run_dir: Path, step: int | None) -> dict[str, Any]:
    path = find_metrics(run_dir, step)
    m = _read_json(path)
    try:
        head = m["meta"]["headline"]
        utility = head[0]
        row = {"run": run_dir.name, "run_dir": str(run_dir), "metrics_path": str(path),
               "epsilon": read_epsilon(run_dir), "epsilon_spent": m["meta"].get("epsilon"),
               "step": m["meta"]["step"], "task": m["meta"]["task"],
               "utility_metric": utility, "utility": m["overall"][utility], "gaps": {}}
        for attr, metrics in m["gaps"].items():
            g = metrics.get(utility)
            if g is not None:
                row["gaps"][attr] = {"gap": g["gap"], "worst_group": g["worst_group"], "worst": g["worst"]}
    except (KeyError, IndexError, TypeError) as e:
        raise UsageError(f"{path}: missing field {e} (not written by dpft.evaluate.reports?)") from None
    return row


def compare_runs(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
                 step: int | None = None) -> dict[str, Any]:
    """Sweep table over runs: epsilon, headline utility (auc_mean / top1) and its gap per attribute,
    all with CIs; rows sorted by epsilon, non-private last. Writes compare.{json,md,png}."""
    if not run_dirs:
        raise UsageError("compare: no run directories given")
    rows = [_row(Path(d), step) for d in run_dirs]
    kinds = {(r["task"], r["utility_metric"]) for r in rows}
    if len(kinds) > 1:
        raise UsageError(f"compare: runs mix tasks/metrics {sorted(kinds)}; compare runs of one data set")
    rows.sort(key=lambda r: (r["epsilon"] is None, r["epsilon"] or 0.0, r["run"]))
    attrs = sorted({a for r in rows for a in r["gaps"]})
    metric = rows[0]["utility_metric"]
    result = {"utility_metric": metric, "attributes": attrs, "runs": rows}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(result, indent=2, allow_nan=False), encoding="utf-8")
    (out / "compare.md").write_text(render_compare_markdown(result), encoding="utf-8")
    plot_compare(result, out / "compare.png")
    result["files"] = {k: str(out / f"compare.{k}") for k in ("json", "md", "png")}
    return result


def _eps_str(eps: float | None) -> str:
    return "non-private" if eps is None else f"{eps:g}"


def render_compare_markdown(result: dict[str, Any]) -> str:
    """compare.md: one row per run: run, epsilon, step, utility [CI], per attribute gap [CI] (worst group)."""
    m, attrs = result["utility_metric"], result["attributes"]
    header = ["run", "epsilon", "epsilon spent", "step", m] + [f"{m} gap over {a} (worst group)" for a in attrs]
    lines = [f"# Sweep: epsilon vs {m} vs subgroup gap", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    for r in result["runs"]:
        spent = "-" if r["epsilon_spent"] is None else f"{r['epsilon_spent']:.3g}"
        cells = [r["run"], _eps_str(r["epsilon"]), spent, str(r["step"]), fmt_stat(r["utility"])]
        for a in attrs:
            g = r["gaps"].get(a)
            cells.append("n/a" if g is None else f"{fmt_stat(g['gap'])} ({g['worst_group']})")
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def plot_compare(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Two panels over epsilon (log axis): utility, and its gap per attribute, with CI bars.
    Non-private runs are drawn as dashed horizontal lines."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    m = result["utility_metric"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def draw(ax, stats, color, label):
        priv = [(r["epsilon"], s) for r, s in stats if r["epsilon"] is not None and s and s["value"] is not None]
        if priv:
            xs = [e for e, _ in priv]
            ys = [s["value"] for _, s in priv]
            err = [[max(0.0, y - (s["ci"][0] if s["ci"][0] is not None else y)) for y, (_, s) in zip(ys, priv)],
                   [max(0.0, (s["ci"][1] if s["ci"][1] is not None else y) - y) for y, (_, s) in zip(ys, priv)]]
            ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=3, color=color, label=label)
        for r, s in stats:
            if r["epsilon"] is None and s and s["value"] is not None:
                ax.axhline(s["value"], ls="--", color=color, label=f"{label} non-private" if label else "non-private")

    draw(axes[0], [(r, r["utility"]) for r in result["runs"]], colors[0], None)
    axes[0].set_ylabel(m)
    for i, a in enumerate(result["attributes"]):
        draw(axes[1], [(r, r["gaps"].get(a, {}).get("gap")) for r in result["runs"]], colors[i % len(colors)], a)
    axes[1].set_ylabel(f"{m} gap (max - min over groups)")
    for ax in axes:
        eps = sorted({r["epsilon"] for r in result["runs"] if r["epsilon"] is not None})
        if eps:
            ax.set_xscale("log")
            ax.set_xticks(eps, [f"{e:g}" for e in eps])
            ax.minorticks_off()
        ax.set_xlabel("epsilon")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
