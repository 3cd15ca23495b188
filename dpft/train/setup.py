"""Builds what a run needs from its config: data tables, augmentation, model, loss, privacy.

Pure set-up, no training: `dpft train`, `dpft evaluate` and the demo share it, so a
checkpoint is always evaluated with the model, data and preprocessing it was trained with.
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
import math
from typing import Any, Callable

import jax.numpy as jnp
import ml_collections

from dpft.cli import UsageError
from dpft.data.augment import AugmentConfig
from dpft.data.base import ExampleTable
from dpft.privacy import accounting, adapters, bookkeeping, engine

log = logging.getLogger(__name__)

DATASETS = {
    "digits": "dpft.data.digits",
    "chexpert": "dpft.data.chexpert",
    "mimic_cxr": "dpft.data.mimic_cxr",
    "imagenet": "dpft.data.imagenet",
    "places365": "dpft.data.places365",
}


# data.options keys used by the run set-up itself, not passed to the data set's loader.
RUN_OPTIONS = ("train_split", "crop", "eval_crop_fraction", "worker_processes", "imbalance_attribute", "imbalance_group", "imbalance_fraction",
               "imbalance_seed")


def data_options(config: ml_collections.ConfigDict) -> tuple[dict, dict]:
    """(loader options, run options) of `config.data.options`."""
    options = dict(config.data.options.to_dict()) if config.data.options is not None else {}
    run = {k: options.pop(k) for k in RUN_OPTIONS if k in options}
    return options, run


def train_split_name(config: ml_collections.ConfigDict) -> str:
    """The split trained on: `data.options.train_split` (default "train"; the demo's
    public pre-training uses "public")."""
    return str(data_options(config)[1].get("train_split", "train"))


def load_tables(config: ml_collections.ConfigDict) -> dict[str, ExampleTable]:
    """{split name: ExampleTable} of `config.data.name`, read from `config.data.root`.

    With `data.options.imbalance_fraction` (and `imbalance_attribute`, `imbalance_group`)
    the training split keeps that subgroup at the given fraction (imbalance studies).
    """
    name = config.data.name
    if name not in DATASETS:
        raise UsageError(f"config.data.name={name!r} unknown; choose from {', '.join(DATASETS)}")
    module = importlib.import_module(DATASETS[name])
    options, run = data_options(config)
    tables = module.load_splits(config.data.root or None, **options)
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


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
    """The privacy parameters of a run, fixed before training (all public)."""

    enabled: bool
    num_examples: int  # N, private training examples
    sampling_rate: float  # q = B / N
    expected_batch_size: float  # B
    noise_multiplier: float  # sigma (0 when not private)
    clip_norm: float  # C
    delta: float
    target_epsilon: float | None
    num_updates: int  # updates that will run (<= config.train.num_updates if the budget binds)
    accountant: str

    def epsilon_after(self, updates: int) -> float:
        """Epsilon spent after `updates` updates of this plan (inf when not private)."""
        if not self.enabled:
            return math.inf
        if updates <= 0:
            return 0.0
        return accounting.compute_epsilon(self.sampling_rate, self.noise_multiplier, updates,
                                          self.delta, accountant=self.accountant)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _max_updates_within(target: float, q: float, sigma: float, delta: float, limit: int, accountant: str) -> int:
    """Largest T <= limit with epsilon(q, sigma, T, delta) <= target (binary search)."""
    eps = lambda t: accounting.compute_epsilon(q, sigma, t, delta, accountant=accountant)  # noqa: E731
    if eps(limit) <= target:
        return limit
    lo, hi = 0, limit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if eps(mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo


def privacy_plan(config: ml_collections.ConfigDict, num_examples: int) -> PrivacyPlan:
    """sigma calibrated from the target epsilon (or given), q = B/N, delta = 1/N by default.

    When both sigma and a target epsilon are given, the run is cut to the largest number
    of updates whose epsilon stays within the target: a run never exceeds its budget.
    """
    p, t = config.privacy, config.train
    n = int(num_examples)
    b = float(t.batch_size)
    if b > n:
        raise UsageError(f"config.train.batch_size={t.batch_size} is larger than the training set ({n} examples)")
    q = b / n
    updates = int(t.num_updates)
    if not p.enabled:
        return PrivacyPlan(False, n, q, b, 0.0, 0.0, 0.0, None, updates, p.accountant)
    delta = float(p.delta) if p.delta else 1.0 / n
    target = float(p.epsilon) if p.epsilon and p.epsilon > 0 else None
    if p.noise_multiplier and p.noise_multiplier > 0:
        sigma = float(p.noise_multiplier)
        if target is not None:
            updates = _max_updates_within(target, q, sigma, delta, updates, p.accountant)
            if updates < 1:
                raise UsageError(f"config.privacy.noise_multiplier={sigma} cannot run one update within "
                                 f"epsilon={target} (q={q:.4g}, delta={delta:.3g})")
    else:
        if target is None:
            raise UsageError("config.privacy.epsilon must be > 0 when privacy is enabled and "
                             "config.privacy.noise_multiplier is 0")
        try:
            sigma = accounting.calibrate_noise_multiplier(target, q, updates, delta, accountant=p.accountant)
        except ValueError as e:
            raise UsageError(f"config.privacy.epsilon={target}: {e}") from None
    return PrivacyPlan(True, n, q, b, sigma, float(p.clip_norm), delta, target, updates, p.accountant)


def grad_method(config: ml_collections.ConfigDict) -> str:
    """`train.grad_method` with "auto" resolved: "bookkeeping" for flat/automatic clipping
    (every dpft model is tapped), "vmap" for per_layer clipping and non-private runs."""
    method = str(config.train.get("grad_method", "auto"))
    if method != "auto":
        return method
    private = bool(config.privacy.enabled) and config.privacy.clipping in bookkeeping.BK_MODES
    return "bookkeeping" if private else "vmap"


def clipping_config(config: ml_collections.ConfigDict) -> engine.ClippingConfig:
    if not config.privacy.enabled:
        return engine.ClippingConfig(mode="none", clip_norm=1.0)
    return engine.ClippingConfig(mode=config.privacy.clipping, clip_norm=float(config.privacy.clip_norm))
