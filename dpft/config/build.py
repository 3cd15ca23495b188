"""What a run config builds: its data tables, augmentation and model (no training, no privacy).

`dpft train`, `dpft evaluate` and the demo share it, so a checkpoint is always evaluated with
the model, data and preprocessing it was trained with.
"""
from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
import ml_collections
import numpy as np

from dpft.data.augment import AugmentConfig
from dpft.data.base import ExampleTable
from dpft.errors import UsageError

#: config.model.dtype -> the compute dtype (params stay float32); also `dpft audit --dtype`.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def loader_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The keyword options of the data set's loader: `config.data.options` as a dict, with the run's
    `seed` for each of the data set's `run_seed_options` left at -1."""
    from dpft import data

    options = dict(config.data.options.to_dict()) if config.data.options is not None else {}
    for name in data.dataset(str(config.data.name)).run_seed_options:
        if int(options.get(name, -1)) == -1:
            options[name] = int(config.seed)
    return options


def bad_image_policy(config: ml_collections.ConfigDict) -> str:
    """What the training pipeline does with an unreadable image: the loader option `on_bad_image` of
    the data sets that read image files ("error" | "skip"); "error" for those without the option
    (embedded data, which has no files to miss)."""
    options = config.data.options
    return str(options.on_bad_image) if "on_bad_image" in options else "error"


def train_split_name(config: ml_collections.ConfigDict) -> str:
    """The split trained on: `data.train_split` (default "train"; the demo's public pre-training
    uses "public")."""
    return str(config.data.train_split)


def load_tables(config: ml_collections.ConfigDict) -> dict[str, ExampleTable]:
    """{split name: ExampleTable} of `config.data.name`, read from `config.data.root`.

    With `data.imbalance.fraction` > 0 (and `data.imbalance.attribute`, `.group`) the training
    split keeps that subgroup at the given fraction (imbalance studies).
    """
    from dpft import data

    tables = data.load_splits(str(config.data.name), config.data.root or None, **loader_options(config))
    imb = config.data.imbalance
    if float(imb.fraction) > 0:
        from dpft.data.subgroups import ImbalanceConfig, subsample_subgroup
        for key in ("attribute", "group"):
            if not imb[key]:
                raise UsageError(f"config.data.imbalance.fraction={imb.fraction} needs config.data.imbalance.{key}")
        split = train_split_name(config)
        seed = int(imb.seed) if int(imb.seed) >= 0 else int(config.seed)
        tables[split] = subsample_subgroup(tables[split], ImbalanceConfig(
            str(imb.attribute), str(imb.group), float(imb.fraction), seed=seed))
    return tables


def patient_ids(config: ml_collections.ConfigDict, table: ExampleTable) -> np.ndarray | None:
    """The patient id of every row of `table` where `config.data.name` has patients
    (`DatasetSpec.has_patients`), else None (one example per unit; no records are read)."""
    from dpft import data

    return table.column("patient_id") if data.dataset(str(config.data.name)).has_patients else None


def unit_index(config: ml_collections.ConfigDict, table: ExampleTable) -> Any:
    """The privacy units of the training `table` (`dpft.privacy.units.UnitIndex`): None for
    `privacy.unit="example"` (every row is a unit); the patients, with `privacy.unit_cap` (0 = from the
    data), for "patient". UsageError naming the field when the data set has no patient ids or a row
    has none; a patient in two splits is refused by the loaders (`dpft.data.base.check_patient_disjoint`)."""
    from dpft import data
    from dpft.privacy import units

    unit, cap = str(config.privacy.unit), int(config.privacy.unit_cap)
    if unit == "example":
        return None
    name = str(config.data.name)
    if not data.dataset(name).has_patients:
        raise UsageError(f"config.privacy.unit={unit!r}: data set {name!r} has one example per patient (no patient "
                         f"ids), so its unit is the example; use privacy.unit='example'")
    try:
        return units.UnitIndex.from_patient_ids(table.column("patient_id"), cap,
                                                where=f"{name}/{table.split} (config.privacy.unit={unit!r})")
    except ValueError as e:
        raise UsageError(str(e)) from None


def num_units(config: ml_collections.ConfigDict, table: ExampleTable) -> int:
    """N of the privacy plan: rows of `table` (example-level) or its patients (`unit_index`)."""
    index = unit_index(config, table)
    return len(table) if index is None else index.num_units


def attribute_report(config: ml_collections.ConfigDict, tables: dict[str, ExampleTable],
                     print_fn: Callable[[str], None] = print) -> dict[str, Any]:
    """Prints the per-attribute coverage of `tables` and checks the fairness attributes the run
    asks for (`data.attributes`, default per data set): none at all -> DataError, some rows
    without -> a loud warning. Returns the coverage record (`dpft.data.coverage.report`)."""
    from dpft.data import coverage

    return coverage.report(tables, str(config.data.name), config.data.attributes, print_fn)


def augment_config(config: ml_collections.ConfigDict, *, channels: int = 3) -> AugmentConfig:
    """Training views and eval preprocessing from `config.data` (crop, flip, K, resolutions)."""
    d = config.data
    crop = str(d.crop) if str(d.crop) != "auto" else ("random_resized" if d.image_size >= 64 else "pad_crop")
    crop = crop if d.random_crop else "none"
    # Centre crop at eval only where training crops at random scales (ImageNet style); a
    # pad-and-crop (CIFAR style) or no crop trains at scale 1, so eval must see scale 1 too.
    eval_crop = float(d.eval_crop_fraction) or (0.875 if crop == "random_resized" else 1.0)
    return AugmentConfig(
        eval_crop_fraction=eval_crop,
        image_size=int(d.image_size),
        eval_image_size=int(d.eval_image_size or d.image_size),
        channels=channels,
        crop=crop,
        flip=bool(d.random_flip),
        augmult=int(d.augmult),
    )


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
    """The jax dtype of `config.model.dtype` (`COMPUTE_DTYPES`)."""
    if config.model.dtype not in COMPUTE_DTYPES:
        raise UsageError(f"config.model.dtype={config.model.dtype!r}; choose from {', '.join(COMPUTE_DTYPES)}")
    return COMPUTE_DTYPES[config.model.dtype]


def build_model(config: ml_collections.ConfigDict, num_classes: int):
    """A fresh model, or the checkpoint at `config.model.checkpoint` with its head replaced."""
    from dpft import models

    dtype = compute_dtype(config)
    if config.model.checkpoint:
        return models.load_pretrained(config.model.checkpoint, config.model.name, num_classes,
                                      seed=config.seed, dtype=dtype)
    return models.create(config.model.name, num_classes, seed=config.seed, dtype=dtype)
