"""Measured sensitivity: how far removing one example moves the clipped gradient sum.

The accountant assumes that removing any one example changes the clipped sum S by at most the
sensitivity (C for flat clipping), whatever engine and compute dtype produced S. This module
measures it: `removal_distances` computes ||S - S_{-i}|| for chosen examples i, where S_{-i} is
the same batch with example i turned into padding (mask 0, so every other row's computation is
unchanged). Batches of nearly identical examples make the gradients aligned, the worst case for
rounding in the sum (||S|| ~ B C). Used by the tests and `benchmarks/sensitivity.py`.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

SumFn = Callable[[Mapping[str, Any]], Any]  # batch -> pytree, the clipped sum (float32 leaves)


def tree_distance(a: Any, b: Any) -> float:
    """L2 distance between two pytrees, accumulated in float64 on the host."""
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64) - np.asarray(y, np.float64)))
                             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))))


def removal_distances(sum_fn: SumFn, batch: Mapping[str, Any], indices: Sequence[int]) -> np.ndarray:
    """||S(batch) - S(batch without example i)|| for each i in `indices` -> float64 [len(indices)].

    `sum_fn(batch)` returns the clipped sum; removal sets batch["mask"][i] = 0.
    """
    full = sum_fn(batch)
    out = []
    for i in indices:
        mask = jnp.asarray(batch["mask"]).at[int(i)].set(0.0)
        out.append(tree_distance(full, sum_fn(dict(batch, mask=mask))))
    return np.asarray(out, np.float64)


def aligned_batch(base: Mapping[str, Any], batch_size: int, *, jitter: float = 1e-3, seed: int = 0) -> dict:
    """`batch_size` copies of one example (`base` leaves [K, ...]) with tiny image noise: nearly
    identical examples, so their gradients are aligned. Adds mask (ones) and example_id."""
    rng = np.random.default_rng(seed)
    out = {k: np.repeat(np.asarray(v)[None], batch_size, axis=0) for k, v in base.items()}
    img = out["image"].astype(np.float32)
    out["image"] = img + jitter * rng.standard_normal(img.shape).astype(np.float32)
    out["mask"] = np.ones([batch_size], np.float32)
    out["example_id"] = np.arange(batch_size, dtype=np.int32)
    return {k: jnp.asarray(v) for k, v in out.items()}


__all__ = ["removal_distances", "aligned_batch", "tree_distance"]
