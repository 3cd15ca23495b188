"""ImageNet (ILSVRC 2012) from a prepared TFDS `imagenet2012` directory, read without TensorFlow.

Reading uses `builder.as_data_source` (array_record, random access, grain-compatible; images
decoded with PIL on access). The data dir may be a `gs://` URL: TFDS reads its metadata through
etils.epath (gcsfs) and array_record (>= 0.8) reads the record files with its own GCS reader
(riegeli::GcsReader, google-cloud-cpp, Application Default Credentials as on a TPU VM). Other
object stores (s3://, az://) are refused: array_record has no reader for them; mount them. Preparing `imagenet2012` with tensorflow-datasets 4.9.10 needs
TensorFlow (its builder uses `tf.io.gfile` and TF image ops), which dpft does not install,
so dpft requires an already prepared data dir and says what to run otherwise.

Splits as in the DP fine-tuning papers: "train" = TFDS train minus its last `holdout`
(10,000) examples, "validation" = those last `holdout`, "test" = the official validation set.
Example id: position in TFDS train for train/validation, (size of TFDS train) + position for test.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from dpft import paths
from dpft.errors import DataError
from dpft.data.base import DatasetSpec, options_from
from dpft.data.base import ExampleTable, TableMeta, check_nonempty

NAME = "imagenet2012"


@dataclasses.dataclass(frozen=True)
class TfdsOptions:
    holdout: int = 10_000  # examples at the end of TFDS train that form "validation"


def prepare_command(name: str, data_dir: str) -> str:
    manual = " --manual_dir <folder with the official tars>" if name == NAME else ""
    return (f"pip install tensorflow-cpu tensorflow-datasets==4.9.10 apache-beam importlib_resources mlcroissant "
            f"(in a separate environment; see docs/data.md, 'TFDS data'), then "
            f"tfds build {name} --data_dir {data_dir}{manual} --file_format array_record")


def find_builder_dir(data_dir: str, name: str) -> str:
    """`<data_dir>/<name>/<latest version>` holding dataset_info.json, else a DataError with instructions."""
    base = paths.join(data_dir, name)
    versions = []
    if paths.isdir(base):
        for v in paths.listdir(base):
            parts = v.split(".")
            if len(parts) == 3 and all(p.isdigit() for p in parts) and \
                    paths.exists(paths.join(base, v, "dataset_info.json")):
                versions.append(tuple(int(p) for p in parts))
    if not versions:
        raise DataError(f"{data_dir}: no prepared TFDS data set '{name}' (expected {base}/<version>/"
                        f"dataset_info.json). Preparing needs TensorFlow: {prepare_command(name, data_dir)}")
    return paths.join(base, ".".join(str(p) for p in max(versions)))


class _Indexed:
    """(position + offset, item) pairs of a random-access source."""

    def __init__(self, source: Sequence[Any], offset: int) -> None:
        self.source, self.offset = source, offset

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return int(i) + self.offset, self.source[int(i)]


def tfds_record(item: tuple[int, dict]) -> dict:
    """(example id, TFDS example {"image": uint8 [H, W, 3], "label": int, ...}) -> dpft record."""
    eid, ex = item
    return {"example_id": eid, "patient_id": str(eid), "image": np.asarray(ex["image"], np.uint8),
            "label": int(ex["label"]), "attrs": {}}


def split_positions(n_train: int, holdout: int) -> tuple[np.ndarray, np.ndarray]:
    """(train positions [0, n - holdout), validation positions [n - holdout, n)) of TFDS train."""
    if not 0 <= holdout < n_train:
        raise DataError(f"holdout {holdout} must be in [0, {n_train}) (size of TFDS train)")
    return np.arange(0, n_train - holdout), np.arange(n_train - holdout, n_train)


def load_tfds_splits(data_dir: str, name: str, test_split: str, holdout: int) -> dict[str, ExampleTable]:
    """Train/validation from TFDS train (last `holdout` held out), test from `test_split`."""
    import tensorflow_datasets as tfds

    if paths.is_remote(data_dir) and paths.scheme(data_dir) != "gs":
        raise DataError(f"{data_dir}: TFDS array_record files can be read from gs:// (array_record's own GCS "
                        f"reader) or a local/mounted path, not {paths.scheme(data_dir)}://; mount the bucket "
                        f"(e.g. s3fs / blobfuse2) and pass the mount point")
    builder_dir = find_builder_dir(data_dir, name)
    try:
        builder = tfds.builder_from_directory(builder_dir)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{builder_dir}: cannot open TFDS data set ({e})") from e
    fmt = str(getattr(builder.info.file_format, "value", builder.info.file_format))
    if "array_record" not in fmt:
        raise DataError(f"{builder_dir}: stored as {fmt!r}; random access needs array_record. "
                        f"Rebuild: {prepare_command(name, data_dir)}")
    for s in ("train", test_split):
        if s not in builder.info.splits:
            raise DataError(f"{builder_dir}: split {s!r} missing (has {list(builder.info.splits)})")
    train_src = builder.as_data_source(split="train")
    test_src = builder.as_data_source(split=test_split)
    names = tuple(builder.info.features["label"].names)
    meta = TableMeta(name=name, task="multiclass", class_names=names)
    tr, va = split_positions(len(train_src), holdout)
    train_ix, test_ix = _Indexed(train_src, 0), _Indexed(test_src, len(train_src))
    splits = {"train": ExampleTable(train_ix, split="train", meta=meta, transform=tfds_record, indices=tr),
              "validation": ExampleTable(train_ix, split="validation", meta=meta, transform=tfds_record, indices=va),
              "test": ExampleTable(test_ix, split="test", meta=meta, transform=tfds_record)}
    if holdout == 0:
        del splits["validation"]
    check_nonempty(splits, f"{name} at {builder_dir}")
    return splits


def load_splits(root: str, **options: Any) -> dict[str, ExampleTable]:
    """{"train", "validation", "test"} of ImageNet from the TFDS data dir `root`."""
    opts = options_from(TfdsOptions, options, NAME)
    return load_tfds_splits(root, NAME, "validation", opts.holdout)


DATASET = DatasetSpec(load_splits, TfdsOptions, required_attributes=())  # no subgroup attributes
