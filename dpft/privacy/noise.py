"""Gaussian noise of DP-SGD: THE one place in dpft where privacy noise is added.

Per optimizer update, the global sum of clipped per-example gradients (summed over
microbatches, devices and hosts) gets one independent N(0, (sigma * C)^2) draw per
coordinate, then is divided by the *expected* batch size N*q (a public constant, never
the realised count). The key is `fold_in(noise base key, update index)`; the base key comes
from the run's CSPRNG secret (`dpft.privacy.keys`), so it is identical on every device and
host (every replica applies the same update) and no public value suffices to recompute it.
The base key is `keys.NOISE_STREAMS` (3) independent threefry keys; each coordinate's draw is
(z_1 + z_2 + z_3) / sqrt(3), z_s ~ N(0, 1) from stream s, so recomputing the noise needs all 192 key
bits (brute force 2^192; meet in the middle about 2^128 draws with 2^64 stored: `keys.NOISE_STREAMS`).

BandMF (`privatize_correlated`, `privacy.mechanism="bandmf"`): the same standard normals Z_t of update
t, made correlated across updates: y_t = (C^-1 Z)_t for the banded Toeplitz strategy C
(`dpft.privacy.bandmf`), from the last b-1 y's (the noise state, replicated in the train state);
the added noise is sigma * S * sens(C) * y_t.
"""
from __future__ import annotations

import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp

from dpft.privacy import keys

PyTree = Any


def noise_key(base_key: jax.Array, update_index: int | jax.Array) -> jax.Array:
    """Keys [NOISE_STREAMS] of the noise of update `update_index`: fold_in(stream key, update_index)
    for each stream of `base_key`.

    `base_key` is `dpft.privacy.keys.noise_base_key(secret)` (pass it as a traced argument,
    never as a compile-time constant). Pure function of its inputs, so identical on every
    device and host. `update_index` may be a traced integer scalar.
    """
    if isinstance(base_key, int) or jnp.shape(base_key) != (keys.NOISE_STREAMS,):
        raise TypeError("noise_key takes the run's secret noise key (dpft.privacy.keys.noise_base_key: "
                        f"{keys.NOISE_STREAMS} threefry keys), not {base_key!r:.80}")
    return jax.vmap(lambda k: jax.random.fold_in(k, update_index))(base_key)


def standard_normals(key: jax.Array, shapes: list[tuple[int, ...]]) -> list[jax.Array]:
    """float32 N(0, 1) arrays of `shapes` from the [NOISE_STREAMS] keys of `noise_key`.

    One draw of n = sum of the sizes per stream, `jax.random.normal(key[s], (n,))`; the streams'
    mean times sqrt(NOISE_STREAMS) (exactly unit variance) is cut, in order, into the shapes. One
    draw, not one per leaf: XLA compiles a threefry hash per call (nfnet_micro's 97 leaves: 16.3 s
    of XLA:CPU compile drawn per leaf, 2.6 s drawn once; `python -m benchmarks.noise_draw`).
    """
    sizes = [math.prod(shape) for shape in shapes]
    scale = jnp.float32(1.0 / math.sqrt(keys.NOISE_STREAMS))
    z = scale * sum(jax.random.normal(k, (sum(sizes),), jnp.float32) for k in key)
    cuts = list(itertools.accumulate(sizes))[:-1]
    return [part.reshape(shape) for part, shape in zip(jnp.split(z, cuts), shapes)]


def _is_concrete_zero(x: Any) -> bool:
    return isinstance(x, (int, float)) and x == 0


def privatize(grad_sum: PyTree, key: jax.Array, *, noise_multiplier: float | jax.Array, clip_norm: float,
              expected_batch_size: float) -> PyTree:
    """Noisy mean gradient: (grad_sum + N(0, (sigma*C)^2 I)) / expected_batch_size.

    Args:
      grad_sum: pytree of float arrays, the global sum of clipped per-example gradients.
      key: [NOISE_STREAMS] from `noise_key(base_key, update_index)`; the leaves, flattened and
        concatenated in `jax.tree.leaves` order (n values), get the sum over streams s of
        N(key[s], (n,)), divided by sqrt(NOISE_STREAMS) (`standard_normals`).
      noise_multiplier: sigma >= 0 (a Python 0 skips drawing: exact mean of the clipped sum).
      clip_norm: C, the L2 sensitivity of grad_sum (`engine.sensitivity`).
      expected_batch_size: N*q > 0 (`sampling.expected_batch_size`).

    Returns: pytree like grad_sum, float32 leaves.
    """
    if isinstance(expected_batch_size, (int, float)) and not expected_batch_size > 0:
        raise ValueError(f"privatize: expected_batch_size must be > 0, got {expected_batch_size!r}")
    if isinstance(noise_multiplier, (int, float)) and not noise_multiplier >= 0:
        raise ValueError(f"privatize: noise_multiplier must be >= 0, got {noise_multiplier!r}")
    if isinstance(clip_norm, (int, float)) and not clip_norm >= 0:
        raise ValueError(f"privatize: clip_norm must be >= 0, got {clip_norm!r}")
    leaves, treedef = jax.tree.flatten(grad_sum)
    leaves = [jnp.asarray(x, jnp.float32) for x in leaves]
    if not _is_concrete_zero(noise_multiplier) and leaves:
        std = jnp.asarray(noise_multiplier, jnp.float32) * clip_norm
        leaves = [x + std * z for x, z in zip(leaves, standard_normals(key, [x.shape for x in leaves]))]
    leaves = [x / expected_batch_size for x in leaves]
    return jax.tree.unflatten(treedef, leaves)


def init_noise_state(params: PyTree, bands: int) -> PyTree:
    """BandMF's noise state before update 0: zeros float32 [bands-1, *leaf.shape] per leaf of `params`
    (row j-1 holds y_{t-j}, the correlated noise of j updates ago)."""
    return jax.tree.map(lambda p: jnp.zeros((bands - 1,) + tuple(jnp.shape(p)), jnp.float32), params)


def correlated_normals(z: list[jax.Array], history: list[jax.Array], coefs: tuple[float, ...]
                       ) -> tuple[list[jax.Array], list[jax.Array]]:
    """Row t of C^-1 Z for the banded Toeplitz C of `coefs` (b floats): y = (z - sum_j coefs[j] h[j-1]) / coefs[0].

    Args:
      z: float32 arrays, Z_t (this update's standard normals, per leaf).
      history: float32 [b-1, *z[i].shape] per leaf: y_{t-1}, ..., y_{t-b+1} (zeros before update 0).
      coefs: the strategy's b coefficients (Python floats: compile-time constants, public).

    Returns: (y per leaf, the next history [y_t, y_{t-1}, ..., y_{t-b+2}] per leaf).
    """
    if len(coefs) == 1:  # DP-SGD: y = z exactly when coefs[0] == 1
        return [x if coefs[0] == 1.0 else x / jnp.float32(coefs[0]) for x in z], list(history)
    ys, nexts = [], []
    for x, h in zip(z, history):
        acc = x
        for j in range(1, len(coefs)):
            acc = acc - jnp.float32(coefs[j]) * h[j - 1]
        y = acc / jnp.float32(coefs[0])
        ys.append(y)
        nexts.append(jnp.concatenate([y[None], h[:-1]], axis=0))
    return ys, nexts


def privatize_correlated(grad_sum: PyTree, key: jax.Array, noise_state: PyTree, *, coefs: tuple[float, ...],
                         noise_multiplier: float | jax.Array, clip_norm: float, expected_batch_size: float
                         ) -> tuple[PyTree, PyTree]:
    """BandMF's noisy mean gradient: (grad_sum + sigma * clip_norm * (C^-1 Z)_t) / expected_batch_size.

    Args as `privatize`, plus noise_state (`init_noise_state`: leaves [b-1, *shape], the last b-1
    correlated noise vectors) and coefs (the strategy's b coefficients). `clip_norm` is the sensitivity
    of the noisy sum: the clipped sum's times the strategy's (`dpft.privacy.bandmf.Strategy.sensitivity`).
    Z_t are `standard_normals(key, ...)`, the same draws `privatize` adds. A Python 0 sigma draws
    nothing and keeps the state.

    Returns: (pytree like grad_sum, float32 leaves; the next noise state).
    """
    if isinstance(expected_batch_size, (int, float)) and not expected_batch_size > 0:
        raise ValueError(f"privatize_correlated: expected_batch_size must be > 0, got {expected_batch_size!r}")
    if isinstance(noise_multiplier, (int, float)) and not noise_multiplier >= 0:
        raise ValueError(f"privatize_correlated: noise_multiplier must be >= 0, got {noise_multiplier!r}")
    if not coefs or not coefs[0] > 0:
        raise ValueError(f"privatize_correlated: coefs[0] must be > 0, got {coefs!r}")
    leaves, treedef = jax.tree.flatten(grad_sum)
    history = treedef.flatten_up_to(noise_state)
    leaves = [jnp.asarray(x, jnp.float32) for x in leaves]
    if not _is_concrete_zero(noise_multiplier) and leaves:
        std = jnp.asarray(noise_multiplier, jnp.float32) * clip_norm
        ys, history = correlated_normals(standard_normals(key, [x.shape for x in leaves]), history, coefs)
        leaves = [x + std * y for x, y in zip(leaves, ys)]
    leaves = [x / expected_batch_size for x in leaves]
    return jax.tree.unflatten(treedef, leaves), jax.tree.unflatten(treedef, history)
