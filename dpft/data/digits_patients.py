"""Embedded demo data with patients: the digits of `dpft.data.digits`, grouped into "patients" with
several images each, for the privacy-unit study (`dpft demo --units`, `config.privacy.unit`).

Within each split and subgroup (a patient's images are all upright or all rotated, as a patient's
X-rays share the patient's demographics), a seeded shuffle cuts the examples into patients with 1 to
`max_images_per_patient` images (uniform), so the splits stay patient-disjoint and the number of
images per patient varies as in CheXpert. Patient id "<split>-<n>"; images, labels, example ids and
the `group` attribute are those of `digits` with the same options.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from dpft.data import digits
from dpft.data.base import DatasetSpec, ExampleTable, check_patient_disjoint, from_records, options_from
from dpft.errors import DataError


@dataclasses.dataclass(frozen=True)
class DigitsPatientsOptions(digits.DigitsOptions):
    max_images_per_patient: int = 6  # a patient has 1..this many images (uniform)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.max_images_per_patient, bool) or not isinstance(self.max_images_per_patient, int) \
                or self.max_images_per_patient < 1:
            raise DataError(f"digits_patients.max_images_per_patient must be an int >= 1, "
                            f"got {self.max_images_per_patient!r}")


def patient_sizes(count: int, max_images: int, rng: np.random.Generator) -> list[int]:
    """Sizes (each 1..max_images, uniform) of consecutive patients covering `count` images."""
    sizes = []
    while sum(sizes) < count:
        sizes.append(int(min(rng.integers(1, max_images + 1), count - sum(sizes))))
    return sizes


def _with_patients(table: ExampleTable, max_images: int, rng: np.random.Generator) -> ExampleTable:
    records = [table[i] for i in range(len(table))]
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(r["attrs"]["group"], []).append(i)
    patient = 0
    for group in sorted(groups):
        order = rng.permutation(groups[group])
        start = 0
        for size in patient_sizes(len(order), max_images, rng):
            for i in order[start:start + size]:
                records[i]["patient_id"] = f"{table.split}-{patient}"
            start += size
            patient += 1
    return from_records(records, split=table.split, meta=dataclasses.replace(table.meta, name="digits_patients"))


def load_splits(root: str | None = None, **options: Any) -> dict[str, ExampleTable]:
    """The splits of `digits` (same options) with patients (module doc)."""
    opts = options_from(DigitsPatientsOptions, options, "digits_patients")
    base = {f.name: getattr(opts, f.name) for f in dataclasses.fields(digits.DigitsOptions)}
    rng = np.random.default_rng([opts.seed, 0x5041])  # "PA": apart from the digits' own streams
    splits = {name: _with_patients(t, opts.max_images_per_patient, rng)
              for name, t in digits.load_splits(root, **base).items()}
    check_patient_disjoint({n: [t[i]["patient_id"] for i in range(len(t))] for n, t in splits.items()},
                           "digits_patients")
    return splits


DATASET = DatasetSpec(load_splits, DigitsPatientsOptions, required_attributes=(), needs_root=False,
                      has_patients=True, run_seed_options=("minority_seed",))
