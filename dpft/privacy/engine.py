"""Per-example gradients, clipping and summation: the model-agnostic DP-SGD engine.

`clipped_grad_sum` takes any pure `loss_fn(params, views, rng) -> (loss, aux)` (see
docs/interfaces.md) and a batch dict whose leaves have a leading example axis B, and
returns the sum over real (mask == 1) examples of their clipped gradients. It adds no
noise: noise is added once per update, after summing over microbatches, devices and
hosts, by `dpft.privacy.noise.privatize`.

Clipping modes (`ClippingConfig.mode`) are the records of `dpft.privacy.clipping` ("flat",
"per_layer", "automatic", "none"; its table gives each formula). The engine reads the record,
never the name: each example's float32 gradient g is multiplied by the mode's factor of ||g||,
or, for a leaf-wise mode ("per_layer"), each leaf by the factor of its own norm and bound C_l.
A non-private mode ("none") computes no per-example gradients at all: one backward pass of
sum_i mask_i * loss_i; stats["norms"] is all zeros.

Use `sensitivity(clipping, params)` for the L2 sensitivity that `privatize` must use as
`clip_norm`.

Everything here is jit-able and can run inside `jax.shard_map`: no host callbacks and no
Python branches on traced values. Each example's key is folded from its `example_id`
(`example_key_ids`), so results do not depend on how examples are laid out over devices.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dpft.privacy import clipping as clipping_lib

PyTree = Any
LossFn = Callable[[PyTree, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, Mapping[str, jax.Array]]]

# Batch keys that are never passed to the loss function.
NON_VIEW_KEYS = ("mask", "example_id")
RESERVED_STATS = ("norms", "loss", "mask")


@dataclasses.dataclass(frozen=True)
class ClippingConfig:
    """How per-example gradients are bounded.

    mode: a name in `dpft.privacy.clipping.MODES` ("flat" | "per_layer" | "automatic" | "none").
    clip_norm: C > 0 (L2 norm over the whole parameter pytree; not read by "none").
    per_layer_norms: for "per_layer" only: a pytree with the structure of params whose
      leaves are floats C_l > 0; None splits C equally in squared norm, C_l = C/sqrt(n).
    gamma: stabiliser of automatic clipping, g * C / (||g|| + gamma); gamma > 0.

    Each hyper-parameter the mode reads is checked against its range (`clipping.HYPER_PARAMS`);
    an unknown mode raises a UsageError (a ValueError) naming it and the choices.
    Holds a pytree, so it is not hashable when per_layer_norms is set: close over it
    instead of passing it as a static jit argument.
    """

    mode: str = "flat"
    clip_norm: float = clipping_lib.HYPER_PARAMS["clip_norm"].default
    per_layer_norms: PyTree | None = clipping_lib.HYPER_PARAMS["per_layer_norms"].default
    gamma: float = clipping_lib.HYPER_PARAMS["gamma"].default

    def __post_init__(self) -> None:
        problems = clipping_lib.hyper_problems(self.mode, {name: getattr(self, name)
                                                           for name in clipping_lib.HYPER_PARAMS})
        if problems:
            raise ValueError("; ".join(f"ClippingConfig.{p}" for p in problems))

    @property
    def record(self) -> clipping_lib.ClippingMode:
        """The `dpft.privacy.clipping.ClippingMode` of `mode`."""
        return clipping_lib.get(self.mode)


#: The non-private baseline: no clipping (its clip norm is 0: it bounds nothing).
NO_CLIPPING = ClippingConfig(mode="none", clip_norm=0.0)


def leaf_bounds(clipping: ClippingConfig, params: PyTree) -> PyTree | None:
    """The per-leaf bounds C_l (a pytree like params of floats) of a leaf-wise mode ("per_layer");
    None for a mode with one factor per example."""
    bounds = clipping.record.leaf_bounds
    return None if bounds is None else bounds(clipping, params)


def sensitivity(clipping: ClippingConfig, params: PyTree) -> float:
    """L2 sensitivity of the clipped sum to adding/removing one example (the `clip_norm`
    that `privatize` needs), from the mode's record. 0.0 for a non-private mode ("none")."""
    return float(clipping.record.sensitivity(clipping, params))


def global_norm_f32(tree: PyTree) -> jax.Array:
    """L2 norm over all leaves of a pytree, accumulated in float32. Shape []."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def clip_factors(norm: jax.Array, clipping: ClippingConfig) -> jax.Array:
    """Multiplier applied to a whole gradient of L2 norm `norm` (any shape, float32): the mode's
    factor with bound C. ValueError for a mode without one factor per example (leaf-wise or non-private)."""
    record = clipping.record
    if record.factor is None or record.leaf_bounds is not None:
        raise ValueError(f"clip_factors: clipping mode {clipping.mode!r} has no single factor per example")
    return record.factor(norm, clipping.clip_norm, clipping)


def clip_gradient(grad: PyTree, clipping: ClippingConfig, layer_norms: PyTree | None = None
                  ) -> tuple[PyTree, jax.Array]:
    """Clip ONE example's gradient. Returns (clipped grad in float32, pre-clipping norm []).
    `layer_norms`: the mode's `leaf_bounds` for a leaf-wise mode (per_layer), else None."""
    grad = jax.tree.map(lambda g: g.astype(jnp.float32), grad)
    norm = global_norm_f32(grad)
    record = clipping.record
    if record.factor is None:
        return grad, norm
    if record.leaf_bounds is not None:
        if layer_norms is None:
            raise ValueError(f"clip_gradient: mode {clipping.mode!r} clips each leaf; it needs layer_norms "
                             "(see leaf_bounds)")
        clipped = jax.tree.map(
            lambda g, c: g * record.factor(global_norm_f32(g), c, clipping), grad, layer_norms)
        return clipped, norm
    factor = clip_factors(norm, clipping)
    return jax.tree.map(lambda g: g * factor, grad), norm


def _split_batch(batch: Mapping[str, jax.Array]) -> tuple[dict[str, jax.Array], jax.Array]:
    if "mask" not in batch:
        raise ValueError("clipped_grad_sum: batch has no 'mask' entry (float32 [B], 1 = real example)")
    views = {k: v for k, v in batch.items() if k not in NON_VIEW_KEYS}
    if not views:
        raise ValueError("clipped_grad_sum: batch has no view entries (e.g. 'image')")
    return views, jnp.asarray(batch["mask"], jnp.float32)


def aux_to_stats(aux: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    clash = [k for k in aux if k in RESERVED_STATS]
    if clash:
        raise ValueError(f"loss_fn aux keys {clash} clash with the engine's stats keys {RESERVED_STATS}")
    return {k: jnp.asarray(v, jnp.float32) for k, v in aux.items()}


def raw_key(rng: jax.Array) -> jax.Array:
    """uint32 data of a typed or legacy key."""
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(rng)
    return rng


def example_key_ids(batch: Mapping[str, jax.Array], position_offset: int | jax.Array = 0) -> jax.Array:
    """uint32 [B]: what each example's key is folded from, `fold_in(rng, id)`.

    The example's own `batch["example_id"]` when the batch has one: its randomness (dropout,
    stochastic depth) is then a function of (rng, example) alone, never of where the example
    sits in the physical batch, on which device or host (results do not depend on the device
    layout). Batches without ids use their position `position_offset + i`. Padding rows
    (id -1) all share one key; their gradients are masked out."""
    if "example_id" in batch:
        return jnp.asarray(batch["example_id"]).astype(jnp.int32).astype(jnp.uint32)
    size = jnp.shape(batch["mask"])[0]
    return jnp.arange(size, dtype=jnp.uint32) + jnp.asarray(position_offset, jnp.uint32)


def checked_views(batch: Mapping[str, jax.Array], microbatch_size: int, where: str
                  ) -> tuple[dict[str, jax.Array], jax.Array]:
    """(views, mask [B]) of a training batch, after checking every view has leading axis B and
    that `microbatch_size` divides B (ValueError naming `where` otherwise)."""
    views, mask = _split_batch(batch)
    batch_size = mask.shape[0]
    for k, v in views.items():
        if v.ndim < 1 or v.shape[0] != batch_size:
            raise ValueError(f"{where}: batch[{k!r}] has shape {v.shape}; expected leading axis "
                             f"B={batch_size} (the length of batch['mask'])")
    if not isinstance(microbatch_size, int) or microbatch_size < 1 or batch_size % microbatch_size:
        raise ValueError(f"{where}: microbatch_size={microbatch_size!r} must be a positive int "
                         f"dividing the batch size B={batch_size}")
    return views, mask


def device_local_params(params: PyTree, data: list[jax.Array]) -> PyTree:
    """params + zeros that vary like `data`: the copy to differentiate inside `jax.shard_map`.

    Differentiating w.r.t. replicated (invariant) params would make JAX psum every
    (per-example!) cotangent over the mesh axes, i.e. clip sums of examples from different
    devices. A device-local copy (adding zeros_like(...) keeps values exactly and never reads
    the data) avoids that; the caller psums the returned per-device sums. Outside shard_map
    this is a no-op.
    """
    anchor = sum(jnp.zeros_like(jnp.ravel(x)[:1], jnp.float32) for x in data).reshape(())
    return jax.tree.map(lambda p: p + jnp.zeros_like(anchor, p.dtype), params)


def clipped_grad_sum(loss_fn: LossFn, params: PyTree, batch: Mapping[str, jax.Array], rng: jax.Array, *,
                     clipping: ClippingConfig, microbatch_size: int, position_offset: int | jax.Array = 0
                     ) -> tuple[PyTree, dict[str, jax.Array]]:
    """Sum over the batch of clipped per-example gradients (no noise).

    Args:
      loss_fn: `loss_fn(params, views, rng) -> (loss [], aux {name: []})` for ONE example,
        views leaves [K, ...] (docs/interfaces.md).
      params: pytree of float arrays (any float dtype; gradients are summed in float32).
      batch: dict with `mask` float [B], optional `example_id` [B], other leaves [B, K, ...].
      rng: key; example i gets `fold_in(rng, example_id[i])` (`example_key_ids`: its position
        `position_offset + i` where the batch has no example ids).
      clipping: a `ClippingConfig`.
      microbatch_size: examples per vmapped chunk; B must be a multiple. The chunks are
        accumulated with `lax.scan` (no loop when microbatch_size == B), so peak memory is
        that of one chunk. On CPU, convolutions inside the scan are slow (jax-ml/jax#12868).
      position_offset: for batches without `example_id`: added to the position of each example
        before `fold_in` (use the device's offset under shard_map).

    Returns:
      grad_sum: pytree like params, float32: sum_i mask_i * clip(g_i).
      stats: {"norms": [B] pre-clipping per-example L2 norm (0 in a non-private mode, "none"),
              "loss": [B], "mask": [B], <aux key>: [B]}; all 0 on padding rows.
    """
    views, mask = checked_views(batch, microbatch_size, "clipped_grad_sum")
    batch_size = mask.shape[0]
    num_micro = batch_size // microbatch_size
    positions = example_key_ids(batch, position_offset)
    layer_norms = leaf_bounds(clipping, params)
    params = device_local_params(params, [mask, positions, raw_key(rng), *jax.tree.leaves(views)])

    def chunk(x: jax.Array) -> jax.Array:
        return x.reshape((num_micro, microbatch_size) + x.shape[1:])

    xs = (jax.tree.map(chunk, views), chunk(mask), chunk(positions))
    per_example_value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)

    def private_body(acc: PyTree, x):
        views_mb, mask_mb, pos_mb = x
        keys = jax.vmap(lambda p: jax.random.fold_in(rng, p))(pos_mb)
        (losses, aux), grads = jax.vmap(per_example_value_and_grad, in_axes=(None, 0, 0))(params, views_mb, keys)
        clipped, norms = jax.vmap(lambda g: clip_gradient(g, clipping, layer_norms))(grads)
        real = mask_mb > 0

        def masked_sum(g: jax.Array) -> jax.Array:
            # where (not multiply): a NaN/inf gradient of a padding row still gives exactly 0.
            return jnp.sum(jnp.where(real.reshape((-1,) + (1,) * (g.ndim - 1)), g, 0.0), axis=0)

        acc = jax.tree.map(lambda a, g: a + masked_sum(g), acc, clipped)
        stats = {"norms": norms, "loss": losses, **aux_to_stats(aux)}
        stats = {k: jnp.where(real, v.astype(jnp.float32), 0.0) for k, v in stats.items()}
        return acc, stats

    def nonprivate_body(acc: PyTree, x):
        views_mb, mask_mb, pos_mb = x
        keys = jax.vmap(lambda p: jax.random.fold_in(rng, p))(pos_mb)
        real = mask_mb > 0

        def summed_loss(p: PyTree):
            losses, aux = jax.vmap(loss_fn, in_axes=(None, 0, 0))(p, views_mb, keys)
            return jnp.sum(jnp.where(real, losses, 0.0).astype(jnp.float32)), (losses, aux)

        grad, (losses, aux) = jax.grad(summed_loss, has_aux=True)(params)
        acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grad)
        stats = {"norms": jnp.zeros_like(mask_mb), "loss": losses, **aux_to_stats(aux)}
        stats = {k: jnp.where(real, v.astype(jnp.float32), 0.0) for k, v in stats.items()}
        return acc, stats

    body = private_body if clipping.record.private else nonprivate_body
    init = jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params)
    if num_micro == 1:
        # No loop for a single microbatch: XLA:CPU runs convolutions inside loop bodies with
        # a slow generic kernel (jax-ml/jax#12868; measured 10-25x on a small conv net).
        grad_sum, stats = body(init, jax.tree.map(lambda x: x[0], xs))
    else:
        grad_sum, stats = jax.lax.scan(body, init, xs)
    stats = {k: v.reshape((batch_size,)) for k, v in stats.items()}
    stats["mask"] = mask
    return grad_sum, stats


def accumulate(grad_sum_a: PyTree, grad_sum_b: PyTree) -> PyTree:
    """Leaf-wise sum of two clipped gradient sums (e.g. over physical batches of one update)."""
    return jax.tree.map(jnp.add, grad_sum_a, grad_sum_b)


def zeros_like_grad_sum(params: PyTree) -> PyTree:
    """A float32 zero accumulator with the structure of params."""
    return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)


class DpAggregateState(NamedTuple):
    """State of `dp_aggregate`: the index of the next optimizer update (int32 []) and the
    secret noise key (kept in the state, so it is an argument of compiled updates, not a constant)."""

    update_index: jax.Array
    noise_base_key: jax.Array


def dp_aggregate(*, noise_base_key: jax.Array, noise_multiplier: float, clip_norm: float,
                 expected_batch_size: float) -> optax.GradientTransformation:
    """Optax transformation: clipped gradient SUM -> noisy mean gradient.

    `updates` fed to it must be the global `clipped_grad_sum` of one update (already summed
    over physical batches, devices and hosts). It calls `dpft.privacy.noise.privatize` with
    key `noise_key(noise_base_key, update_index)` (the base key from the run's secret,
    `dpft.privacy.keys.noise_base_key` / `PrivacyPlan.noise_base_key()`) and counts updates in
    its state, so chain it before any optax optimizer: `optax.chain(dp_aggregate(...), optax.adam(1e-3))`.
    Shapes are unchanged; output leaves are float32.
    """
    from dpft.privacy import noise  # local import: noise imports nothing from here

    def init_fn(params: PyTree) -> DpAggregateState:
        del params
        return DpAggregateState(update_index=jnp.zeros([], jnp.int32), noise_base_key=noise_base_key)

    def update_fn(updates: PyTree, state: DpAggregateState, params: PyTree | None = None):
        del params
        key = noise.noise_key(state.noise_base_key, state.update_index)
        noisy = noise.privatize(updates, key, noise_multiplier=noise_multiplier, clip_norm=clip_norm,
                                expected_batch_size=expected_batch_size)
        return noisy, DpAggregateState(update_index=state.update_index + 1, noise_base_key=state.noise_base_key)

    return optax.GradientTransformation(init_fn, update_fn)
