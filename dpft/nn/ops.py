"""Pure numerical ops of dpft's layers (NHWC images, HWIO kernels, [in, out] linear weights).

The book-keeping engine (`dpft.privacy.bookkeeping`) recognises `ws_conv` and `linear` by
identity and computes their per-example gradient norms from (input, output gradient); the
models (`dpft.models.layers`) apply them through `dpft.nn.taps.tap`. Both import this module,
so neither the engine nor the models import each other.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

Array = jax.Array
DType = Any

#: Gamma of the tanh-approximate GELU so that act(N(0,1)) has unit second moment
#: (Brock et al. 2021, the `nonlinearities` table of the reference).
GELU_GAMMA = 1.7015043497085571
#: Epsilon of the scaled weight standardisation (reference default).
WS_EPS = 1e-4


def scaled_gelu(x: Array) -> Array:
    """tanh-approximate GELU times ``GELU_GAMMA``; same shape and dtype as ``x``."""
    return jax.nn.gelu(x, approximate=True) * jnp.asarray(GELU_GAMMA, x.dtype)


def scaled_relu(x: Array) -> Array:
    """ReLU times its signal-preserving gamma (reference table)."""
    return jax.nn.relu(x) * jnp.asarray(1.7139588594436646, x.dtype)


ACTIVATIONS = {"gelu": scaled_gelu, "relu": scaled_relu, "plain_relu": jax.nn.relu}


def standardize_weight(w: Array, gain: Array, eps: float = WS_EPS) -> Array:
    """Scaled weight standardisation of an HWIO kernel.

    ``(w - mean) * rsqrt(max(var * fan_in, eps)) * gain`` with the mean and the
    biased variance over H, W, I and ``fan_in = H * W * I``; computed as the
    reference does (``w * scale - mean * scale``). w: [H, W, I, O], gain: [O].
    """
    mean = jnp.mean(w, axis=(0, 1, 2), keepdims=True)
    var = jnp.var(w, axis=(0, 1, 2), keepdims=True)
    fan_in = math.prod(w.shape[:-1])
    scale = lax.rsqrt(jnp.maximum(var * fan_in, eps)) * gain
    return w * scale - mean * scale


def avg_pool_same(x: Array, window: int = 2, stride: int = 2) -> Array:
    """Average pool with SAME padding over H, W of NHWC ``x``; padding is
    excluded from each average (as ``hk.avg_pool``; flax's counts it).

    [B, H, W, C] -> [B, ceil(H/stride), ceil(W/stride), C].
    """
    dims = (1, window, window, 1)
    strides = (1, stride, stride, 1)
    pads = lax.padtype_to_pads(x.shape, dims, strides, "SAME")
    # A concrete numpy zero lets jax pick the differentiable reduce_window_sum (a traced
    # jnp zero gives the generic reduce_window, which has no reverse-mode rule).
    zero = np.zeros((), x.dtype)
    sums = lax.reduce_window(x, zero, lax.add, dims, strides, pads)
    ones = jnp.ones((1, x.shape[1], x.shape[2], 1), x.dtype)
    counts = lax.reduce_window(ones, zero, lax.add, dims, strides, pads)
    return sums / counts


def stochastic_depth(x: Array, rate: float, uniform: Array) -> Array:
    """Drop whole examples of ``x`` [B, ...] with probability ``rate``, no rescaling
    (reference ``StochDepth(scale_by_keep=False)``): keep iff ``1 - rate + u >= 1``.

    ``uniform``: [B] U[0, 1) draws, one per example (drawn by the caller so that a
    deep net needs one random op, not one per block: each ``jax.random`` call is
    slow to compile on CPU).
    """
    keep = jnp.floor(1.0 - rate + uniform.astype(jnp.float32))
    return x * keep.reshape((x.shape[0],) + (1,) * (x.ndim - 1)).astype(x.dtype)


def dropout(x: Array, rate: float, key: Array) -> Array:
    """Inverted dropout (as ``hk.dropout``): keep with prob 1-rate, scale by 1/(1-rate)."""
    keep_prob = 1.0 - rate
    keep = jax.random.bernoulli(key, keep_prob, x.shape)
    return jnp.where(keep, x / jnp.asarray(keep_prob, x.dtype), jnp.zeros((), x.dtype))


def ws_conv(params: dict[str, Array], x: Array, *, stride: int, groups: int, dtype: DType) -> Array:
    """Weight-standardised convolution (the op of ``WSConv2D``), SAME padding.

    params: ``w`` [k, k, in/groups, out], ``gain`` [out], ``bias`` [out] (float32);
    x: [B, H, W, in] -> [B, H/stride, W/stride, out] in ``dtype``.
    """
    w = standardize_weight(params["w"].astype(jnp.float32), params["gain"].astype(jnp.float32))
    out = lax.conv_general_dilated(
        x.astype(dtype), w.astype(dtype), window_strides=(stride, stride), padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)
    return out + params["bias"].astype(dtype)


def linear(params: dict[str, Array], x: Array, *, dtype: DType) -> Array:
    """``x @ w + b`` in ``dtype``: params ``w`` [in, out], ``b`` [out]; x [..., in] -> [..., out]."""
    return x.astype(dtype) @ params["w"].astype(dtype) + params["b"].astype(dtype)


def group_norm(params: dict[str, Array], x: Array, *, groups: int, eps: float, dtype: DType) -> Array:
    """Group normalisation of NHWC ``x`` per example (float32 statistics, biased variance),
    then ``* scale + offset`` (params [C]). Output in ``dtype``."""
    b, h, w, c = x.shape
    xg = x.astype(jnp.float32).reshape(b, h, w, groups, c // groups)
    mean = jnp.mean(xg, axis=(1, 2, 4), keepdims=True)
    var = jnp.var(xg, axis=(1, 2, 4), keepdims=True)
    xg = (xg - mean) * lax.rsqrt(var + eps)
    out = xg.reshape(b, h, w, c) * params["scale"] + params["offset"]
    return out.astype(dtype)


def self_attention(query: Array, key: Array, value: Array, bias: Array | None = None,
                   mask: Array | None = None, **options: Any) -> Array:
    """Multi-head dot-product attention with no size-1 axes: an ``attention_fn`` for
    ``nnx.MultiHeadAttention``. ``query`` [..., Q, H, D], ``key``/``value`` [..., S, H, D]
    -> [..., Q, H, D] in ``value``'s dtype.

    The arithmetic of ``jax.nn.dot_product_attention``'s XLA path (logits accumulated in
    float32, scaled by D^-1/2, float32 softmax), written as two einsums over the model's own
    batch axes, leading batch axes of size 1 dropped (a per-example call under ``jax.vmap``
    has a batch of one). That path reshapes heads into [groups, 1] and vmaps over the size-1
    group axis; XLA:CPU runs the fused dots and softmax around such axes slower (ViT-Ti/16 on
    2 CPU cores: the non-private step 6 %, the book-keeping DP step 9-16 % faster without;
    ``benchmarks/attention_formulations.py``). Options that need more (``bias``, ``mask``,
    ``is_causal``, active dropout, ``module`` for sown weights, grouped heads) go to
    ``nnx.dot_product_attention`` unchanged.
    """
    general = (bias is not None or mask is not None or options.get("is_causal", False)
               or options.get("module") is not None or query.shape[-2] != key.shape[-2]
               or not query.shape[:-3] == key.shape[:-3] == value.shape[:-3]
               or (options.get("dropout_rate", 0.0) > 0.0 and not options.get("deterministic", False)))
    if general:
        return nnx.dot_product_attention(query, key, value, bias, mask, **options)
    dtype = options.get("dtype")
    if dtype is not None:
        query, key, value = (x.astype(dtype) for x in (query, key, value))
    # Leading size-1 axes (a per-example call's batch of one under jax.vmap) are dropped for the dots.
    squeeze = tuple(i for i, n in enumerate(query.shape[:-3]) if n == 1)
    out = attention_einsums(*(jnp.squeeze(x, squeeze) for x in (query, key, value)), options.get("precision"))
    return out.reshape(query.shape[:-1] + value.shape[-1:])


def attention_einsums(query: Array, key: Array, value: Array, precision: Any = None) -> Array:
    """softmax(q k^T / sqrt(D)) v over the batch axes as given (``self_attention`` without its
    checks and squeeze): ``query`` [..., Q, H, D], ``key``/``value`` [..., S, H, D] -> [..., Q, H, D].
    Logits in float32 (bf16 inputs through the ``BF16_BF16_F32`` dot, as
    ``jax.nn.dot_product_attention``), float32 softmax, weights cast to ``key``'s dtype."""
    logits_dtype = jnp.promote_types(query.dtype, jnp.float32)
    logits_precision = precision
    if precision is None and query.dtype == jnp.bfloat16:
        logits_precision = lax.DotAlgorithmPreset.BF16_BF16_F32
    logits = jnp.einsum("...qhd,...khd->...hqk", query, key, precision=logits_precision,
                        preferred_element_type=logits_dtype)
    logits = logits * jnp.asarray(1.0 / math.sqrt(query.shape[-1]), logits.dtype)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(key.dtype)
    return jnp.einsum("...hqk,...khd->...qhd", probs, value, precision=precision)
