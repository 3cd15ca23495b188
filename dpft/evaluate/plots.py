"""PNG plots of evaluation results: per-group metrics with CIs, ROC curves and reliability diagrams per
group, individual-epsilon histograms."""
from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from dpft import atomic_io
from dpft import paths as dpft_paths
from dpft.evaluate.fairness import group_index
from dpft.evaluate.render import direction, fmt_stat


def pyplot():
    import matplotlib
    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig: Any, path: str | os.PathLike) -> str:
    """Write `fig` as PNG (100 dpi) to `path` atomically (local or remote, via dpft.atomic_io: a crash
    leaves the previous file or none, never half a PNG) and close it. Returns the path."""
    try:
        atomic_io.write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        pyplot().close(fig)
    return str(path)


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
    ax.set_ylabel(f"{metric} ({direction(metric)})", fontsize=8)
    gap = result["gaps"].get(attr, {}).get(metric, {}).get("gap")
    ax.set_title(f"{metric} by {attr}" + (f"\ngap (max - min) {fmt_stat(gap)}" if gap else ""), fontsize=8)
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], marker="o", color="tab:blue", lw=1.5, label=f"value, {level}% CI (patient bootstrap)"),
               Line2D([], [], marker="o", color="tab:blue", mfc="white", lw=0, label="small / not compared")]
    ax.legend(handles=handles, fontsize=6, loc="best")


def write_group_plots(result: Mapping[str, Any], out_dir: str | os.PathLike) -> list[str]:
    """One PNG per attribute, `groups_<attr>.png`, a panel per plotted metric (not for the conditional
    attributes of control features, 'A|C=c': their numbers are in the report). Returns the paths."""
    plt = pyplot()
    paths = []
    metrics = plot_metrics(result)
    for attr in [a for a in result["groups"] if "|" not in a]:
        width = max(4.0, 0.9 * len(result["groups"][attr]))
        fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(width * max(1, len(metrics)), 3.8), squeeze=False)
        for ax, m in zip(axes[0], metrics):
            plot_group_metric(result, attr, m, ax)
        fig.tight_layout()
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in attr)
        paths.append(save_figure(fig, dpft_paths.join(out_dir, f"groups_{safe}.png")))
    return paths


def individual_epsilon_histogram(eps: np.ndarray, attrs: Mapping[str, np.ndarray], png_path: str | os.PathLike, *,
                                 min_group_size: int) -> str:
    """Histogram PNG of per-example epsilon [N], one panel per attribute (groups of at least
    `min_group_size` examples only, density-normalised). Returns the path written."""
    k = min_group_size
    plt = pyplot()
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
    return save_figure(fig, png_path)


MAX_CURVE_TASKS = 5  # tasks drawn per curve figure (multi-label eval tasks, or the first one-vs-rest classes)


def reliability(y: np.ndarray, p: np.ndarray, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean predicted probability, fraction of positives, count) of the non-empty equal-width bins of p:
    the points of a reliability diagram (scikit-learn's `calibration_curve(strategy="uniform")`, plus counts)."""
    p = np.asarray(p, np.float64)
    b = np.minimum((p * bins).astype(int), bins - 1)
    count = np.bincount(b, minlength=bins)
    ok = count > 0
    mean_p = np.bincount(b, weights=p, minlength=bins)[ok] / count[ok]
    frac = np.bincount(b, weights=np.asarray(y, np.float64), minlength=bins)[ok] / count[ok]
    return mean_p, frac, count[ok]


def write_curve_plots(inp: Any, attrs: Mapping[str, np.ndarray], included: Mapping[str, Any],
                      out_dir: str | os.PathLike) -> list[str]:
    """Per attribute (not the conditional 'A|C=c' ones), `roc_<attr>.png` and `calibration_<attr>.png`: a
    panel per task (at most MAX_CURVE_TASKS), one curve per compared group (its valid rows; a group
    without both classes of a task is left out of that ROC panel). Returns the paths."""
    from sklearn.metrics import roc_curve

    plt = pyplot()
    paths = []
    tasks = list(zip(inp.tasks, inp.task_index))[:MAX_CURVE_TASKS]
    if not tasks:
        return paths
    y_all = inp.binary_label
    for attr in [a for a in attrs if "|" not in a]:
        groups = {g: idx for g, idx in group_index(attrs[attr]).items() if g in included.get(attr, ())}
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in attr)
        for kind in ("roc", "calibration"):
            fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.4), squeeze=False)
            for ax, (t, j) in zip(axes[0], tasks):
                for g, idx in groups.items():
                    rows = idx[inp.valid[idx, j]]
                    y, prob = y_all[rows, j], inp.probs[rows, j]
                    if kind == "roc" and 0 < y.sum() < len(y):
                        fpr, tpr, _ = roc_curve(y, prob)
                        ax.plot(fpr, tpr, label=f"{g} (n={len(y)})")
                    elif kind == "calibration" and len(y):
                        mean_p, frac, _ = reliability(y, prob)
                        ax.plot(mean_p, frac, marker="o", label=f"{g} (n={len(y)})")
                ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
                ax.set_title(t, fontsize=9)
                ax.set_xlabel("false positive rate" if kind == "roc" else "mean predicted probability", fontsize=8)
                ax.set_ylabel("true positive rate" if kind == "roc" else "fraction of positives", fontsize=8)
                ax.legend(fontsize=6)
            fig.suptitle(f"{'ROC curves' if kind == 'roc' else 'reliability diagrams'} by {attr}", fontsize=10)
            fig.tight_layout()
            paths.append(save_figure(fig, dpft_paths.join(out_dir, f"{kind}_{safe}.png")))
    return paths
