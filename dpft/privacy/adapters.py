"""Build the engine's `loss_fn(params, views, rng) -> (loss, aux)` from a model.

* `nnx_loss_fn(model, per_view_loss)` for a Flax NNX module.
* `haiku_loss_fn(transformed, per_view_loss)` for an `hk.transform`ed `f(images) -> logits`.

`per_view_loss(logits [K, ...], views) -> (losses [K], aux {name: [K]})` scores the K views of
ONE example (a bare `losses` array is accepted too); the adapters average losses and aux over
K, so the gradient of the loss is the augmult average of the per-view gradients.
A privacy unit with several images (`dpft.privacy.units`, a patient) is one "example" whose views
are its images' views stacked, [cap*K, ...], with `views["view_weight"]` [cap*K] (1/K on a real
image's views, 0 on empty slots): its loss is sum_v weight_v * loss_v, the sum over its images of
their augmult-averaged losses, and its aux the weighted mean over its real images.
Two standard per-view losses are provided: `softmax_cross_entropy_loss` (int labels [K])
and `sigmoid_binary_cross_entropy_loss` (float 0/1 labels [K, L] with `label_mask`).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dpft.nn import nnx_layers, taps

PyTree = Any
Views = Mapping[str, jax.Array]
PerViewLoss = Callable[[jax.Array, Views], Any]
LossFn = Callable[[PyTree, Views, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def softmax_cross_entropy_loss(logits: jax.Array, views: Views) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Multi-class: logits [K, C], views["label"] int [K] -> (losses [K], {"accuracy": [K]})."""
    logits = logits.astype(jnp.float32)
    labels = views["label"].astype(jnp.int32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    accuracy = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return losses, {"accuracy": accuracy}


def sigmoid_binary_cross_entropy_loss(logits: jax.Array, views: Views) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Multi-label: logits [K, L], views["label"] float 0/1 [K, L], optional views["label_mask"]
    [K, L] (0 = ignore). Loss per view = mean of the binary cross-entropies over unmasked labels
    (0 if all are masked). Aux "accuracy" [K]: fraction of unmasked labels with sign(logit)
    matching the label."""
    logits = logits.astype(jnp.float32)
    labels = views["label"].astype(jnp.float32)
    mask = views.get("label_mask")
    mask = jnp.ones_like(labels) if mask is None else mask.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
    bce = optax.sigmoid_binary_cross_entropy(logits, labels)
    losses = jnp.sum(jnp.where(mask > 0, bce, 0.0), axis=-1) / count
    correct = ((logits > 0).astype(jnp.float32) == labels).astype(jnp.float32)
    accuracy = jnp.sum(jnp.where(mask > 0, correct, 0.0), axis=-1) / count
    return losses, {"accuracy": accuracy}


def _mean_over_views(out: Any, views: Views) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The example's loss: the mean over its K views, or, with views["view_weight"] [V] (a unit of
    several images), sum_v weight_v * loss_v; aux: the mean, or the weighted mean over real images."""
    losses, aux = out if isinstance(out, tuple) else (out, {})
    if losses.ndim != 1:
        raise ValueError(f"per_view_loss must return losses of shape [K], got {losses.shape}")
    losses = losses.astype(jnp.float32)
    if "view_weight" not in views:
        return jnp.mean(losses), {k: jnp.mean(jnp.asarray(v, jnp.float32)) for k, v in aux.items()}
    weight = jnp.asarray(views["view_weight"], jnp.float32)
    if weight.shape != losses.shape:
        raise ValueError(f"views['view_weight'] has shape {weight.shape}; the losses have {losses.shape}")
    total = jnp.maximum(jnp.sum(weight), jnp.finfo(jnp.float32).tiny)
    # where, not multiply: an empty slot's (zero-image) loss never reaches the sum, even if not finite.
    return (jnp.sum(jnp.where(weight > 0, weight * losses, 0.0)),
            {k: jnp.sum(jnp.where(weight > 0, weight * jnp.asarray(v, jnp.float32), 0.0)) / total
             for k, v in aux.items()})


def accepts_train_and_key(fn: Callable) -> bool:
    """True if `fn` takes keyword arguments `train` and `key` (or **kwargs)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return True
    return "train" in params and "key" in params


def nnx_loss_fn(model: nnx.Module, per_view_loss: PerViewLoss
                ) -> tuple[LossFn, nnx.State, Callable[[nnx.State], nnx.Module]]:
    """Split an NNX module into a pure loss function, its trainable params and a merge.

    `graphdef, params, rest = nnx.split(model, nnx.Param, ...)`: everything that is not an
    `nnx.Param` (buffers, counters) is kept as a constant, so mutations of it inside the
    loss are dropped. The returned `loss_fn(params, views, rng)` merges a fresh module and
    calls it on views["image"] [K, H, W, C] as `module(images, train=True, key=rng)` when its
    `__call__` accepts `train` and `key` (every dpft model does, docs/interfaces.md), else
    `module(images)`; then `per_view_loss(logits [K, C], views)`, averaged over K.
    `merge(params)` rebuilds a module (e.g. for evaluation).
    `loss_fn.tapped(params, views, rng, recorder)` is the same loss with a
    `dpft.nn.taps.Recorder` installed on the module (used by `dpft.privacy.bookkeeping`): the
    taps of dpft's layers and of standard flax layers (`dpft.nn.nnx_layers.install`), and the
    recorder's `param_perturbations` added to their parameters first.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    pass_train_key = accepts_train_and_key(type(model).__call__)

    def merge(p: nnx.State) -> nnx.Module:
        return nnx.merge(graphdef, p, rest)

    def tapped_loss_fn(p: nnx.State, views: Views, rng: jax.Array, recorder: Any = None):
        if recorder is not None and recorder.param_perturbations:
            perts = recorder.param_perturbations
            p = jax.tree_util.tree_map_with_path(
                lambda kp, v: v + perts[path].astype(v.dtype) if (path := taps.param_path(kp)) in perts else v, p)
        module = merge(p)
        if recorder is not None:
            nnx_layers.install(module, recorder)
        images = views["image"]
        logits = module(images, train=True, key=rng) if pass_train_key else module(images)
        return _mean_over_views(per_view_loss(logits, views), views)

    def loss_fn(p: nnx.State, views: Views, rng: jax.Array):
        return tapped_loss_fn(p, views, rng)

    loss_fn.tapped = tapped_loss_fn  # for dpft.privacy.bookkeeping
    return loss_fn, params, merge


def restrict_loss(loss_fn: LossFn, frozen: PyTree, combine: Callable[[PyTree, PyTree], PyTree],
                  frozen_paths: frozenset) -> LossFn:
    """`loss_fn` as a function of the trainable part only: `restricted(t, views, rng) = loss_fn(combine(t,
    frozen), views, rng)` (`dpft.nn.partition.Partition.split/combine`), so the engine differentiates,
    clips and sums over t alone and the frozen part is a constant of the loss. `frozen` may be traced
    (an argument of the compiled step, never a compiled-in constant). `.tapped` likewise (when
    `loss_fn` has one); `.frozen_paths` tells `dpft.privacy.bookkeeping` which ops not to tap (and
    `.frozen_values` gives it the frozen kernels of the ops it norms for their trained gain and bias)."""
    def restricted(t: PyTree, views: Views, rng: jax.Array):
        return loss_fn(combine(t, frozen), views, rng)

    tapped = getattr(loss_fn, "tapped", None)
    if tapped is not None:
        restricted.tapped = lambda t, views, rng, recorder=None: tapped(combine(t, frozen), views, rng, recorder)
    restricted.frozen_paths = frozenset(frozen_paths)
    restricted.frozen_values = frozen  # read by book-keeping's routes for partly frozen ops (a frozen conv kernel)
    return restricted


def haiku_loss_fn(transformed: Any, per_view_loss: PerViewLoss) -> LossFn:
    """Loss function for `transformed = hk.transform(f)` with `f(images [K,H,W,C]) -> logits`.

    Calls `transformed.apply(params, rng, views["image"])` (params: the haiku dict
    {module: {name: array}}), then `per_view_loss`, averaged over K.
    """
    def loss_fn(params: PyTree, views: Views, rng: jax.Array):
        logits = transformed.apply(params, rng, views["image"])
        return _mean_over_views(per_view_loss(logits, views), views)

    return loss_fn
