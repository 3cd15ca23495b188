"""Subgroup attributes (age bins, race / insurance groups) and imbalance subsampling.

Race grouping (`group_race`), applied to CheXpert `PRIMARY_RACE` and MIMIC-IV
`race`/`ethnicity` strings, case-insensitive, after stripping spaces:
  * blank / NaN, or starting with "unknown", "patient refused", "patient declined",
    "declined", "unable to obtain", "not specified", "race and ethnicity unknown"
    (the CHEXPERT DEMO table's value)                                       -> "Unknown"
  * starting with "white"                                                  -> "White"
  * starting with "black" or "african american"                            -> "Black"
  * starting with "asian"                                                  -> "Asian"
  * anything else (Hispanic/Latino, Native American/Alaska Native,
    Native Hawaiian/Pacific Islander, "Other", "Multiple race", ...)       -> "Other"
So "White, Hispanic" is White, "Black, non-Hispanic" Black, "HISPANIC/LATINO - ..." Other,
"Native Hawaiian or Other Pacific Islander" Other.

A person with several records (MIMIC-IV: one race per admission; `person_race`): the groups of the
documented values, unknown-type ones ignored; one group -> that group, none -> "Unknown", two or
more different groups -> "Conflicting" (a separate, counted category, as published MIMIC fairness
work keeps it: never a majority vote or an alphabetical pick). RACE_RULE says it in reports.

Insurance grouping (`group_insurance`): "Medicare" / "Medicaid" by prefix, blank ->
"Unknown", everything else (Private, Other, No charge, ...) -> "Other".
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from dpft.errors import DataError
from dpft.data.base import ExampleTable

DEFAULT_AGE_EDGES: tuple[int, ...] = (18, 40, 60, 80)
RACE_GROUPS = ("White", "Black", "Asian", "Other", "Unknown", "Conflicting")
RACE_RULE = ("race of a person with several records (MIMIC-IV admissions): the group of the documented values, "
             "unknown-type values ignored; none documented: Unknown; different documented groups: Conflicting")
_UNKNOWN_PREFIXES = ("unknown", "patient refused", "patient declined", "declined", "unable to obtain",
                     "not specified", "nan", "race and ethnicity unknown")


def age_bin_labels(edges: Sequence[int] = DEFAULT_AGE_EDGES) -> tuple[str, ...]:
    """Bin names for `edges` e.g. (18, 40, 60, 80) -> ("0-18", "18-40", "40-60", "60-80", "80+")."""
    e = _check_edges(edges)
    return (f"0-{e[0]}",) + tuple(f"{a}-{b}" for a, b in zip(e[:-1], e[1:])) + (f"{e[-1]}+",)


def checked_age_edges(edges: Sequence[int]) -> tuple[int, ...]:
    """`edges` as a tuple of ints (how options classes store them), checked like `age_bin_labels`."""
    return tuple(_check_edges(edges))


def _check_edges(edges: Sequence[int]) -> list[int]:
    e = [int(x) for x in edges]
    if not e or any(b <= a for a, b in zip(e[:-1], e[1:])) or e[0] <= 0:
        raise DataError(f"age_edges must be positive and strictly increasing, got {list(edges)!r}")
    return e


def age_bin(age: float | str | None, edges: Sequence[int] = DEFAULT_AGE_EDGES) -> str:
    """The bin of `age` in years: lower edge inclusive ("40-60" holds 40..59.99); missing -> "Unknown"."""
    e = _check_edges(edges)
    labels = age_bin_labels(e)
    try:
        a = float(age)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "Unknown"
    if math.isnan(a) or a < 0:
        return "Unknown"
    return labels[int(np.searchsorted(np.asarray(e, float), a, side="right"))]


def unparseable_age(value: object) -> bool:
    """True for a non-blank age that is not a non-negative number (e.g. "forty"): such values
    become "Unknown" like blanks, but loaders count and report them."""
    if _blank(value):
        return False
    try:
        a = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return True
    return math.isnan(a) or a < 0


def _blank(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == ""


def group_race(value: object) -> str:
    """Raw race string -> one of RACE_GROUPS by the prefix rules in the module doc."""
    if _blank(value):
        return "Unknown"
    v = str(value).strip().lower()
    if v.startswith(_UNKNOWN_PREFIXES):
        return "Unknown"
    if v.startswith("white"):
        return "White"
    if v.startswith(("black", "african american")):
        return "Black"
    if v.startswith("asian"):
        return "Asian"
    return "Other"


def person_race(values: Sequence[object]) -> str:
    """One person's race group from all their raw race strings (module doc: unknown-type values
    ignored; several documented groups -> "Conflicting")."""
    documented = {group_race(v) for v in values} - {"Unknown"}
    if not documented:
        return "Unknown"
    return documented.pop() if len(documented) == 1 else "Conflicting"


def group_insurance(value: object) -> str:
    """Raw insurance string -> "Medicare" | "Medicaid" | "Other" | "Unknown"."""
    if _blank(value):
        return "Unknown"
    v = str(value).strip().lower()
    if v.startswith("medicare"):
        return "Medicare"
    if v.startswith("medicaid"):
        return "Medicaid"
    return "Other"


def group_sex(value: object) -> str:
    """"Male"/"M" -> "Male", "Female"/"F" -> "Female", else "Unknown"."""
    v = "" if _blank(value) else str(value).strip().lower()
    return {"male": "Male", "m": "Male", "female": "Female", "f": "Female"}.get(v, "Unknown")


# ---------------------------------------------------------------- imbalance

@dataclasses.dataclass(frozen=True)
class ImbalanceConfig:
    """Keep `group` of `attribute` so that it is `fraction` of the split (all other rows kept)."""

    attribute: str
    group: str
    fraction: float
    seed: int = 0


def imbalance_keep_count(n_group: int, n_other: int, fraction: float) -> int:
    """How many of the `n_group` rows to keep so they are `fraction` of the result.

    m / (n_other + m) = fraction  ->  m = fraction * n_other / (1 - fraction), rounded,
    at least 1 when fraction > 0. Raises if that needs more rows than there are.
    """
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"imbalance fraction must be in [0, 1), got {fraction!r}")
    m = int(round(fraction * n_other / (1.0 - fraction)))
    if fraction > 0:
        m = max(m, 1)
    if m > n_group:
        raise DataError(f"imbalance: fraction {fraction} needs {m} subgroup rows but only {n_group} exist "
                        f"(other rows: {n_other}); subsampling can only shrink a subgroup")
    return m


def subsample_subgroup(table: ExampleTable, config: ImbalanceConfig) -> ExampleTable:
    """A view of `table` keeping a seeded random subset of the subgroup (order preserved).

    Deterministic from `config.seed`; reads attributes only (no image decoding for path tables).
    """
    if config.attribute not in table.attribute_names:
        raise DataError(f"imbalance: attribute {config.attribute!r} not in {table.attribute_names}")
    values = table.column(f"attr:{config.attribute}")
    in_group = values == config.group
    n_group = int(in_group.sum())
    if n_group == 0:
        raise DataError(f"imbalance: no rows with {config.attribute}={config.group!r} in split {table.split!r}; "
                        f"values present: {sorted(set(values.tolist()))}")
    m = imbalance_keep_count(n_group, int((~in_group).sum()), config.fraction)
    group_pos = np.flatnonzero(in_group)
    rng = np.random.default_rng(config.seed)
    kept = rng.permutation(group_pos)[:m]
    keep = np.sort(np.concatenate([np.flatnonzero(~in_group), kept]))
    return table.subset(keep)
