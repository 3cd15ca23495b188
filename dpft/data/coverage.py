"""Per-attribute coverage of loaded tables, and the check of the fairness attributes a run asks for.

Coverage of an attribute = rows with a value (anything but "Unknown") out of all rows, over
every split, with the count of each group. `dpft prepare`, `dpft train` and `dpft evaluate`
print it at the start; training records it in `WORKDIR/attribute_coverage.json`.

Which attributes a run asks for: `data.attributes` (a tuple or "a,b" string; empty =
none), by default the data set's `DatasetSpec.required_attributes`. A requested attribute that
no row has is a `DataError` (the message gives the spec's `attribute_hint`: how to point to the
demographics tables, or to leave it out); one that some rows lack is a loud warning with the count.
"""
from __future__ import annotations

import collections
from typing import Any, Callable, Mapping, Sequence

from dpft import data
from dpft.errors import DataError
from dpft.data.base import ExampleTable

MISSING = "Unknown"


def attribute_coverage(tables: Mapping[str, ExampleTable]) -> dict[str, Any]:
    """{"attributes": {name: {"n", "with_value", "groups": {value: count},
    "splits": {split: {"n", "with_value", "groups": {value: count}, "excluded": {reason: {"n", "groups"}}}}}}}
    over every split of `tables` (the training split's groups: the realised subgroup sizes of an imbalance
    study; "excluded": the rows the loader left out of the split, by reason: `ExampleTable.excluded`)."""
    out: dict[str, dict[str, Any]] = {}
    names = list(dict.fromkeys(a for t in tables.values() for a in t.attribute_names))
    for split, table in tables.items():
        if not table.attribute_names:
            continue
        counts = {a: collections.Counter() for a in names}
        for rec in table.records():
            attrs = rec.get("attrs", {})
            for a in names:
                counts[a][str(attrs.get(a, MISSING))] += 1
        for a in names:
            entry = out.setdefault(a, {"n": 0, "with_value": 0, "groups": collections.Counter(), "splits": {}})
            n, known = len(table), len(table) - counts[a][MISSING]
            entry["n"] += n
            entry["with_value"] += known
            entry["groups"].update(counts[a])
            entry["splits"][split] = {"n": n, "with_value": known, "groups": dict(sorted(counts[a].items())),
                                      "excluded": {why: {"n": sum(by[a].values()), "groups": dict(by[a])}
                                                   for why, by in table.excluded.items() if a in by}}
    for entry in out.values():
        entry["groups"] = dict(sorted(entry["groups"].items()))
    return {"attributes": out}


def format_coverage(coverage: Mapping[str, Any]) -> list[str]:
    """One line per attribute: `attribute coverage: sex 120/124 (Female=60, Male=60, Unknown=4)`, and one per
    attribute and exclusion reason: `excluded (lateral view (frontal_only)): sex 41 (Female=30, Male=11)`."""
    lines, excluded = [], []
    for a, e in coverage["attributes"].items():
        groups = ", ".join(f"{v}={c}" for v, c in e["groups"].items())
        lines.append(f"attribute coverage: {a} {e['with_value']}/{e['n']} ({groups})")
        totals: dict[str, collections.Counter] = {}
        for info in e["splits"].values():
            for why, ex in info.get("excluded", {}).items():
                totals.setdefault(why, collections.Counter()).update(ex["groups"])
        excluded += [f"excluded ({why}): {a} {sum(c.values())} (" + ", ".join(f"{g}={n}" for g, n in sorted(c.items()))
                     + ")" for why, c in totals.items()]
    return (lines + excluded) or ["attribute coverage: the data set has no subgroup attributes"]


def required_attributes(dataset: str, option: Any) -> tuple[str, ...]:
    """The attributes a run asks for: `option` (tuple, list or "a,b" string) or the data set's default."""
    if option is None:
        return data.dataset(dataset).required_attributes
    if isinstance(option, str):
        return tuple(a.strip() for a in option.split(",") if a.strip())
    return tuple(str(a) for a in option)


def check_required(coverage: Mapping[str, Any], required: Sequence[str], dataset: str) -> list[str]:
    """Raise `DataError` for a requested attribute no row has; return warnings for those some rows lack."""
    attrs = coverage["attributes"]
    absent = [a for a in required if a not in attrs or attrs[a]["with_value"] == 0]
    if absent:
        hint = data.dataset(dataset).attribute_hint
        raise DataError(f"{dataset}: requested fairness attribute(s) {absent} have no value in any row"
                        f"{'; ' + hint if hint else ''}; or ask for fewer with "
                        f"--config.data.attributes={','.join(a for a in required if a not in absent) or '()'}")
    warnings = []
    for a in required:
        e = attrs[a]
        if e["with_value"] < e["n"]:
            per_split = ", ".join(f"{s} {v['n'] - v['with_value']}" for s, v in e["splits"].items()
                                  if v["with_value"] < v["n"])
            warnings.append(f"WARNING: fairness attribute {a!r} is missing ('{MISSING}') for "
                            f"{e['n'] - e['with_value']} of {e['n']} rows ({per_split})")
    return warnings


def report(tables: Mapping[str, ExampleTable], dataset: str, requested: Any,
           print_fn: Callable[[str], None] = print) -> dict[str, Any]:
    """Compute, print and check the coverage; returns it with the requested attributes and warnings."""
    cov = attribute_coverage(tables)
    for line in format_coverage(cov):
        print_fn(line)
    required = required_attributes(dataset, requested)
    warnings = check_required(cov, required, dataset)
    for w in warnings:
        print_fn(w)
    return {**cov, "dataset": dataset, "requested": list(required), "warnings": warnings}
