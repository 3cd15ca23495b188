"""Check a run config before anything is compiled or loaded.

`validate(config, num_examples=..., num_devices=...)` collects every problem and raises one
`dpft.errors.UsageError` whose message names each offending field and its value, e.g.
"config.train.physical_batch_size=100 is not a multiple of config.train.microbatch_size=16".
Warnings (allowed but weakening) are issued with `warnings.warn` and also returned.

Every number in a config must be finite (NaN and inf are refused wherever they appear:
`nan < 0` is false, so range checks alone would let NaN through), and a given noise
multiplier must lie in the range the accountant handles (`SIGMA_RANGE`).
Also here: `same_value` (config comparison for resuming, NaN-safe) and the guards that stop a
run whose loss, gradient or parameters became non-finite (`check_finite_update`,
`check_finite_trees`).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Iterator, Mapping

import ml_collections

from dpft import paths
from dpft.config.base import CROPS
from dpft.data import DATASETS
from dpft.errors import ConfigError, NonFiniteError, UsageError
from dpft.models import registry as models_registry
from dpft.privacy import clipping
from dpft.privacy.accounting import ACCOUNTANTS, SIGMA_RANGE
from dpft.privacy.plan import GRAD_METHOD_CHOICES as GRAD_METHODS

# Choices come from where they are implemented (the registries and the privacy modules).
DTYPES = ("float32", "bfloat16")
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "warmup_cosine")
EVAL_PARAMS = ("ema", "raw", "polyak")


def _get(config: ml_collections.ConfigDict, path: str) -> Any:
    node: Any = config
    for part in path.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise KeyError(path)
        node = node[part]
    return node


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class _Checker:
    """Accumulates 'config.<field>=<value> <problem>' messages."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.errors: list[str] = []

    def value(self, path: str) -> Any:
        try:
            return _get(self.config, path)
        except KeyError:
            self.errors.append(f"config.{path} is missing")
            return _MISSING

    def add(self, path: str, value: Any, problem: str) -> None:
        self.errors.append(f"config.{path}={value!r} {problem}")

    def choice(self, path: str, choices: tuple[str, ...]) -> Any:
        v = self.value(path)
        if v is not _MISSING and v not in choices:
            self.add(path, v, f"is not one of {', '.join(choices)}")
        return v

    def integer(self, path: str, minimum: int | None = None) -> Any:
        v = self.value(path)
        if v is _MISSING:
            return v
        if not _is_int(v):
            self.add(path, v, "must be an integer")
            return _MISSING
        if minimum is not None and v < minimum:
            self.add(path, v, f"must be >= {minimum}")
            return _MISSING
        return v

    def number(self, path: str) -> Any:
        v = self.value(path)
        if v is _MISSING:
            return v
        if not _is_num(v):
            self.add(path, v, "must be a number")
            return _MISSING
        if not math.isfinite(v):
            return _MISSING  # reported once by _non_finite
        return float(v)

    def boolean(self, path: str) -> Any:
        v = self.value(path)
        if v is not _MISSING and not isinstance(v, bool):
            self.add(path, v, "must be true or false")
            return _MISSING
        return v


_MISSING = object()


def insecure_fixed_noise_seed(config: ml_collections.ConfigDict) -> Any:
    """`privacy.insecure_fixed_noise_seed` (-1 = off; configs saved before the field existed: -1)."""
    try:
        return _get(config, "privacy.insecure_fixed_noise_seed")
    except KeyError:
        return -1


def validate(
    config: ml_collections.ConfigDict,
    *,
    num_examples: int | None = None,
    num_devices: int = 1,
    check_paths: bool = True,
) -> list[str]:
    """Raise UsageError listing every invalid field/combination of `config`.

    Args:
      config: the run config (see dpft/config/base.py).
      num_examples: N, the training-set size, when known (checks batch_size <= N).
      num_devices: local devices of this host that share the physical batch.
      check_paths: also require that model.checkpoint (if set) and data.root (all data sets
        that needs one) exist; False checks a config file on a machine without the data.
    Returns:
      the warnings issued (strings); empty when there are none.
    """
    c = _Checker(config)
    notes: list[str] = []
    for path, v in _numbers(config):
        if not math.isfinite(v):
            c.add(path, v, "must be a finite number")

    # -- top level / model
    c.integer("seed", 0)
    name = c.value("model.name")
    model_names = models_registry.names()
    if name is not _MISSING and name not in model_names:
        c.add("model.name", name, f"is not a known model ({', '.join(model_names)})")
    c.choice("model.dtype", DTYPES)
    ckpt = c.value("model.checkpoint")
    if ckpt is not _MISSING:
        if not isinstance(ckpt, str):
            c.add("model.checkpoint", ckpt, "must be a path or ''")
        elif ckpt and check_paths and not paths.exists(ckpt):
            c.add("model.checkpoint", ckpt, "does not exist")

    # -- data
    data_name = c.choice("data.name", DATASETS.names())
    root = c.value("data.root")
    if root is not _MISSING and not isinstance(root, str):
        c.add("data.root", root, "must be a path or ''")
    elif (root is not _MISSING and data_name in DATASETS and DATASETS.get(data_name).needs_root
          and check_paths):
        if not root:
            c.add("data.root", root, f"must name the {data_name} data directory")
        elif check_paths and not paths.isdir(root):
            c.add("data.root", root, "is not a directory")
    c.integer("data.image_size", 1)
    c.integer("data.eval_image_size", 1)
    c.integer("data.augmult", 1)
    c.boolean("data.random_crop")
    c.boolean("data.random_flip")
    c.integer("data.num_workers", 0)
    c.integer("data.worker_processes", 0)
    split = c.value("data.train_split")
    if split is not _MISSING and not (isinstance(split, str) and split):
        c.add("data.train_split", split, "must be a split name")
    c.choice("data.crop", CROPS)
    crop_fraction = c.number("data.eval_crop_fraction")
    if crop_fraction is not _MISSING and not 0.0 <= crop_fraction <= 1.0:
        c.add("data.eval_crop_fraction", crop_fraction, "must be in (0, 1], or 0 for the default")
    attributes = c.value("data.attributes")
    if attributes is not _MISSING and not (attributes is None or isinstance(attributes, str) or (
            isinstance(attributes, (tuple, list)) and all(isinstance(a, str) for a in attributes))):
        c.add("data.attributes", attributes, "must be None, 'a,b' or a tuple of attribute names")
    fraction = c.number("data.imbalance.fraction")
    if fraction is not _MISSING and not 0.0 <= fraction < 1.0:
        c.add("data.imbalance.fraction", fraction, "must be in [0, 1) (0 = off)")
    c.integer("data.imbalance.seed", -1)
    for key in ("attribute", "group"):
        v = c.value(f"data.imbalance.{key}")
        if v is not _MISSING and not isinstance(v, str):
            c.add(f"data.imbalance.{key}", v, "must be a string")
        elif fraction is not _MISSING and fraction > 0 and not v:
            c.add(f"data.imbalance.{key}", v, f"must be set when data.imbalance.fraction={fraction}")
    opts = c.value("data.options")
    if opts is not _MISSING and not isinstance(opts, ml_collections.ConfigDict):
        c.add("data.options", opts, "must be a group of fields")

    # -- privacy
    enabled = c.boolean("privacy.enabled")
    clip_choices = clipping.names(private=True)  # "none" is privacy.enabled=False
    clip_mode = c.choice("privacy.clipping", clip_choices)
    clip_record = clipping.get(clip_mode) if clip_mode in clip_choices else None
    c.choice("privacy.accountant", ACCOUNTANTS)
    delta = c.number("privacy.delta")
    if delta is not _MISSING and not 0.0 <= delta < 1.0:
        c.add("privacy.delta", delta, "must be in [0, 1) (0 means 1/N)")
    sigma = c.value("privacy.noise_multiplier")
    if sigma is not None and sigma is not _MISSING:
        if not _is_num(sigma) or not math.isfinite(sigma):
            if not _is_num(sigma):
                c.add("privacy.noise_multiplier", sigma, "must be >= 0 (0 = calibrate from privacy.epsilon)")
            sigma = _MISSING
        elif sigma < 0:
            c.add("privacy.noise_multiplier", sigma, "must be >= 0 (0 = calibrate from privacy.epsilon)")
            sigma = _MISSING
        elif sigma > 0 and enabled is True and not SIGMA_RANGE[0] <= sigma <= SIGMA_RANGE[1]:
            c.add("privacy.noise_multiplier", sigma,
                  f"must be 0 (calibrate from privacy.epsilon) or in [{SIGMA_RANGE[0]:g}, {SIGMA_RANGE[1]:g}] "
                  f"(below: no meaningful privacy; above: the noise overflows)")
            sigma = _MISSING
    eps = c.value("privacy.epsilon")
    if enabled is True:
        if clip_record is not None:
            notes.extend(_clipping_hyper_parameters(c, clip_mode, clip_record))
        if sigma is None or (sigma is not _MISSING and sigma == 0):
            if eps is _MISSING:
                pass
            elif not _is_num(eps) or not math.isfinite(eps) or not eps > 0:
                if _is_num(eps) and not math.isfinite(eps):
                    pass  # reported by the finiteness check at the top
                else:
                    c.add("privacy.epsilon", eps, "must be > 0 when privacy.enabled and privacy.noise_multiplier is unset (0)")
        if num_examples is not None and _is_int(num_examples) and num_examples > 0 and delta is not _MISSING:
            effective = delta if delta > 0 else 1.0 / num_examples
            if effective >= 1.0 / num_examples:
                notes.append(
                    f"config.privacy.delta={delta!r} means delta={effective:.3g} >= 1/N = {1.0 / num_examples:.3g}: "
                    "a weak guarantee (a mechanism that publishes one random example in full is (0, 1/N)-DP); "
                    "set privacy.delta well below 1/N, e.g. 1/(10 N), for a meaningful claim")
        fixed = insecure_fixed_noise_seed(c.config)
        if fixed is not None:
            if not _is_int(fixed) or fixed < -1:
                c.add("privacy.insecure_fixed_noise_seed", fixed, "must be -1 (off, secret noise) or an int >= 0")
            elif fixed >= 0:
                notes.append(
                    f"config.privacy.insecure_fixed_noise_seed={fixed}: the noise and the batch selection are a public "
                    "function of this number; the run has NO differential-privacy guarantee (tests/debugging only)")

    # -- train
    batch = c.integer("train.batch_size", 1)
    phys = c.integer("train.physical_batch_size", 1)
    micro = c.integer("train.microbatch_size", 1)
    try:  # optional: configs saved before it existed mean "auto"
        _get(c.config, "train.grad_method")
        method = c.choice("train.grad_method", GRAD_METHODS)
    except KeyError:
        method = "auto"
    if enabled is True and clip_record is not None and method in clipping.ENGINES and not clip_record.supports(method):
        use = " or ".join(repr(m) for m in ("auto",) + clip_record.engines)
        c.add("train.grad_method", method, f"does not support config.privacy.clipping={clip_mode!r} (use {use})")
    if phys is not _MISSING and micro is not _MISSING and phys % micro:
        c.add("train.physical_batch_size", phys, f"is not a multiple of config.train.microbatch_size={micro}")
    if not _is_int(num_devices) or num_devices < 1:
        raise UsageError(f"number of devices {num_devices!r} must be a positive integer")
    if phys is not _MISSING and phys % num_devices:
        c.add("train.physical_batch_size", phys, f"is not divisible by the {num_devices} local devices")
    elif phys is not _MISSING and micro is not _MISSING and not phys % micro and (phys // num_devices) % micro:
        c.add(
            "train.physical_batch_size", phys,
            f"gives {phys // num_devices} examples per device, not a multiple of config.train.microbatch_size={micro}",
        )
    if num_examples is not None:
        if not _is_int(num_examples) or num_examples < 1:
            c.errors.append(f"the training set has {num_examples!r} examples; need at least 1")
        elif batch is not _MISSING and batch > num_examples:
            c.add("train.batch_size", batch, f"is larger than the training set (N={num_examples})")
    updates = c.integer("train.num_updates", 1)
    c.choice("train.optimizer.name", OPTIMIZERS)
    lr = c.number("train.optimizer.learning_rate")
    if lr is not _MISSING and not lr > 0:
        c.add("train.optimizer.learning_rate", lr, "must be > 0")
    mom = c.number("train.optimizer.momentum")
    if mom is not _MISSING and not 0.0 <= mom < 1.0:
        c.add("train.optimizer.momentum", mom, "must be in [0, 1)")
    wd = c.number("train.optimizer.weight_decay")
    if wd is not _MISSING and wd < 0:
        c.add("train.optimizer.weight_decay", wd, "must be >= 0")
    sched = c.choice("train.lr_schedule.name", SCHEDULES)
    warm = c.integer("train.lr_schedule.warmup_steps", 0)
    if sched == "warmup_cosine" and warm is not _MISSING and updates is not _MISSING and warm >= updates:
        c.add("train.lr_schedule.warmup_steps", warm, f"must be < config.train.num_updates={updates}")
    ema = c.number("train.ema_decay")
    if ema is not _MISSING and not 0.0 <= ema < 1.0:
        c.add("train.ema_decay", ema, "must be in [0, 1) (0 = off)")
    polyak = c.boolean("train.polyak")
    c.integer("train.log_every", 1)
    c.integer("train.eval_every", 0)
    c.integer("train.checkpoint_every", 0)
    c.integer("train.keep_checkpoints", 1)

    # -- eval
    c.integer("eval.batch_size", 1)
    params = c.choice("eval.params", EVAL_PARAMS)
    if params == "ema" and ema is not _MISSING and ema == 0.0:
        c.add("eval.params", params, "needs an average: config.train.ema_decay=0 turns EMA off")
    if params == "polyak" and polyak is False:
        c.add("eval.params", params, "needs the Polyak average: set config.train.polyak=True")
    splits = c.value("eval.splits")
    if splits is not _MISSING and (
        not isinstance(splits, (tuple, list)) or not splits or not all(isinstance(s, str) and s for s in splits)
    ):
        c.add("eval.splits", splits, "must be a non-empty tuple of split names")

    # -- individual accounting
    ind = c.boolean("individual.enabled")
    if ind is True:
        c.integer("individual.every", 1)
        grid = c.number("individual.norm_grid")
        if grid is not _MISSING and not grid > 0:
            c.add("individual.norm_grid", grid, "must be > 0")
        try:  # optional: configs saved before it existed mean 20
            _get(c.config, "individual.min_group_size")
            c.integer("individual.min_group_size", 1)
        except KeyError:
            pass

    if c.errors:
        raise ConfigError("invalid config: " + "; ".join(c.errors))
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=2)
    return notes


def _clipping_hyper_parameters(c: _Checker, mode: str, record: clipping.ClippingMode) -> list[str]:
    """Check each run-config hyper-parameter `config.privacy.<name>` of the clipping modes
    (`clipping.HYPER_PARAMS`): one the mode reads must be in its range; one it does not read and
    that differs from its default gets a warning (returned). A field the config lacks is missing,
    unless `may_be_absent` (a config saved before it existed: its default)."""
    notes = []
    for name, param in clipping.HYPER_PARAMS.items():
        path = f"privacy.{name}"
        if not param.run_config:
            continue
        try:
            value = _get(c.config, path)
        except KeyError:
            value = _MISSING
        if name in record.hyper and (value is not _MISSING or not param.may_be_absent):
            value = c.number(path)  # reports a missing field
            problem = param.check(value) if value is not _MISSING else None
            if problem:
                c.add(path, value, f"{problem} (read by config.privacy.clipping={mode!r})")
        elif name not in record.hyper and _is_num(value) and value != param.default:
            notes.append(f"config.{path}={value!r} has no effect: config.privacy.clipping={mode!r} does not read "
                         f"it (read by {', '.join(clipping.readers(name))})")
    return notes


def _numbers(node: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """(dotted path, value) of every float in a config (lists/tuples included)."""
    if isinstance(node, (ml_collections.ConfigDict, Mapping)):
        for k in node.keys():
            yield from _numbers(node[k], f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _numbers(v, f"{prefix}[{i}]")
    elif isinstance(node, float):
        yield prefix, node


def same_value(a: Any, b: Any) -> bool:
    """Equality for config values where NaN equals NaN (lists/tuples compared element-wise)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    return a == b


def check_finite_update(info: Mapping[str, float], update: int, last_checkpoint: int | None) -> None:
    """Raise NonFiniteError when an update's loss or gradient norm is NaN/inf (before any save)."""
    bad = {k: info[k] for k in ("loss_sum", "grad_norm") if k in info and not math.isfinite(float(info[k]))}
    if bad:
        where = f"checkpoint {last_checkpoint}" if last_checkpoint is not None else "no checkpoint yet"
        raise NonFiniteError(
            f"update {update}: non-finite {', '.join(f'{k}={v}' for k, v in bad.items())}; stopped without "
            f"saving (last saved: {where}); lower config.train.optimizer.learning_rate or check the data")


def check_finite_trees(trees: Mapping[str, Any], update: int) -> None:
    """Raise NonFiniteError when any float array of `trees` holds NaN/inf (checked before a save)."""
    import jax
    import jax.numpy as jnp

    bad = []
    for name, tree in trees.items():
        leaves = [x for x in jax.tree.leaves(tree)
                  if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
        if leaves and not bool(jax.device_get(jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])))):
            bad.append(name)
    if bad:
        raise NonFiniteError(f"update {update}: non-finite values in {', '.join(bad)}; refusing to save a "
                             f"checkpoint of them (lower config.train.optimizer.learning_rate)")
