"""The privacy unit: who (ε, δ) protects, and which training rows each protected unit owns (numpy, no jax).

`config.privacy.unit`:

* "example": each training row (an image) is a unit; today's DP-SGD. A patient with several images
  is then protected by group privacy only (`dpft.privacy.group`, stated in the plan).
* "patient": each patient is a unit. Poisson sampling draws patients (rate q = B / N_patients); a
  sampled patient brings its images of the split, at most `cap` of them (a patient with more gets a
  fresh random subset of `cap` in each update, from the secret selection stream), and contributes
  ONE clipped gradient: the gradient of the sum of its images' losses (each image's K augmult views
  averaged), clipped to C. Removing a patient therefore moves the clipped sum by at most C, and the
  accountant's (q, σ, T) are over patients. The cap keeps physical batches static: a unit's row holds
  `cap` image slots, the unused ones padded and masked (weight 0).

`UnitIndex` groups table positions into units; `choose_cap` picks the cap from the data (the smallest
cap keeping at least `CAP_KEEP_FRACTION` of the images, see its doc); `unit_rows` gives the table
positions of the sampled units of one update.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Sequence

import numpy as np

UNITS = ("example", "patient")
#: `choose_cap`: the smallest cap with at least this fraction of the training images usable per update.
CAP_KEEP_FRACTION = 0.95
_SUBSET_TAG = 0x5553  # "US": the stream of the per-update subsets of over-cap units


@dataclasses.dataclass(frozen=True, eq=False)
class UnitIndex:
    """Table positions grouped by privacy unit.

    unit: a multi-row unit of `UNITS` ("patient"; an example-level run has no index). names: the
    units' ids (patient ids) [U]. offsets: int64 [U + 1]; rows[offsets[u]:offsets[u + 1]] are unit u's
    table positions (table order). cap: image slots per unit row (>= 1).
    """

    unit: str
    names: tuple[str, ...]
    offsets: np.ndarray
    rows: np.ndarray
    cap: int

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"privacy.unit={self.unit!r}; use one of {UNITS}")
        if isinstance(self.cap, bool) or not isinstance(self.cap, (int, np.integer)) or self.cap < 1:
            raise ValueError(f"privacy.unit_cap: the images per unit and update must be an int >= 1, got {self.cap!r}")

    @classmethod
    def from_patient_ids(cls, patient_ids: Sequence[str], cap: int = 0, where: str = "training split"
                         ) -> "UnitIndex":
        """Patients as units, numbered in order of first appearance; `cap` 0 = `choose_cap`.
        ValueError naming `where` for an empty or missing ("", None) patient id."""
        ids = [None if p is None else str(p) for p in patient_ids]
        missing = [i for i, p in enumerate(ids) if not p]
        if missing:
            raise ValueError(f"{where}: privacy.unit='patient' needs a patient id on every row; rows {missing[:5]} "
                             f"({len(missing)} in all) have none")
        if not ids:
            raise ValueError(f"{where}: no rows, so no patients")
        order: dict[str, list[int]] = collections.defaultdict(list)
        for i, p in enumerate(ids):
            order[p].append(i)
        sizes = np.asarray([len(v) for v in order.values()], np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        rows = np.concatenate([np.asarray(v, np.int64) for v in order.values()])
        cap = choose_cap(sizes) if cap == 0 else cap
        return cls("patient", tuple(order), offsets, rows, int(cap))

    @property
    def num_units(self) -> int:
        return len(self.offsets) - 1

    @property
    def sizes(self) -> np.ndarray:
        """Rows (images) per unit, int64 [U]."""
        return np.diff(self.offsets)

    def rows_of(self, unit: int) -> np.ndarray:
        return self.rows[self.offsets[unit]:self.offsets[unit + 1]]

    def unit_columns(self, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per-unit columns [U] from per-row columns [N] (table order): each unit takes its first row's
        values (a patient's sex and race; its first study's age and label), and "example_id" becomes
        the unit id 0..U-1 (what training batches, individual accounting and the ledger call it)."""
        first = self.rows[self.offsets[:-1]]
        out = {k: np.asarray(v)[first] for k, v in columns.items()}
        out["example_id"] = np.arange(self.num_units, dtype=np.int64)
        return out

    def summary(self) -> dict:
        """What the plan states: units, the cap, and the images a cap leaves out (public counts of the data)."""
        sizes = self.sizes
        over = np.maximum(sizes - self.cap, 0)
        hist = collections.Counter(int(s) for s in sizes)
        return {"unit": self.unit, "num_units": self.num_units, "num_rows": int(sizes.sum()),
                "max_rows_per_unit": int(sizes.max()), "cap": int(self.cap),
                "units_over_cap": int(np.count_nonzero(over)),
                # Each update uses at most `cap` images of a sampled unit: the rest sit out that update.
                "fraction_of_rows_within_cap": float(np.minimum(sizes, self.cap).sum() / sizes.sum()),
                # Real image slots of a unit row (the rest is masked padding): the compute efficiency.
                "fraction_of_slots_used": float(np.minimum(sizes, self.cap).mean() / self.cap),
                "rows_per_unit": {str(k): v for k, v in sorted(hist.items())}}


def choose_cap(sizes: np.ndarray, keep_fraction: float = CAP_KEEP_FRACTION) -> int:
    """The smallest cap k with sum_u min(size_u, k) >= keep_fraction * sum_u size_u (k <= max size).

    A larger cap keeps more images per update but pads every unit row to k slots (compute ∝ k)."""
    sizes = np.asarray(sizes, np.int64)
    if sizes.size == 0 or np.any(sizes < 1):
        raise ValueError("choose_cap: every unit needs at least one row")
    total = sizes.sum()
    for k in range(1, int(sizes.max()) + 1):
        if np.minimum(sizes, k).sum() >= keep_fraction * total:
            return k
    return int(sizes.max())


def unit_rows(index: UnitIndex, units: np.ndarray, *, seed: int, update_index: int) -> np.ndarray:
    """int64 [len(units), cap]: table positions of each unit (-1: padding slot, or a padding unit -1).

    A unit with more rows than the cap gets `cap` of them, a uniformly random subset drawn from
    (seed, update_index, unit) (the secret selection stream), kept in table order; a pure function
    of its arguments, so every host and a resumed run draw the same."""
    units = np.asarray(units, np.int64).reshape(-1)
    out = np.full((units.shape[0], index.cap), -1, np.int64)
    for i, u in enumerate(units):
        if u < 0:
            continue
        rows = index.rows_of(int(u))
        if rows.shape[0] > index.cap:
            rng = np.random.Generator(np.random.Philox(np.random.SeedSequence(
                [int(seed), int(update_index), int(u), _SUBSET_TAG])))
            rows = np.sort(rng.choice(rows, size=index.cap, replace=False))
        out[i, :rows.shape[0]] = rows
    return out


__all__ = ["CAP_KEEP_FRACTION", "UNITS", "UnitIndex", "choose_cap", "unit_rows"]
