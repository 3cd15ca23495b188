"""`dpft audit`'s data: Dirac canary images, made in memory (no file, no download).

Canary i (0 <= i < m) is a black S x S grey image with the one pixel i (row-major) white, S the
smallest of `SIZES` with S^2 >= m. Each canary is in the training set independently with
probability 1/2 (`canary_inclusion(m, seed)`, public); the "train" split holds the included ones,
each as `images_per_canary` identical images (a canary patient when > 1: patient_id = str(i)).
The "test" split is one image of each of the first `TEST_CANARIES` canaries (predictions at the end
of the run; the audit reads the parameters, not predictions). Label 1 ("canary") everywhere.
With `dpft.models.canary`, whose logit is <w, pixel i>, canary i's gradient lies on its own
coordinate of w (the audit's statistic, `dpft.privacy.audit`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from dpft.data.base import DatasetSpec, ExampleTable, TableMeta, from_records, options_from
from dpft.errors import DataError

#: Image sizes [pixels] of the canary images (and the `canary_linear_<S>` models): S^2 canaries at most.
SIZES = (32, 64, 128)
MAX_CANARIES = SIZES[-1] ** 2
TEST_CANARIES = 16


@dataclasses.dataclass(frozen=True)
class CanaryOptions:
    num_canaries: int = 1000  # m
    images_per_canary: int = 1  # k
    seed: int = 0  # public seed of the inclusion coins

    def __post_init__(self) -> None:
        if not (isinstance(self.num_canaries, int) and 2 <= self.num_canaries <= MAX_CANARIES):
            raise DataError(f"canaries.num_canaries must be an int in [2, {MAX_CANARIES}], got {self.num_canaries!r}")
        if not (isinstance(self.images_per_canary, int) and self.images_per_canary >= 1):
            raise DataError(f"canaries.images_per_canary must be an int >= 1, got {self.images_per_canary!r}")


def image_size(num_canaries: int) -> int:
    """S: the smallest of SIZES with S^2 >= num_canaries (DataError beyond MAX_CANARIES)."""
    for s in SIZES:
        if s * s >= num_canaries:
            return s
    raise DataError(f"canaries: at most {MAX_CANARIES} canaries (images of {SIZES[-1]}^2 pixels), got {num_canaries}")


def canary_inclusion(num_canaries: int, seed: int) -> np.ndarray:
    """bool [m]: canary i is in the training set (independent fair coins from `seed`)."""
    return np.random.default_rng([seed, 0xA0D1]).random(num_canaries) < 0.5


def canary_image(i: int, size: int) -> np.ndarray:
    """uint8 [size, size]: pixel i (row-major) 255, the rest 0."""
    img = np.zeros(size * size, np.uint8)
    img[i] = 255
    return img.reshape(size, size)


def load_splits(root: str | None = None, **options: Any) -> dict[str, ExampleTable]:
    """{"train": the included canaries, k images each; "test": the first TEST_CANARIES canaries}."""
    opts = options_from(CanaryOptions, options, "canaries")
    m, k, size = opts.num_canaries, opts.images_per_canary, image_size(opts.num_canaries)
    meta = TableMeta(name="canaries", task="multiclass", class_names=("other", "canary"))

    def record(i: int, j: int) -> dict:
        return {"example_id": i * k + j, "patient_id": str(i), "image": canary_image(i, size), "label": 1,
                "attrs": {}}

    included = np.flatnonzero(canary_inclusion(m, opts.seed))
    if len(included) == 0:
        raise DataError(f"canaries: no canary of {m} is included (seed {opts.seed}); use more canaries")
    train = [record(int(i), j) for i in included for j in range(k)]
    test = [record(i, 0) for i in range(min(m, TEST_CANARIES))]
    return {"train": from_records(train, split="train", meta=meta),
            "test": from_records(test, split="test", meta=meta)}


DATASET = DatasetSpec(load_splits, CanaryOptions, required_attributes=(), needs_root=False, has_patients=True)
