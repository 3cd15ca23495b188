"""dpft.data: data sets as `ExampleTable`s and the grain input pipeline.

`load_splits(name, root, **options)` -> {split: ExampleTable} for name in DATASETS:
  chexpert, mimic_cxr (path-backed, multi-label, subgroup attributes),
  imagenet, places365 (prepared TFDS dirs, read without TensorFlow),
  digits (embedded, sklearn; with a rotated minority subgroup), digits_patients (the same, grouped
  into patients of 1-6 images: the privacy-unit demo), canaries (`dpft audit`'s Dirac canaries).
Training/eval batches: `dpft.data.pipeline.TrainIterator`, `dpft.data.pipeline.eval_batches`.
"""
from __future__ import annotations

from typing import Any

from dpft.errors import DataError
from dpft.data.base import INDEX_OPTION, DatasetSpec, ExampleTable, TableMeta, read_index
from dpft.registry import Registry

#: The one data set registry: name -> "module:DATASET" (a `DatasetSpec`). Adding a data set is
#: one new module with a `DATASET = DatasetSpec(load_splits, OptionsClass, required_attributes=...)`
#: and one line here; everything dpft knows about it is in that spec.
DATASETS = Registry("data set", {
    "chexpert": "dpft.data.chexpert:DATASET",
    "mimic_cxr": "dpft.data.mimic_cxr:DATASET",
    "imagenet": "dpft.data.imagenet:DATASET",
    "places365": "dpft.data.places365:DATASET",
    "digits": "dpft.data.digits:DATASET",
    "digits_patients": "dpft.data.digits_patients:DATASET",
    "canaries": "dpft.data.canaries:DATASET",
})


def dataset(name: str) -> DatasetSpec:
    """The registered `DatasetSpec` of `name` (UsageError naming the choices if unknown; TypeError
    if its module registers something else)."""
    spec = DATASETS.get(name)
    if not isinstance(spec, DatasetSpec):
        raise TypeError(f"data set {name!r}: {DATASETS.target(name)} is a {type(spec).__name__}, "
                        f"not a dpft.data.base.DatasetSpec")
    return spec


def option_defaults(name: str) -> dict[str, Any]:
    """{option: default} of every option data set `name`'s loader takes (its options dataclass
    fields, plus `index_dir` for the indexed data sets); {} for an unknown name."""
    return dataset(name).option_defaults() if name in DATASETS else {}


def path_options(name: str) -> tuple[str, ...]:
    """The options of data set `name` that are paths (`DatasetSpec.option_paths`); () for an unknown name."""
    return dataset(name).option_paths() if name in DATASETS else ()


def load_splits(name: str, root: str | None = None, **options: Any) -> dict[str, ExampleTable]:
    """All splits of data set `name` at `root` (options: the data set's options class fields, and
    `index_dir` for an indexed data set: read `dpft prepare --out DIR`'s DIR/index instead)."""
    spec = dataset(name)
    if root is None and spec.needs_root:
        raise DataError(f"data set {name!r} needs a data directory (root)")
    index_dir = options.pop(INDEX_OPTION, None) if spec.indexed else None
    if index_dir is not None:
        return read_index(index_dir, spec.index_options(name, options))
    return spec.load_splits(root, **options)


__all__ = ["DATASETS", "DatasetSpec", "DataError", "ExampleTable", "TableMeta", "dataset", "load_splits",
           "option_defaults", "path_options"]
