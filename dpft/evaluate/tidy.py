"""The by-group table of an evaluation as tidy data: `groups.csv` beside metrics.json and report.md.

One row per (scope, attribute, group, metric, task): scope "overall" (attribute and group empty) or
"group"; `metric/task` names of metrics.json split at the first "/" (metrics over all tasks, such as
auc_mean, have an empty task). Columns: value, ci_low, ci_high (the bootstrap interval at the report's
level, empty where undefined), n_valid (bootstrap replicates that defined it), n_examples and
n_patients of the group, small (the group is under the minimum size), undefined (the reason, where
the value is undefined). pandas / R read it directly (`pd.read_csv`, one filter per question).
"""
from __future__ import annotations

import csv
import io
import os
from typing import Any, Mapping

COLUMNS = ("scope", "attribute", "group", "metric", "task", "value", "ci_low", "ci_high", "n_valid", "n_examples",
           "n_patients", "small", "undefined")


def _split(name: str) -> tuple[str, str]:
    metric, _, task = name.partition("/")
    return metric, task


def _stat_row(stat: Mapping[str, Any]) -> dict[str, Any]:
    lo, hi = (stat.get("ci") or [None, None])
    return {"value": stat.get("value"), "ci_low": lo, "ci_high": hi, "n_valid": stat.get("n_valid"),
            "undefined": stat.get("undefined") or ""}


def tidy_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rows of `groups.csv` (module doc) from a metrics.json dict (`dpft.evaluate.reports`)."""
    meta = result.get("meta", {})
    rows = [{"scope": "overall", "attribute": "", "group": "", "metric": _split(name)[0], "task": _split(name)[1],
             **_stat_row(stat), "n_examples": meta.get("n_examples"), "n_patients": meta.get("n_patients"),
             "small": False} for name, stat in result.get("overall", {}).items()]
    for attribute, groups in result.get("groups", {}).items():
        for group, entry in groups.items():
            for name, stat in entry.get("metrics", {}).items():
                metric, task = _split(name)
                rows.append({"scope": "group", "attribute": attribute, "group": group, "metric": metric, "task": task,
                             **_stat_row(stat), "n_examples": entry.get("n"), "n_patients": entry.get("n_patients"),
                             "small": bool(entry.get("small"))})
    return rows


def tidy_csv(result: Mapping[str, Any]) -> str:
    """`groups.csv` as text (empty cells for None)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in tidy_rows(result):
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in COLUMNS})
    return buf.getvalue()


def write_tidy_csv(result: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Writes `groups.csv` atomically (local or a bucket: `dpft.atomic_io`)."""
    from dpft import atomic_io

    atomic_io.write_text(path, tidy_csv(result))
