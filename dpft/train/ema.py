"""Parameter averaging: exponential moving average (EMA) and uniform (Polyak) average.

Pure functions on pytrees, jit-friendly (`step` and `decay` may be traced). Averages are
kept in float32 whatever the parameters' dtype; averaging is post-processing of the
released iterates, so it costs no privacy.

Step convention: `step` is the 0-based index t of the optimizer update that produced
`params` (the first update has t = 0).

EMA:    ema_{t+1} = d_t * ema_t + (1 - d_t) * params_{t+1}, started from ema = initial params,
        with d_t = decay, or with warm-up d_t = min(decay, (1 + t) / (10 + t)) (the
        TensorFlow `ExponentialMovingAverage(num_updates=t)` debiasing: early iterates are
        weighted more so the average is not dominated by the initialisation).
Polyak: the arithmetic mean of the iterates passed to `polyak_update` (steps 0..t):
        avg_{t+1} = avg_t + (params - avg_t) / (t + 1); at t = 0 it equals params.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def _f32(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def ema_init(params: PyTree) -> PyTree:
    """A float32 copy of `params` (same tree structure and shapes)."""
    return _f32(params)


def ema_decay_at(decay: float | jax.Array, step: int | jax.Array, *, warmup: bool = True) -> jax.Array:
    """The effective decay d_t: `decay`, or `min(decay, (1 + t) / (10 + t))` with warm-up."""
    decay = jnp.asarray(decay, jnp.float32)
    if not warmup:
        return decay
    t = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + t) / (10.0 + t))


def ema_update(
    ema: PyTree,
    params: PyTree,
    decay: float | jax.Array,
    step: int | jax.Array,
    *,
    warmup: bool = True,
) -> PyTree:
    """One EMA step: `d * ema + (1 - d) * params` in float32, d = `ema_decay_at(decay, step)`.

    `decay = 0` returns float32 `params` (EMA off). Shapes/structure as `ema`.
    """
    d = ema_decay_at(decay, step, warmup=warmup)
    return jax.tree.map(lambda e, p: d * e + (1.0 - d) * jnp.asarray(p, jnp.float32), ema, params)


def polyak_init(params: PyTree) -> PyTree:
    """A float32 copy of `params`; overwritten by the first `polyak_update(..., step=0)`."""
    return _f32(params)


def polyak_update(avg: PyTree, params: PyTree, step: int | jax.Array) -> PyTree:
    """Running uniform mean: after steps 0..t it is mean(params_0, ..., params_t), float32."""
    w = 1.0 / (jnp.asarray(step, jnp.float32) + 1.0)
    return jax.tree.map(lambda a, p: a + w * (jnp.asarray(p, jnp.float32) - a), avg, params)
