"""`dpft demo --study mechanisms`: DP-SGD against BandMF (correlated noise), and full fine-tuning against
head / norms_and_head / LoRA, on the demo data at the same epsilons and seeds.

Every variant is the demo recipe (`dpft.demo.recipe`) with a few config fields changed (`VARIANTS`), run
through the `dpft train` loop from the same public pre-training and evaluated from what it saved. Per
(variant, epsilon): accuracy and the minority gap (mean over seeds, t interval over seeds) from the sweep
comparisons (`dpft evaluate --compare`: one over privacy.mechanism, one over train.trainable), and the
time per update (the median interval between consecutive updates of each run, compile and the first
update excluded; median over the runs of the cell).
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable

from dpft import atomic_io
from dpft.demo.recipe import DEFAULT_MODEL, recipe

#: BandMF's band width in the study (the strategy is optimised for the run's number of updates).
BANDS = 4
#: variant -> config fields (dotted) changed from the demo recipe's DP-SGD full fine-tuning.
VARIANTS: dict[str, dict[str, Any]] = {
    "dpsgd-all": {},
    "bandmf-all": {"privacy.mechanism": "bandmf", "privacy.bandmf.bands": BANDS},
    "dpsgd-head": {"train.trainable": "head"},
    "dpsgd-norms_and_head": {"train.trainable": "norms_and_head"},
    "dpsgd-lora4": {"train.trainable": "lora:4"},
}
#: The recipe's value of each comparison's series field (what the variants without it run).
SERIES_DEFAULTS = {"privacy.mechanism": "dpsgd", "train.trainable": "all"}
#: The two comparisons: (name, series field, variants in it).
COMPARISONS = (("mechanism", "privacy.mechanism", ("dpsgd-all", "bandmf-all")),
               ("trainable", "train.trainable", ("dpsgd-all", "dpsgd-head", "dpsgd-norms_and_head", "dpsgd-lora4")))


def variant_config(variant: str, *, epsilon: float, seed: int, updates: int, checkpoint: str, model: str,
                   minority_fraction: float) -> Any:
    """The demo recipe of a private run with `VARIANTS[variant]`'s fields set (KeyError naming an unknown one)."""
    cfg = recipe(private=True, epsilon=epsilon, updates=updates, checkpoint=checkpoint, seed=seed, model=model,
                 minority_fraction=minority_fraction)
    with cfg.unlocked():
        cfg.individual.enabled = False  # a per-run pass the study does not read
        cfg.train.log_every = 1  # every update's time (`update_seconds`)
        for field, value in VARIANTS[variant].items():
            *parents, leaf = field.split(".")
            node = cfg
            for p in parents:
                node = node[p]
            if leaf not in node:
                raise KeyError(f"mechanisms study: variant {variant!r} sets {field}, which the config does not have")
            node[leaf] = value
    return cfg


def update_seconds(stamps: list[tuple[float, int]]) -> float | None:
    """Median seconds between consecutive logged updates (time, update index), the first two updates (compile)
    left out; None with fewer than two intervals."""
    later = [(t, u) for t, u in stamps if u > 2]
    gaps = [(t1 - t0) / (u1 - u0) for (t0, u0), (t1, u1) in zip(later, later[1:]) if u1 > u0]
    return statistics.median(gaps) if len(gaps) >= 2 else None


def _timed_printer(stamps: list[tuple[float, int]], print_fn: Callable[[str], None]) -> Callable[[str], None]:
    def say(line: str) -> None:
        if line.startswith("update ") and "/" in line:
            try:
                stamps.append((time.monotonic(), int(line.split()[1].split("/")[0])))
            except ValueError:
                pass
        print_fn(line)
    return say


def mechanisms_study(workdir: str, checkpoint: str, epsilons: list[float], seeds: list[int], *, updates: int,
                     minority_fraction: float, n_resamples: int, print_fn=print, model: str = DEFAULT_MODEL,
                     variants: tuple[str, ...] = tuple(VARIANTS)) -> dict[str, Any]:
    """Variant x epsilon x seed runs under WORKDIR/mechanisms, their comparisons and the summary rows
    (see the module doc). A run whose evaluation exists is reused."""
    from dpft.demo.steps import _eval_run
    from dpft.evaluate import compare
    from dpft.train import loop

    root = os.path.join(workdir, "mechanisms")
    grid = [(v, e, s) for v in variants for e in epsilons for s in seeds]
    dirs: dict[str, list[str]] = {v: [] for v in variants}
    times: dict[tuple[str, float], list[float]] = {}
    for i, (variant, eps, seed) in enumerate(grid):
        run_dir = os.path.join(root, f"{variant}_epsilon-{eps:g}_seed-{seed}")
        print_fn(f"      [{i + 1}/{len(grid)}] {os.path.basename(run_dir)}")
        timing = os.path.join(run_dir, "update_seconds.txt")
        if not os.path.isfile(os.path.join(run_dir, "eval", str(updates), "metrics.json")):
            stamps: list[tuple[float, int]] = []
            cfg = variant_config(variant, epsilon=eps, seed=seed, updates=updates, checkpoint=checkpoint, model=model,
                                 minority_fraction=minority_fraction)
            loop.Trainer(cfg, run_dir, print_fn=_timed_printer(stamps, lambda s: None)).run()
            _eval_run(run_dir, n_resamples, plots=False)
            seconds = update_seconds(stamps)
            atomic_io.write_text(timing, "" if seconds is None else repr(seconds))
        text = open(timing, encoding="utf-8").read().strip() if os.path.isfile(timing) else ""
        if text:
            times.setdefault((variant, eps), []).append(float(text))
        dirs[variant].append(run_dir)
    comparisons = {}
    for name, series, members in COMPARISONS:
        members = [v for v in members if v in variants]
        if len(members) >= 2:
            comparisons[name] = compare.compare_runs([d for v in members for d in dirs[v]],
                                                     os.path.join(root, f"compare_{name}"), series=series)
    rows = summary_rows(comparisons, times, variants, epsilons)
    return {"rows": rows, "comparisons": {k: v["files"] for k, v in comparisons.items()}, "root": root}


def summary_rows(comparisons: dict[str, dict], times: dict[tuple[str, float], list[float]], variants: tuple[str, ...],
                 epsilons: list[float]) -> list[dict[str, Any]]:
    """One row per (variant, epsilon): accuracy and minority gap cells of the comparison that holds the variant,
    and the median seconds per update."""
    rows = []
    for variant in variants:
        for eps in epsilons:
            cell = None
            for name, series, members in COMPARISONS:
                if variant in members and name in comparisons:
                    value = _series_value(variant, series)
                    cell = next((c for c in comparisons[name]["cells"]
                                 if c["x"] == eps and str(c["series"]) == value), None)
                    if cell is not None:
                        break
            t = times.get((variant, eps))
            rows.append({"variant": variant, "epsilon": eps, "n_runs": cell["n_runs"] if cell else 0,
                         "accuracy": cell["utility"] if cell else None,
                         "gap": cell["gaps"].get("group") if cell else None,
                         "seconds_per_update": statistics.median(t) if t else None})
    return rows


def _series_value(variant: str, series: str) -> str:
    """`variant`'s value of the comparison's series field, as compare.json writes it."""
    return str(VARIANTS[variant].get(series, SERIES_DEFAULTS[series]))


def study_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: variant, epsilon, runs, accuracy and minority gap (mean [t interval over seeds]), s/update."""
    from dpft.evaluate.compare import fmt_cell

    lines = ["| variant | epsilon | runs | accuracy | accuracy gap (minority) | s / update |", "|" + "---|" * 6]
    for r in rows:
        sec = "n/a" if r["seconds_per_update"] is None else f"{r['seconds_per_update']:.3f}"
        lines.append(f"| {r['variant']} | {r['epsilon']:g} | {r['n_runs']} | {fmt_cell(r['accuracy'])} | "
                     f"{fmt_cell(r['gap'])} | {sec} |")
    return "\n".join(lines)
