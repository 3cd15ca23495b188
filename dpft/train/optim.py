"""Optimizer and learning-rate schedule from `config.train` (optax).

The optimizer consumes the *privatised* mean gradient (the output of
`dpft.privacy.noise.privatize`), so nothing here touches per-example data; weight decay
and momentum only post-process a DP quantity and cost no privacy.
"""
from __future__ import annotations

import ml_collections
import optax

from dpft.errors import UsageError


def make_schedule(train_config: ml_collections.ConfigDict) -> optax.Schedule:
    """Learning rate [unitless multiplier of the gradient] as a function of the update index.

    - "constant": `learning_rate` for every update.
    - "cosine": cosine decay from `learning_rate` to 0 over `num_updates`.
    - "warmup_cosine": linear warm-up from 0 to `learning_rate` over `warmup_steps`, then
      cosine decay to 0 at `num_updates`.
    - "constant" or "cosine" with `warmup_steps > 0` also start with a linear warm-up.
    """
    lr = float(train_config.optimizer.learning_rate)
    total = int(train_config.num_updates)
    name = train_config.lr_schedule.name
    warmup = int(train_config.lr_schedule.warmup_steps)
    if name == "constant":
        main = optax.constant_schedule(lr)
    elif name == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps=max(total - warmup, 1))
    elif name == "warmup_cosine":
        if warmup < 1 or warmup >= total:
            raise UsageError(
                f"config.train.lr_schedule.warmup_steps={warmup} must be in [1, num_updates={total}) for warmup_cosine"
            )
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps=warmup, decay_steps=total, end_value=0.0)
    else:
        raise UsageError(f"config.train.lr_schedule.name={name!r} is not one of constant, cosine, warmup_cosine")
    if warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], boundaries=[warmup])


def make_optimizer(train_config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The optax optimizer of `config.train` with its schedule.

    - "sgd": plain SGD (momentum ignored), the DP-SGD recipe of De et al. (2022).
    - "momentum": SGD with heavy-ball `momentum`.
    - "adam": Adam; "adamw": Adam with decoupled `weight_decay`.
    For sgd/momentum/adam a `weight_decay > 0` adds `weight_decay * params` to the update
    (L2 regularisation applied after privatisation).
    """
    opt = train_config.optimizer
    schedule = make_schedule(train_config)
    name = opt.name
    wd = float(opt.weight_decay)
    if name == "sgd":
        core = optax.sgd(schedule)
    elif name == "momentum":
        core = optax.sgd(schedule, momentum=float(opt.momentum))
    elif name == "adam":
        core = optax.adam(schedule)
    elif name == "adamw":
        return optax.adamw(schedule, weight_decay=wd)
    else:
        raise UsageError(f"config.train.optimizer.name={name!r} is not one of sgd, momentum, adam, adamw")
    if wd > 0:
        return optax.chain(optax.add_decayed_weights(wd), core)
    return core
