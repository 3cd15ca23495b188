"""Check a run config before anything is compiled or loaded.

`validate(config, num_examples=..., num_devices=...)` collects every problem and raises one
`dpft.cli.UsageError` whose message names each offending field and its value, e.g.
"config.train.physical_batch_size=100 is not a multiple of config.train.microbatch_size=16".
Warnings (allowed but weakening) are issued with `warnings.warn` and also returned.
"""
from __future__ import annotations

import os
import warnings
from typing import Any

import ml_collections

from dpft.cli import UsageError

# Names the rest of dpft implements (a static copy, so validation imports no jax/flax;
# tests/test_configs.py checks it against dpft.models.registry.VARIANTS and dpft.data.DATASETS).
MODEL_NAMES: tuple[str, ...] = tuple(f"nfnet_f{i}" for i in range(8)) + (
    "nfnet_tiny",
    "nfnet_micro",
    "wrn_16_4",
)
DATA_NAMES = ("digits", "chexpert", "mimic_cxr", "imagenet", "places365")
DTYPES = ("float32", "bfloat16")
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "warmup_cosine")
CLIPPINGS = ("flat", "per_layer", "automatic")
ACCOUNTANTS = ("pld", "rdp")
SAMPLINGS = ("poisson", "shuffle")
GRAD_METHODS = ("auto", "bookkeeping", "vmap")
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
        return float(v)

    def boolean(self, path: str) -> Any:
        v = self.value(path)
        if v is not _MISSING and not isinstance(v, bool):
            self.add(path, v, "must be true or false")
            return _MISSING
        return v


_MISSING = object()


def validate(
    config: ml_collections.ConfigDict,
    *,
    num_examples: int | None = None,
    num_devices: int = 1,
    check_paths: bool = True,
) -> list[str]:
    """Raise UsageError listing every invalid field/combination of `config`.

    Args:
      config: the run config (see dpft/train/config_base.py).
      num_examples: N, the training-set size, when known (checks batch_size <= N).
      num_devices: local devices of this host that share the physical batch.
      check_paths: also require that model.checkpoint (if set) and data.root (all data sets
        but digits) exist; False checks a config file on a machine without the data.
    Returns:
      the warnings issued (strings); empty when there are none.
    """
    c = _Checker(config)
    notes: list[str] = []

    # -- top level / model
    c.integer("seed", 0)
    name = c.value("model.name")
    if name is not _MISSING and name not in MODEL_NAMES:
        c.add("model.name", name, f"is not a known model ({', '.join(MODEL_NAMES)})")
    c.choice("model.dtype", DTYPES)
    ckpt = c.value("model.checkpoint")
    if ckpt is not _MISSING:
        if not isinstance(ckpt, str):
            c.add("model.checkpoint", ckpt, "must be a path or ''")
        elif ckpt and check_paths and not os.path.exists(ckpt):
            c.add("model.checkpoint", ckpt, "does not exist")

    # -- data
    data_name = c.choice("data.name", DATA_NAMES)
    root = c.value("data.root")
    if root is not _MISSING and not isinstance(root, str):
        c.add("data.root", root, "must be a path or ''")
    elif root is not _MISSING and data_name is not _MISSING and data_name != "digits" and check_paths:
        if not root:
            c.add("data.root", root, f"must name the {data_name} data directory")
        elif check_paths and not os.path.isdir(root):
            c.add("data.root", root, "is not a directory")
    c.integer("data.image_size", 1)
    c.integer("data.eval_image_size", 1)
    c.integer("data.augmult", 1)
    c.boolean("data.random_crop")
    c.boolean("data.random_flip")
    c.integer("data.num_workers", 0)
    opts = c.value("data.options")
    if opts is not _MISSING and not isinstance(opts, ml_collections.ConfigDict):
        c.add("data.options", opts, "must be a group of fields")

    # -- privacy
    enabled = c.boolean("privacy.enabled")
    c.choice("privacy.clipping", CLIPPINGS)
    c.choice("privacy.accountant", ACCOUNTANTS)
    sampling = c.choice("privacy.sampling", SAMPLINGS)
    delta = c.number("privacy.delta")
    if delta is not _MISSING and not 0.0 <= delta < 1.0:
        c.add("privacy.delta", delta, "must be in [0, 1) (0 means 1/N)")
    sigma = c.value("privacy.noise_multiplier")
    if sigma is not None and sigma is not _MISSING:
        if not _is_num(sigma) or sigma < 0:
            c.add("privacy.noise_multiplier", sigma, "must be >= 0 (0 = calibrate from privacy.epsilon)")
            sigma = _MISSING
    eps = c.value("privacy.epsilon")
    clip = c.number("privacy.clip_norm")
    if enabled is True:
        if clip is not _MISSING and not clip > 0:
            c.add("privacy.clip_norm", clip, "must be > 0 when privacy.enabled")
        if sigma is None or (sigma is not _MISSING and sigma == 0):
            if eps is _MISSING:
                pass
            elif not _is_num(eps) or not eps > 0:
                c.add("privacy.epsilon", eps, "must be > 0 when privacy.enabled and privacy.noise_multiplier is unset (0)")
        if sampling == "shuffle":
            notes.append(
                "config.privacy.sampling='shuffle': the accountant assumes Poisson sampling, "
                "so the reported epsilon is not a proven guarantee for this run"
            )
        if num_examples is not None and delta is not _MISSING and delta > 0 and delta >= 1.0 / num_examples:
            notes.append(f"config.privacy.delta={delta!r} is >= 1/N = {1.0 / num_examples:.3g}; a weak guarantee")

    # -- train
    batch = c.integer("train.batch_size", 1)
    phys = c.integer("train.physical_batch_size", 1)
    micro = c.integer("train.microbatch_size", 1)
    try:  # optional: configs saved before it existed mean "auto"
        _get(c.config, "train.grad_method")
        method = c.choice("train.grad_method", GRAD_METHODS)
    except KeyError:
        method = "auto"
    if method == "bookkeeping" and enabled is True and c.value("privacy.clipping") == "per_layer":
        c.add("train.grad_method", method, "does not support config.privacy.clipping='per_layer' (use 'vmap' or 'auto')")
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

    if c.errors:
        raise UsageError("invalid config: " + "; ".join(c.errors))
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=2)
    return notes
