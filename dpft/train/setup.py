"""Builds what a run needs from its config: data tables, augmentation, model, loss, privacy.

Pure set-up, no training: `dpft train`, `dpft evaluate` and the demo share it, so a
checkpoint is always evaluated with the model, data and preprocessing it was trained with.
"""
from __future__ import annotations

import importlib
import logging
from typing import Any, Callable

import jax.numpy as jnp
import ml_collections

from dpft.errors import UsageError
from dpft.data.augment import AugmentConfig
from dpft.data.base import ExampleTable
from dpft.privacy import adapters, engine, keys
from dpft.privacy import plan as plan_lib
from dpft.train import validation
from dpft.train.config_base import RUN_OPTION_DEFAULTS

log = logging.getLogger(__name__)

# data.options keys used by the run set-up itself, not passed to the data set's loader.
RUN_OPTIONS = tuple(RUN_OPTION_DEFAULTS)


def data_options(config: ml_collections.ConfigDict) -> tuple[dict, dict]:
    """(loader options, run options) of `config.data.options`; run options left at None are dropped."""
    options = dict(config.data.options.to_dict()) if config.data.options is not None else {}
    run = {k: options.pop(k) for k in RUN_OPTIONS if k in options}
    return options, {k: v for k, v in run.items() if v is not None}


def train_split_name(config: ml_collections.ConfigDict) -> str:
    """The split trained on: `data.options.train_split` (default "train"; the demo's
    public pre-training uses "public")."""
    return str(data_options(config)[1].get("train_split", "train"))


def load_tables(config: ml_collections.ConfigDict) -> dict[str, ExampleTable]:
    """{split name: ExampleTable} of `config.data.name`, read from `config.data.root`.

    With `data.options.imbalance_fraction` (and `imbalance_attribute`, `imbalance_group`)
    the training split keeps that subgroup at the given fraction (imbalance studies).
    """
    from dpft import data

    options, run = data_options(config)
    tables = data.load_splits(str(config.data.name), config.data.root or None, **options)
    if "imbalance_fraction" in run:
        from dpft.data.subgroups import ImbalanceConfig, subsample_subgroup
        for key in ("imbalance_attribute", "imbalance_group"):
            if key not in run:
                raise UsageError(f"config.data.options.imbalance_fraction needs config.data.options.{key}")
        split = train_split_name(config)
        tables[split] = subsample_subgroup(tables[split], ImbalanceConfig(
            str(run["imbalance_attribute"]), str(run["imbalance_group"]), float(run["imbalance_fraction"]),
            seed=int(run.get("imbalance_seed", config.seed))))
    return tables


def attribute_report(config: ml_collections.ConfigDict, tables: dict[str, ExampleTable],
                     print_fn: Callable[[str], None] = print) -> dict[str, Any]:
    """Prints the per-attribute coverage of `tables` and checks the fairness attributes the run
    asks for (`data.options.attributes`, default per data set): none at all -> DataError, some rows
    without -> a loud warning. Returns the coverage record (`dpft.data.coverage.report`)."""
    from dpft.data import coverage

    requested = config.data.options.get("attributes", None) if config.data.options is not None else None
    return coverage.report(tables, str(config.data.name), requested, print_fn)


def augment_config(config: ml_collections.ConfigDict, *, channels: int = 3) -> AugmentConfig:
    """Training views and eval preprocessing from `config.data` (crop, flip, K, resolutions)."""
    d = config.data
    run = data_options(config)[1]
    crop = str(run.get("crop", "random_resized" if d.image_size >= 64 else "pad_crop")) if d.random_crop else "none"
    # Centre crop at eval only where training crops at random scales (ImageNet style); a
    # pad-and-crop (CIFAR style) or no crop trains at scale 1, so eval must see scale 1 too.
    eval_crop = float(run.get("eval_crop_fraction", 0.875 if crop == "random_resized" else 1.0))
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
    names = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if config.model.dtype not in names:
        raise UsageError(f"config.model.dtype={config.model.dtype!r}; choose from {', '.join(names)}")
    return names[config.model.dtype]


def build_model(config: ml_collections.ConfigDict, num_classes: int):
    """A fresh model, or the checkpoint at `config.model.checkpoint` with its head replaced."""
    from dpft import models

    dtype = compute_dtype(config)
    overrides = dict(config.model.get("overrides", {}) or {})
    if config.model.checkpoint:
        return models.load_pretrained(config.model.checkpoint, config.model.name, num_classes,
                                      seed=config.seed, dtype=dtype, **overrides)
    return models.create(config.model.name, num_classes, seed=config.seed, dtype=dtype, **overrides)


def per_view_loss(task: str) -> Callable:
    if task == "multiclass":
        return adapters.softmax_cross_entropy_loss
    if task == "multilabel":
        return adapters.sigmoid_binary_cross_entropy_loss
    raise UsageError(f"unknown task {task!r}")


def clipping_config(config: ml_collections.ConfigDict) -> engine.ClippingConfig:
    """The clipping of `config.privacy` ("none" for the non-private baseline)."""
    if not config.privacy.enabled:
        return engine.ClippingConfig(mode="none", clip_norm=1.0)
    return engine.ClippingConfig(mode=config.privacy.clipping, clip_norm=float(config.privacy.clip_norm))


def run_secret(config: ml_collections.ConfigDict) -> keys.RunSecret:
    """A fresh CSPRNG secret, or the insecure fixed one of `privacy.insecure_fixed_noise_seed` (>= 0).

    Not multi-host aware: the training loop draws it on process 0 and broadcasts it.
    """
    fixed = validation.insecure_fixed_noise_seed(config)
    if fixed is not None and int(fixed) >= 0:
        return keys.RunSecret.insecure_fixed(int(fixed))
    return keys.RunSecret.generate()


def privacy_plan(config: ml_collections.ConfigDict, num_examples: int, params: Any,
                 secret: keys.RunSecret) -> plan_lib.PrivacyPlan:
    """The run's privacy plan (`dpft.privacy.plan.make_plan`) from `config.privacy` and `config.train`."""
    p, t = config.privacy, config.train
    try:
        return plan_lib.make_plan(
            enabled=bool(p.enabled), num_examples=int(num_examples), batch_size=float(t.batch_size),
            num_updates=int(t.num_updates), clipping=clipping_config(config), params=params, secret=secret,
            epsilon=float(p.epsilon) if p.epsilon else None,
            noise_multiplier=float(p.noise_multiplier) if p.noise_multiplier else None,
            delta=float(p.delta) if p.delta else None, accountant=str(p.accountant),
            grad_method=str(t.get("grad_method", "auto")))
    except plan_lib.PlanError as e:
        raise UsageError(f"invalid privacy plan (config.privacy, config.train): {e}") from None
