"""Embedded demo data: scikit-learn's `load_digits` (1,797 8x8 grey digits, no download).

Images are scaled to uint8, upsampled (bilinear) to `image_size` and repeated to
`channels`. A synthetic minority subgroup: digits rotated by `rotation` degrees (90 by
default; a rotated 6 resembles no upright digit and a rotated 9 resembles a 6, so a model
trained mostly on upright digits does badly on it), attribute `group` in {majority, minority}.

Splits (a seeded permutation cut by `split_fractions`): "public" (for non-private
pre-training, minority share `public_minority_fraction`, default 0), "train" (the private
split for DP fine-tuning, minority share `minority_fraction` via imbalance subsampling),
"validation" and "test" (minority share `eval_minority_fraction`, default 0.5).
Example id = index in `load_digits()`; patient id = str(example id).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from PIL import Image

from dpft.errors import DataError
from dpft.data.base import DatasetSpec, options_from
from dpft.data.base import ExampleTable, TableMeta, check_nonempty, from_records
from dpft.data.subgroups import ImbalanceConfig, subsample_subgroup

SPLITS = ("public", "train", "validation", "test")
ROTATIONS = (90, 180, 270)


@dataclasses.dataclass(frozen=True)
class DigitsOptions:
    image_size: int = 32
    channels: int = 3
    rotation: int = 90
    split_fractions: tuple[float, float, float, float] = (0.2, 0.5, 0.1, 0.2)  # public, train, val, test
    minority_fraction: float = 0.1  # share of the minority in the private train split
    eval_minority_fraction: float = 0.5
    public_minority_fraction: float = 0.0
    seed: int = 0  # the split and the evaluation splits' minority
    #: Seed of the train split's minority subsample; -1 = the run's `seed` (`DatasetSpec.run_seed_options`:
    #: each seed of a study draws its own minority examples), or `seed` where no run resolves it.
    minority_seed: int = -1

    def __post_init__(self) -> None:
        if self.rotation not in ROTATIONS:
            raise DataError(f"digits.rotation must be one of {ROTATIONS}, got {self.rotation!r}")
        if self.channels not in (1, 3) or self.image_size < 8:
            raise DataError(f"digits: channels in (1, 3) and image_size >= 8 required, "
                            f"got {self.channels}, {self.image_size}")
        f = tuple(float(x) for x in self.split_fractions)
        if len(f) != 4 or min(f) <= 0 or abs(sum(f) - 1) > 1e-6:
            raise DataError(f"digits.split_fractions must be 4 positive numbers summing to 1, got {self.split_fractions}")
        object.__setattr__(self, "split_fractions", f)
        if isinstance(self.minority_seed, bool) or not isinstance(self.minority_seed, int) or self.minority_seed < -1:
            raise DataError(f"digits.minority_seed must be an int >= -1, got {self.minority_seed!r}")
        for name in ("minority_fraction", "eval_minority_fraction", "public_minority_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise DataError(f"digits.{name} must be in [0, 1), got {getattr(self, name)!r}")


def digit_images(image_size: int, channels: int, rotation: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits: (uint8 [N, S, S, C], int labels [N]), rotated counter-clockwise by `rotation`."""
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    if rotation:
        imgs = np.rot90(imgs, k=rotation // 90, axes=(1, 2))
    out = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(x)).resize((image_size, image_size),
                                                                               Image.BILINEAR)) for x in imgs])
    out = np.repeat(out[..., None], channels, axis=-1)
    return out, d.target.astype(np.int64)


def _split_records(ids: np.ndarray, minority: np.ndarray, upright: np.ndarray, rotated: np.ndarray,
                   labels: np.ndarray) -> list[dict]:
    return [{"example_id": int(i), "patient_id": str(int(i)),
             "image": rotated[i] if m else upright[i], "label": int(labels[i]),
             "attrs": {"group": "minority" if m else "majority"}} for i, m in zip(ids, minority)]


def load_splits(root: str | None = None, **options: Any) -> dict[str, ExampleTable]:
    """{"public", "train", "validation", "test"} (root is ignored: the data ships with sklearn)."""
    opts = options_from(DigitsOptions, options, "digits")
    upright, labels = digit_images(opts.image_size, opts.channels)
    rotated, _ = digit_images(opts.image_size, opts.channels, opts.rotation)
    n = len(labels)
    rng = np.random.default_rng(opts.seed)
    perm = rng.permutation(n)
    cuts = np.round(np.cumsum(opts.split_fractions)[:-1] * n).astype(int)
    parts = dict(zip(SPLITS, np.split(perm, cuts)))
    meta = TableMeta(name="digits", task="multiclass", class_names=tuple(str(i) for i in range(10)),
                     eval_tasks=(), attribute_names=("group",))
    share = {"public": opts.public_minority_fraction, "train": 0.5 if opts.minority_fraction > 0 else 0.0,
             "validation": opts.eval_minority_fraction, "test": opts.eval_minority_fraction}
    splits = {}
    for name, ids in parts.items():
        ids = np.sort(ids)
        minority = np.zeros(len(ids), bool)
        minority[rng.permutation(len(ids))[:int(round(share[name] * len(ids)))]] = True
        splits[name] = from_records(_split_records(ids, minority, upright, rotated, labels), split=name, meta=meta)
    if opts.minority_fraction > 0:
        seed = opts.minority_seed if opts.minority_seed >= 0 else opts.seed
        splits["train"] = subsample_subgroup(splits["train"], ImbalanceConfig(
            "group", "minority", opts.minority_fraction, seed=seed + 1))
    check_nonempty(splits, "digits")
    return splits


# `group` is a synthetic subgroup for the demo, not a demographic a run must have.
DATASET = DatasetSpec(load_splits, DigitsOptions, required_attributes=(), needs_root=False,
                      run_seed_options=("minority_seed",))
