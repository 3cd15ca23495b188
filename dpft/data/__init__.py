"""dpft.data: data sets as `ExampleTable`s and the grain input pipeline.

`load_splits(name, root, **options)` -> {split: ExampleTable} for name in DATASETS:
  chexpert, mimic_cxr (path-backed, multi-label, subgroup attributes),
  imagenet, places365 (prepared TFDS dirs, read without TensorFlow),
  digits (embedded, sklearn; with a rotated minority subgroup).
Training/eval batches: `dpft.data.pipeline.TrainIterator`, `dpft.data.pipeline.eval_batches`.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from dpft.data.base import DataError, ExampleTable, TableMeta

DATASETS: dict[str, str] = {
    "chexpert": "dpft.data.chexpert",
    "mimic_cxr": "dpft.data.mimic_cxr",
    "imagenet": "dpft.data.imagenet",
    "places365": "dpft.data.places365",
    "digits": "dpft.data.digits",
}


# The options dataclass of each data set's loader, and keyword arguments it takes beside them.
OPTIONS_CLASSES: dict[str, str] = {
    "chexpert": "CheXpertOptions",
    "mimic_cxr": "MimicOptions",
    "imagenet": "TfdsOptions",
    "places365": "TfdsOptions",
    "digits": "DigitsOptions",
}
EXTRA_OPTIONS: dict[str, dict[str, Any]] = {
    "chexpert": {"index_dir": None},  # `dpft prepare --out DIR` -> DIR/index: start from the index
    "mimic_cxr": {"index_dir": None},
}


def option_defaults(name: str) -> dict[str, Any]:
    """{option: default} of every option data set `name`'s loader takes (its options dataclass
    fields, plus `index_dir` for the indexed data sets); {} for an unknown name."""
    if name not in DATASETS:
        return {}
    module = importlib.import_module(DATASETS[name])
    if name == "places365":
        module = importlib.import_module(DATASETS["imagenet"])
    cls = getattr(module, OPTIONS_CLASSES[name])
    out = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())  # type: ignore[misc]
           for f in dataclasses.fields(cls)}
    return {**out, **EXTRA_OPTIONS.get(name, {})}


def load_splits(name: str, root: str | None = None, **options: Any) -> dict[str, ExampleTable]:
    """All splits of data set `name` at `root` (options: the data set module's Options class)."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose from {sorted(DATASETS)}")
    if root is None and name != "digits":
        raise DataError(f"data set {name!r} needs a data directory (root)")
    return importlib.import_module(DATASETS[name]).load_splits(root, **options)


__all__ = ["DATASETS", "DataError", "ExampleTable", "TableMeta", "load_splits", "option_defaults"]
