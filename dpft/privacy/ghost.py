"""Two-pass ("book-keeping" style) clipped gradient sum: norms first, then one batched backward.

`ghost_clipped_grad_sum` has the signature and return value of
`dpft.privacy.engine.clipped_grad_sum` and computes the same quantity,
sum_i mask_i * factor_i * g_i, in two passes per microbatch:

1. per-example gradient NORMS: `vmap(grad)` whose per-example gradients are reduced to a
   squared norm inside the vmap (no scaling, no masked sum over the [mb, *param] tensors);
2. the clipped sum as ONE batched (non-per-example) backward pass of the reweighted loss
   sum_i w_i * loss_i with w_i = stop_gradient(mask_i * factor_i): its gradient is
   sum_i w_i g_i by linearity, the clipped sum exactly (up to float summation order).

The same per-example keys are used in both passes, so dropout / stochastic depth masks
agree and the result is exact. Only "flat" and "automatic" clipping have one scalar
factor per example; "per_layer" raises, "none" delegates to the engine.

True ghost norms (Li et al. 2022; Bu et al. 2023) would skip step 1's per-example
gradients by reading norms off layer inputs and output-gradients. For dpft's NFNets that
needs per-layer taps in the model, and weight standardisation (the conv weight is a
non-linear function of the raw parameter) makes the raw-parameter norm differ from the
standardised-weight norm, so it is not done here; benchmarks/README.md says what the
two-pass variant measured against the one-pass engine.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from dpft.privacy import engine
from dpft.privacy.engine import ClippingConfig, LossFn, PyTree

GHOST_MODES = ("flat", "automatic")


def _sq_norm_f32(tree: PyTree) -> jax.Array:
    """Sum of squares over all leaves, in float32. Shape []."""
    return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))


def ghost_clipped_grad_sum(loss_fn: LossFn, params: PyTree, batch: Mapping[str, jax.Array], rng: jax.Array,
                           *, clipping: ClippingConfig, microbatch_size: int,
                           position_offset: int | jax.Array = 0) -> tuple[PyTree, dict[str, jax.Array]]:
    """Same contract as `engine.clipped_grad_sum` (docs/interfaces.md), computed in two passes.

    Args/returns: as `engine.clipped_grad_sum`. grad_sum: pytree like params, float32;
    stats: {"norms": [B], "loss": [B], "mask": [B], <aux>: [B]}, 0 on padding rows.
    Raises ValueError for clipping.mode "per_layer" (no single per-example factor).
    """
    if clipping.mode == "none":
        return engine.clipped_grad_sum(loss_fn, params, batch, rng, clipping=clipping,
                                       microbatch_size=microbatch_size, position_offset=position_offset)
    if clipping.mode not in GHOST_MODES:
        raise ValueError(f"ghost_clipped_grad_sum: ClippingConfig.mode={clipping.mode!r} is not supported; "
                         f"use one of {GHOST_MODES} or engine.clipped_grad_sum")
    views, mask = engine.checked_views(batch, microbatch_size, "ghost_clipped_grad_sum")
    batch_size = mask.shape[0]
    num_micro = batch_size // microbatch_size
    positions = jnp.arange(batch_size, dtype=jnp.uint32) + jnp.asarray(position_offset, jnp.uint32)
    # Device-local copy of params under shard_map (see engine.device_local_params).
    params = engine.device_local_params(params, [mask, positions, engine.raw_key(rng), *jax.tree.leaves(views)])

    def chunk(x: jax.Array) -> jax.Array:
        return x.reshape((num_micro, microbatch_size) + x.shape[1:])

    xs = (jax.tree.map(chunk, views), chunk(mask), chunk(positions))

    def loss_and_sq_norm(p: PyTree, v: Mapping[str, jax.Array], key: jax.Array):
        (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(p, v, key)
        return loss, aux, _sq_norm_f32(g)

    def body(acc: PyTree, x):
        views_mb, mask_mb, pos_mb = x
        keys = jax.vmap(lambda q: jax.random.fold_in(rng, q))(pos_mb)
        real = mask_mb > 0
        # Pass 1: per-example norms only.
        losses, aux, sq = jax.vmap(loss_and_sq_norm, in_axes=(None, 0, 0))(params, views_mb, keys)
        norms = jnp.sqrt(sq)
        factors = engine.clip_factors(norms, clipping.clip_norm, clipping.mode, clipping.gamma)
        # where: a NaN/inf norm of a padding row still gives weight exactly 0.
        weights = jax.lax.stop_gradient(jnp.where(real, factors, 0.0))

        # Pass 2: one batched backward of the reweighted loss sum.
        def weighted_loss(p: PyTree) -> jax.Array:
            ls, _ = jax.vmap(loss_fn, in_axes=(None, 0, 0))(p, views_mb, keys)
            return jnp.sum(jnp.where(real, weights * ls.astype(jnp.float32), 0.0))

        grad = jax.grad(weighted_loss)(params)
        acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grad)
        stats = {"norms": norms, "loss": losses, **engine.aux_to_stats(aux)}
        stats = {k: jnp.where(real, v.astype(jnp.float32), 0.0) for k, v in stats.items()}
        return acc, stats

    init = jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params)
    grad_sum, stats = jax.lax.scan(body, init, xs)
    stats = {k: v.reshape((batch_size,)) for k, v in stats.items()}
    stats["mask"] = mask
    return grad_sum, stats
