"""Optimizer and learning-rate schedule from `config.train` (optax): one record per choice.

`OPTIMIZERS` and `SCHEDULES` map each name of `config.train.optimizer.name` /
`config.train.lr_schedule.name` to its builder; the config schema takes its choices from them.
The optimizer consumes the *privatised* mean gradient (the output of
`dpft.privacy.noise.privatize`), so nothing here touches per-example data; weight decay
and momentum only post-process a DP quantity and cost no privacy.
"""
from __future__ import annotations

from typing import Callable

import ml_collections
import optax

from dpft.errors import UsageError


def _warmup_cosine(lr: float, total: int, warmup: int) -> optax.Schedule:
    if warmup < 1 or warmup >= total:
        raise UsageError(
            f"config.train.lr_schedule.warmup_steps={warmup} must be in [1, num_updates={total}) for warmup_cosine")
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps=warmup, decay_steps=total, end_value=0.0)


#: name -> (learning_rate, num_updates, warmup_steps) -> schedule, and whether the schedule does its
#: own warm-up (else `warmup_steps > 0` prepends a linear one).
SCHEDULES: dict[str, tuple[Callable[[float, int, int], optax.Schedule], bool]] = {
    # `learning_rate` for every update.
    "constant": (lambda lr, total, warmup: optax.constant_schedule(lr), False),
    # cosine decay from `learning_rate` to 0 over the updates after the warm-up.
    "cosine": (lambda lr, total, warmup: optax.cosine_decay_schedule(lr, decay_steps=max(total - warmup, 1)), False),
    # linear warm-up from 0 over `warmup_steps`, then cosine decay to 0 at `num_updates`.
    "warmup_cosine": (_warmup_cosine, True),
}

#: name -> (schedule, config.train.optimizer) -> optax optimizer, and whether `weight_decay > 0` adds
#: `weight_decay * params` to its update (L2 regularisation applied after privatisation).
OPTIMIZERS: dict[str, tuple[Callable[[optax.Schedule, ml_collections.ConfigDict], optax.GradientTransformation],
                            bool]] = {
    # plain SGD (momentum ignored), the DP-SGD recipe of De et al. (2022)
    "sgd": (lambda schedule, opt: optax.sgd(schedule), True),
    # SGD with heavy-ball `momentum`
    "momentum": (lambda schedule, opt: optax.sgd(schedule, momentum=float(opt.momentum)), True),
    "adam": (lambda schedule, opt: optax.adam(schedule), True),
    # Adam with decoupled `weight_decay`
    "adamw": (lambda schedule, opt: optax.adamw(schedule, weight_decay=float(opt.weight_decay)), False),
}


def _record(table: dict, field: str, name: str):
    if name not in table:
        raise UsageError(f"config.{field}={name!r} is not one of {', '.join(table)}")
    return table[name]


def make_schedule(train_config: ml_collections.ConfigDict) -> optax.Schedule:
    """Learning rate [unitless multiplier of the gradient] as a function of the update index
    (`SCHEDULES`); "constant" or "cosine" with `warmup_steps > 0` start with a linear warm-up."""
    lr = float(train_config.optimizer.learning_rate)
    warmup = int(train_config.lr_schedule.warmup_steps)
    build, own_warmup = _record(SCHEDULES, "train.lr_schedule.name", train_config.lr_schedule.name)
    main = build(lr, int(train_config.num_updates), warmup)
    if own_warmup or warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], boundaries=[warmup])


def make_optimizer(train_config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The optax optimizer of `config.train` (`OPTIMIZERS`) with its schedule."""
    opt = train_config.optimizer
    build, adds_decay = _record(OPTIMIZERS, "train.optimizer.name", opt.name)
    core = build(make_schedule(train_config), opt)
    wd = float(opt.weight_decay)
    if adds_decay and wd > 0:
        return optax.chain(optax.add_decayed_weights(wd), core)
    return core
