"""Per-example gradient norms and weighted gradient sums of standard Flax NNX layers, from each
example's layer input x and output gradient d (the book-keeping engine's step 2 and 3 for the
kinds "nnx_dense", "nnx_conv", "nnx_embed", "nnx_norm" of `dpft.nn.nnx_layers`), and the pieces
`dpft.privacy.bookkeeping` builds its ws_conv route from: the one route rule (`use_ghost`), the
patches (`conv_patches`, `conv_patches_cm`), the Gram norms (`ghost_sq_norms`), the materialised
conv gradients (`conv_grads`) and the weighted row sum (`weighted_rows`). dpft's ``ops.linear``
is a dense layer here (`dense_norms`).

Dense and conv layers are a matmul g_i = A_i^T D_i per group (A: input rows, or conv patches
with features ordered as the kernel's (*k, in/groups); D: output-gradient rows). The squared
norm is either a ghost norm <A_i A_i^T, D_i D_i^T> (Li et al. 2022) or ||g_i||^2 of the
materialised g_i, whichever needs fewer flops (`use_ghost`; Bu et al. 2023); the weighted sum
sum_i w_i g_i is one contraction of (A, w D) on the ghost route, or of the kept g_i. An
embedding's gradient is a scatter-add of D_i's rows at the indices: its norm is the ghost
sum_{r,s} [idx_r = idx_s] <d_r, d_s> or the materialised table, by the same rule.
Norms and sums are accumulated in float32; a row of weight 0 contributes exactly 0 (even with NaN
activations: padding). Contractions take float32 operands at HIGHEST precision, or, on an
accelerator with bfloat16 x and d ("native", `native_operands`), the layer's own bfloat16
operands with float32 accumulation (tensor cores): a product of two bfloat16 numbers is exact in
float32, so a norm differs from the float32 one only in summation order; a weighted sum, whose
weighted output gradients w_i d_i are float32, contracts x with their bfloat16 high and low parts
(`split_dot`: relative error at most 2^-17 per element, inside the sensitivity test's 1e-4).
All functions take x [m, *one call's input shape], d [m, *one call's output shape] and return
(squared norms float32 [m], summer: weights float32 [m] -> {param name: float32 array shaped
like the param}).
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from dpft.nn import nnx_layers

F32 = jnp.float32
F32_BYTES = 4
#: Full float32 matmuls for norms and sums (GPUs would otherwise use TF32 for float32 dots, and a
#: norm 0.1% low lets a clipped contribution exceed C).
HI = lax.Precision.HIGHEST
Summer = Callable[[jax.Array], dict]
MATMUL_CHOICES = ("auto", "native", "float32")
LOW = (jnp.bfloat16,)


def native_operands(matmul: str, *arrays: jax.Array) -> bool:
    """Whether a layer's contractions take its own bfloat16 operands (float32 accumulation) rather
    than float32 operands at HIGHEST precision: never unless every array is bfloat16; then
    "native": yes, "float32": no, "auto": yes off CPU (GPU/TPU tensor cores; XLA:CPU has no faster
    bfloat16 matmul, so the float32 route, with the same exact products, stays there)."""
    if matmul not in MATMUL_CHOICES:
        raise ValueError(f"matmul={matmul!r}; use one of {MATMUL_CHOICES}")
    if matmul == "float32" or not all(a.dtype in LOW for a in arrays):
        return False
    return matmul == "native" or jax.default_backend() != "cpu"


def dot(spec: str, a: jax.Array, b: jax.Array, native: bool) -> jax.Array:
    """float32 einsum of two operands: two bfloat16 operands with float32 accumulation if
    ``native`` (exact products), else (also for a float32 operand, e.g. weighted output
    gradients) both cast to float32 at HIGHEST precision, never the backend's default (TF32)."""
    if native and a.dtype in LOW and b.dtype in LOW:
        return jnp.einsum(spec, a, b, preferred_element_type=F32)
    return jnp.einsum(spec, a.astype(F32), b.astype(F32), precision=HI)


def split_dot(spec: str, a: jax.Array, b: jax.Array, native: bool) -> jax.Array:
    """float32 einsum of ``a`` (bfloat16 if ``native``) with a float32 ``b`` (e.g. weighted output
    gradients): if ``native``, as two bfloat16 contractions with b's high and low bfloat16 parts,
    b = hi + lo + r with |r| <= 2^-17 |b| elementwise (hi: b rounded to bf16 on its bits, lo:
    the exact rest rounded to bf16); else float32 at HIGHEST precision."""
    if not native:
        return dot(spec, a, b, False)
    # hi: b rounded to its nearest bf16 number by integer arithmetic on the bits (a float32 ->
    # bf16 -> float32 round trip could be removed by XLA's excess-precision simplification,
    # which would leave lo = 0); b - hi is exact in float32, |b - hi| <= 2^-8 |b|.
    bits = lax.bitcast_convert_type(b.astype(F32), jnp.uint32)
    hi32 = lax.bitcast_convert_type((bits + jnp.uint32(0x8000)) & jnp.uint32(0xFFFF0000), F32)
    hi, lo = hi32.astype(jnp.bfloat16), (b - hi32).astype(jnp.bfloat16)
    return dot(spec, a, hi, True) + dot(spec, a, lo, True)


def matmul_flops(rows: int, fan_in: int, fan_out: int) -> tuple[int, int]:
    """(ghost, materialised) flops of one example's squared norm ||A^T D||^2 for one group,
    A [R, n], D [R, o] (a dense layer's rows, a conv's patches): the two Gram matrices,
    R^2 (n + o), against the product A^T D, R n o."""
    return rows * rows * (fan_in + fan_out), rows * fan_in * fan_out


def embed_flops(rows: int, vocab: int, features: int) -> tuple[int, int]:
    """(ghost, materialised) flops of one example's squared norm of an embedding gradient, the
    scatter-add of its R output-gradient rows [R, F] into a [V, F] table: the rows' Gram masked
    by index equality, R^2 F, against the table, V F."""
    return rows * rows * features, vocab * features


class RouteCost(NamedTuple):
    """What one example's squared norm costs on each route, for one group of one layer: flops, and
    the float32 bytes the route writes (ghost: its R x R Gram matrices; materialised: the per-example
    gradient, or an embedding's [V, F] table)."""

    ghost_flops: int
    materialised_flops: int
    ghost_bytes: int
    materialised_bytes: int


def matmul_cost(rows: int, fan_in: int, fan_out: int) -> RouteCost:
    """`RouteCost` of a matmul norm (`matmul_flops`): bytes 2 R^2 x 4 (A A^T and D D^T) against n o x 4."""
    ghost_flops, materialised_flops = matmul_flops(rows, fan_in, fan_out)
    return RouteCost(ghost_flops, materialised_flops, 2 * rows * rows * F32_BYTES, fan_in * fan_out * F32_BYTES)


def embed_cost(rows: int, vocab: int, features: int) -> RouteCost:
    """`RouteCost` of an embedding norm (`embed_flops`): bytes 2 R^2 x 4 (the index mask and the rows'
    Gram) against the table, V F x 4."""
    ghost_flops, materialised_flops = embed_flops(rows, vocab, features)
    return RouteCost(ghost_flops, materialised_flops, 2 * rows * rows * F32_BYTES, vocab * features * F32_BYTES)


#: The route rules of `use_ghost`: "auto" (fewer flops), "bytes" (fewer bytes written), or one route
#: for every layer ("always" ghost, "never" ghost).
GHOST_CHOICES = ("auto", "bytes", "always", "never")


def use_ghost(ghost: str, cost: RouteCost) -> bool:
    """The one route rule of every tapped layer (dpft's ws_conv and linear ops, nnx dense, conv
    and embedding layers): a ghost norm (Li et al. 2022) or the materialised per-example
    gradient, chosen per layer (Bu et al. 2023, mixed ghost clipping).

    ``cost``: both routes' flops and bytes for one example's norm (`matmul_cost`, `embed_cost`).
    ghost "auto": the ghost norm iff it needs strictly fewer flops; "bytes": iff it writes strictly
    fewer bytes, on a tie fewer flops (the space rule of Bu et al.'s mixed ghost clipping, 2 R^2 <
    n o for a matmul); "always" / "never" force one route for every layer. Both routes are exact;
    only time and memory differ. Measured (benchmarks/README.md): ViT-Ti/16 224 px, B=8, XLA:CPU,
    book-keeping accumulate step 354.1 ms with "auto" against 465.7 ms with "always" (plain jax.grad
    293.7 ms; section "Logical batches, and where the rest of the CPU gap is"); ViT-Ti full step
    0.76-0.78x the plain step with "auto", 0.64x with "always" ("Peers on the same networks"). The
    flop rule puts 51 of NFNet-F0's 82 matmul layers (192 px) on the ghost route, and its materialised
    ones write float32 per-example gradients (432 MiB for each 12 x 12 grouped 3x3 conv at b=128, 122
    MiB as ghost norms); what the byte rule does to the compiled DP step is `benchmarks/cost_model.py
    --ghost auto bytes`, and whether it is faster on a GPU is `benchmarks/gpu_check.py`'s method
    ``bookkeeping_bytes`` (unmeasured: benchmarks/README.md)."""
    if ghost not in GHOST_CHOICES:
        raise ValueError(f"ghost={ghost!r}; use one of {GHOST_CHOICES}")
    if ghost in ("always", "never"):
        return ghost == "always"
    if ghost == "bytes" and cost.ghost_bytes != cost.materialised_bytes:
        return cost.ghost_bytes < cost.materialised_bytes
    return cost.ghost_flops < cost.materialised_flops


def keep_per_example_grads(param_size: int, x_size: int, d_size: int) -> bool:
    """Memory rule of the materialised route: keep each example's gradient (param_size elements)
    from the norm to the weighted sum iff it is no larger than the layer's input and output
    gradient (x_size + d_size elements per example), which the sum would otherwise need (then
    the sum is one weight-gradient contraction at (x, weights * d)). Exact either way."""
    return param_size <= x_size + d_size


def _keep(weights: jax.Array, v: jax.Array, scaled: bool) -> jax.Array:
    """Rows of v [m, ...] times weights (if scaled), rows of weight 0 set to exactly 0."""
    shape = (-1,) + (1,) * (v.ndim - 1)
    w = weights.reshape(shape).astype(F32)
    return jnp.where((weights != 0).reshape(shape), v * w if scaled else v, 0.0)


def weighted_rows(weights: jax.Array, v: jax.Array) -> jax.Array:
    """sum_i weights_i v_i over the leading axis, float32 at HIGHEST precision: weights [m],
    v [m, ...] -> [...]. Rows of weight 0 give exactly 0 (even NaN: padding)."""
    return jnp.tensordot(weights.astype(F32), _keep(weights, v, False), axes=1, precision=HI)


def _one_group(a: jax.Array, d: jax.Array) -> tuple[str, jax.Array, jax.Array]:
    """(group letter of an einsum spec, a, d) for a [m, R, g, n], d [m, R, g, o]: a size-1 group
    axis is dropped ("", [m, R, n], [m, R, o]). As a batch dimension of the per-example dots it
    made XLA:CPU lay the layer's activations out with that axis outermost and copy them before
    and after each dot (benchmarks/README.md, "Size-1 axes around the per-example dots")."""
    if a.shape[2] > 1:
        return "g", a, d
    return "", a.reshape(a.shape[:2] + a.shape[3:]), d.reshape(d.shape[:2] + d.shape[3:])


def ghost_sq_norms(a: jax.Array, d: jax.Array, native: bool = False) -> jax.Array:
    """sum over groups of ||A_ig^T D_ig||_F^2 = <A_ig A_ig^T, D_ig D_ig^T> without forming
    A_ig^T D_ig: a [m, R, g, n], d [m, R, g, o] -> float32 [m]. Each Gram contracts its operand
    in bfloat16 with float32 accumulation if ``native`` and that operand is bfloat16, else in
    float32 at HIGHEST precision (`dot`)."""
    G, a, d = _one_group(a, d)
    gram_a = dot(f"mr{G}n,ms{G}n->m{G}rs", a, a, native)
    gram_d = dot(f"mr{G}o,ms{G}o->m{G}rs", d, d, native)
    return jnp.sum(gram_a * gram_d, axis=tuple(range(1, gram_a.ndim)))


def matmul_norms(a: jax.Array, d: jax.Array, ghost: str, native: bool = False
                 ) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
    """a [m, R, g, n], d [m, R, g, o] (float32, or bfloat16 if ``native``) -> (sum_g ||A_ig^T
    D_ig||^2 [m], weights -> sum_i w_i A_i^T D_i [g, n, o]), float32; the route by `use_ghost`."""
    rows, groups, n, o = a.shape[1], a.shape[2], a.shape[3], d.shape[3]

    def grouped(v: jax.Array) -> jax.Array:  # [G, n, o] -> [g, n, o]
        return v.reshape((groups,) + v.shape[-2:])

    if use_ghost(ghost, matmul_cost(rows, n, o)):
        def ghost_sum(weights: jax.Array) -> jax.Array:
            G, aw, dw = _one_group(_keep(weights, a, False), _keep(weights, d.astype(F32), True))
            return grouped(split_dot(f"mr{G}n,mr{G}o->{G}no", aw, dw, native))

        return ghost_sq_norms(a, d, native), ghost_sum
    G, a, d = _one_group(a, d)
    if n <= o:
        g, transposed = dot(f"mr{G}n,mr{G}o->m{G}no", a, d, native), False
    else:
        # The per-example gradient transposed, G_i^T = D_i^T A_i [g, o, n]: a matmul transposes
        # the operand whose contracted rows are not its minor axis (the first), so the narrower
        # one goes first (on CPU, ViT's MLP output layer: a [m, 197, 768] transposed copy per
        # example otherwise); norms need no layout, and the kept sum is transposed once.
        g, transposed = dot(f"mr{G}o,mr{G}n->m{G}on", d, a, native), True

    def kept_sum(weights: jax.Array) -> jax.Array:
        s = weighted_rows(weights, g)
        return grouped(jnp.swapaxes(s, -1, -2) if transposed else s)

    return jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim))), kept_sum


def _with_bias(params: Mapping[str, jax.Array], sq: jax.Array, kernel_sum: Callable, d_rows: jax.Array,
               to_kernel: Callable[[jax.Array], jax.Array]) -> tuple[jax.Array, Summer]:
    """Adds the bias (gradient: the sum of the output-gradient rows d_rows [m, R, out]) if any."""
    has_bias = "bias" in params
    b_rows = jnp.sum(d_rows, axis=1) if has_bias else None
    if has_bias:
        sq = sq + jnp.sum(jnp.square(b_rows), axis=1)

    def summer(weights: jax.Array) -> dict[str, jax.Array]:
        out = {"kernel": to_kernel(kernel_sum(weights)).reshape(params["kernel"].shape)}
        if has_bias:
            out["bias"] = weighted_rows(weights, b_rows).reshape(params["bias"].shape)
        return out

    return sq, summer


def dense_norms(params: Mapping[str, jax.Array], x: jax.Array, d: jax.Array, cfg: nnx_layers.Dense,
                ghost: str = "auto", matmul: str = "auto") -> tuple[jax.Array, Summer]:
    """nnx.Linear / nnx.LinearGeneral: kernel [*in, *out], bias [*out] (optional)."""
    m = x.shape[0]
    native = native_operands(matmul, x, d)
    cdt = x.dtype if native else F32
    axes = [1 + a for a in cfg.in_axes]
    n_in = math.prod(x.shape[a] for a in axes)
    xm = jnp.moveaxis(x, axes, list(range(x.ndim - len(axes), x.ndim)))
    a = xm.astype(cdt).reshape(m, -1, 1, n_in)
    n_out = params["kernel"].size // n_in
    dd = d.astype(cdt).reshape(m, a.shape[1], 1, n_out)
    sq, kernel_sum = matmul_norms(a, dd, ghost, native)
    return _with_bias(params, sq, kernel_sum, d.astype(F32).reshape(m, a.shape[1], n_out), lambda g: g[0])


def conv_patches(x: jax.Array, cfg: nnx_layers.Conv) -> jax.Array:
    """The patches of a channels-last conv input by strided slicing (no convolution):
    x [N, *spatial, C] -> [N, *out spatial, prod(kernel_size), C], kernel offsets row-major."""
    if cfg.pre_pad is not None:
        mode, pre = cfg.pre_pad
        x = jnp.pad(x, ((0, 0),) + tuple(pre) + ((0, 0),), mode=mode)
    nd = len(cfg.kernel_size)
    if all(k == 1 for k in cfg.kernel_size) and all(s == 1 for s in cfg.strides) and not any(
            lo or hi for lo, hi in cfg.pads):
        return x[..., None, :]
    zero = jnp.zeros((), x.dtype)
    x = lax.pad(x, zero, ((0, 0, 0),) + tuple((lo, hi, 0) for lo, hi in cfg.pads) + ((0, 0, 0),))
    outs = [(x.shape[1 + j] - ((cfg.kernel_size[j] - 1) * cfg.dilation[j] + 1)) // cfg.strides[j] + 1
            for j in range(nd)]
    slices = []
    for offs in itertools.product(*[range(k) for k in cfg.kernel_size]):
        start = [0] + [o * dl for o, dl in zip(offs, cfg.dilation)] + [0]
        limit = ([x.shape[0]] + [st + s * (n - 1) + 1 for st, s, n in zip(start[1:], cfg.strides, outs)]
                 + [x.shape[-1]])
        slices.append(lax.slice(x, start, limit, (1,) + tuple(cfg.strides) + (1,)))
    return jnp.stack(slices, axis=-2)


def conv_patches_cm(x: jax.Array, cfg: nnx_layers.Conv) -> jax.Array:
    """The patches of a channels-last conv input in channel-major layout, by strided slicing:
    x [N, *spatial, C] -> [N, groups, prod(kernel_size) * C/groups, *out spatial], features
    ordered as the kernel's (*k, in/groups) (offsets row-major). The output positions are the
    last, contiguous axes and the slices are concatenated along the feature axis (one fused
    copy), so the per-example gradient A_i^T D_i is a plain batched matmul [n, R] @ [R, out]
    with no transpose of the patches (on CPU several times cheaper than the channels-last
    `conv_patches` plus the transpose XLA inserts before the matmul)."""
    nd, g = len(cfg.kernel_size), cfg.groups
    if _is_patchify(cfg):
        return _patchify_cm(x, cfg)
    xt = jnp.transpose(x, (0, nd + 1) + tuple(range(1, nd + 1)))  # [N, C, *spatial]
    if cfg.pre_pad is not None:
        mode, pre = cfg.pre_pad
        xt = jnp.pad(xt, ((0, 0), (0, 0)) + tuple(pre), mode=mode)
    zero = jnp.zeros((), xt.dtype)
    xt = lax.pad(xt, zero, ((0, 0, 0), (0, 0, 0)) + tuple((lo, hi, 0) for lo, hi in cfg.pads))
    outs = [(xt.shape[2 + j] - ((cfg.kernel_size[j] - 1) * cfg.dilation[j] + 1)) // cfg.strides[j] + 1
            for j in range(nd)]
    cg = xt.shape[1] // g
    slices = []
    for gi in range(g):
        for offs in itertools.product(*[range(k) for k in cfg.kernel_size]):
            start = [0, gi * cg] + [o * dl for o, dl in zip(offs, cfg.dilation)]
            limit = [xt.shape[0], (gi + 1) * cg] + [st + s * (n - 1) + 1
                                                     for st, s, n in zip(start[2:], cfg.strides, outs)]
            slices.append(lax.slice(xt, start, limit, (1, 1) + tuple(cfg.strides)))
    p = slices[0] if len(slices) == 1 else lax.concatenate(slices, 1)
    return p.reshape((p.shape[0], g, -1) + tuple(outs))


def _is_patchify(cfg: nnx_layers.Conv) -> bool:
    """Non-overlapping patches (stride = kernel, no dilation, padding or pre-padding: a ViT's
    patch embedding), whose patches are a reshape and one transpose of the input."""
    return (tuple(cfg.strides) == tuple(cfg.kernel_size) and all(d == 1 for d in cfg.dilation)
            and not any(lo or hi for lo, hi in cfg.pads) and cfg.pre_pad is None)


def _patchify_cm(x: jax.Array, cfg: nnx_layers.Conv) -> jax.Array:
    """`conv_patches_cm` of a patchify conv (`_is_patchify`) by reshape + one transpose (the
    strided slices, one per kernel offset, re-read the input once per offset: 256 for 16x16)."""
    nd, g, k = len(cfg.kernel_size), cfg.groups, tuple(cfg.kernel_size)
    outs = [x.shape[1 + j] // k[j] for j in range(nd)]
    x = x[(slice(None),) + tuple(slice(0, o * kk) for o, kk in zip(outs, k)) + (slice(None),)]
    shape = [x.shape[0]] + [v for o, kk in zip(outs, k) for v in (o, kk)] + [g, x.shape[-1] // g]
    # axes of the reshaped x: 0 batch, 1 + 2j out_j, 2 + 2j k_j, 1 + 2 nd groups, 2 + 2 nd channels/group
    perm = [0, 1 + 2 * nd] + [2 + 2 * j for j in range(nd)] + [2 + 2 * nd] + [1 + 2 * j for j in range(nd)]
    p = jnp.transpose(x.reshape(shape), perm)
    return p.reshape((p.shape[0], g, -1) + tuple(outs))


def patch_rows(xr: jax.Array, m: int, cfg: nnx_layers.Conv) -> jax.Array:
    """A conv's patches as the ghost route's rows (`conv_patches`, row-major): xr [m K,
    *spatial, C] -> [m, K * out positions, groups, prod(kernel_size) * C/groups], features in
    the kernel's (*k, in/groups) order."""
    g, c = cfg.groups, xr.shape[-1]
    p = conv_patches(xr, cfg)  # [m K, *out, kt, C]
    a = jnp.moveaxis(p.reshape(p.shape[:-1] + (g, c // g)), -2, -3)  # [m K, *out, g, kt, C/g]
    return a.reshape(m, -1, g, p.shape[-2] * (c // g))


def _patch_columns(xr: jax.Array, m: int, cfg: nnx_layers.Conv) -> jax.Array:
    """Channel-major patches (`conv_patches_cm`) per example: xr [m K, *spatial, C] ->
    [m, K, groups, n, R] (n = prod(kernel_size) * C/groups features in the kernel's order, R
    output positions)."""
    a = conv_patches_cm(xr, cfg)  # [m K, g, n, *out]
    return a.reshape((m, a.shape[0] // m) + a.shape[1:3] + (math.prod(a.shape[3:]),))


def _output_rows(d: jax.Array, a: jax.Array) -> jax.Array:
    """d [m, K, *out spatial, out] as the rows of `_patch_columns`' a [m, K, g, n, R]:
    [m, K, R, g, out/g]."""
    return d.reshape(a.shape[:2] + (a.shape[-1], a.shape[2], -1))


def conv_grads(xr: jax.Array, d: jax.Array, cfg: nnx_layers.Conv, native: bool = False) -> jax.Array:
    """The per-example kernel gradients of a conv, materialised: G_i = sum_k A_ik^T D_ik, one
    batched matmul of channel-major patches (no transpose of the patches). xr [m K, *spatial, C]
    (float32, or bfloat16 if ``native``), d [m, K, *out spatial, out] -> float32 [m, groups,
    prod(kernel_size) * C/groups, out/groups] (features in the kernel's order)."""
    a = _patch_columns(xr, d.shape[0], cfg)
    return dot("mkgnr,mkrgo->mgno", a, _output_rows(d.astype(a.dtype), a), native)


def patches_weighted_sum(xr: jax.Array, d: jax.Array, weights: jax.Array, cfg: nnx_layers.Conv,
                         native: bool = False) -> jax.Array:
    """sum_i weights_i A_i^T D_i of a conv from its input and output gradient alone: xr [m K, *spatial, C]
    (float32, or bfloat16 if ``native``), d [m, K, *out spatial, out] -> float32 [groups,
    prod(kernel_size) * C/groups, out/groups] (features in the kernel's order). Rows of weight 0
    contribute exactly 0 (even NaN)."""
    m = weights.shape[0]
    xw = _keep(weights, xr.reshape((m, -1) + xr.shape[1:]), False).reshape(xr.shape)
    a = _patch_columns(xw, m, cfg)  # [m, K, g, n, R]
    dw = _output_rows(_keep(weights, d.astype(F32), True), a)  # [m, K, R, g, o]
    return split_dot("mkgnr,mkrgo->gno", a, dw, native)


def conv_norms(params: Mapping[str, jax.Array], x: jax.Array, d: jax.Array, cfg: nnx_layers.Conv,
               ghost: str = "auto", matmul: str = "auto") -> tuple[jax.Array, Summer]:
    """nnx.Conv: kernel [*k, in/groups, out], bias [out] (optional); x [m, ..., *spatial, in].
    Ghost route: norms from row-major patches (`patch_rows`) and Gram matrices, the weighted
    sum from (x, d) alone (`patches_weighted_sum`; the norm's patches are not kept for it).
    Materialised route: channel-major patches, one batched matmul per example (`conv_grads`),
    and the weighted sum of those per-example gradients where they are no larger than
    (x, d) per example (`keep_per_example_grads`), else from (x, d) as on the ghost route."""
    nd, g, m = len(cfg.kernel_size), cfg.groups, x.shape[0]
    native = native_operands(matmul, x, d)
    cdt = x.dtype if native else F32
    xr = x.reshape((-1,) + x.shape[x.ndim - nd - 1:]).astype(cdt)
    c, cout, kt = xr.shape[-1], params["kernel"].shape[-1], math.prod(cfg.kernel_size)
    out_sp = d.shape[d.ndim - nd - 1:-1]
    rows = (xr.shape[0] // m) * math.prod(out_sp)  # K views x output positions per example
    d_rows = d.astype(F32).reshape(m, rows, cout)

    def xd_kernel_sum(weights: jax.Array) -> jax.Array:  # -> [g, kt * cin_g, o]
        # From x and weights * d alone: channel-major patches rebuilt here (of the masked x, so
        # never the norm's patches kept alive) and one matmul; no XLA convolution, which is slow
        # inside the microbatch scan on CPU (jax-ml/jax#12868).
        return patches_weighted_sum(xr, d, weights, cfg, native)

    def to_kernel(gk: jax.Array) -> jax.Array:  # [g, kt * cin_g, o] -> [*k, cin_g, g * o]
        gk = gk.reshape((g,) + tuple(cfg.kernel_size) + (c // g, cout // g))
        return jnp.moveaxis(gk, 0, -2)

    if use_ghost(ghost, matmul_cost(rows, kt * (c // g), cout // g)):
        sq = ghost_sq_norms(patch_rows(xr, m, cfg), d.astype(cdt).reshape(m, rows, g, cout // g), native)
        kernel_sum = xd_kernel_sum
    else:
        gi = conv_grads(xr, d, cfg, native)  # [m, g, n, o]
        sq = jnp.sum(jnp.square(gi), axis=(1, 2, 3))

        def kept_sum(weights: jax.Array) -> jax.Array:
            return weighted_rows(weights, gi)

        kernel_sum = kept_sum if keep_per_example_grads(params["kernel"].size, x.size // m, d.size // m) \
            else xd_kernel_sum

    return _with_bias(params, sq, kernel_sum, d_rows, to_kernel)


def embed_norms(params: Mapping[str, jax.Array], x: jax.Array, d: jax.Array, cfg: nnx_layers.Embed,
                ghost: str = "auto", matmul: str = "auto") -> tuple[jax.Array, Summer]:
    """nnx.Embed: embedding [V, F]; x integer indices [m, ...], d [m, ..., F]. Out-of-range
    indices (flax: filled output, no gradient) contribute nothing; negative ones wrap."""
    m, v = x.shape[0], cfg.num_embeddings
    idx = x.reshape(m, -1).astype(jnp.int32)
    idx = jnp.where(idx < 0, idx + v, idx)
    valid = (idx >= 0) & (idx < v)
    idx = jnp.where(valid, idx, v)  # one shared out-of-range slot, dropped by the scatter
    dd = jnp.where(valid[..., None], d.astype(F32).reshape(m, idx.shape[1], -1), 0.0)
    rows = idx.shape[1]
    if use_ghost(ghost, embed_cost(rows, v, dd.shape[-1])):
        same = (idx[:, :, None] == idx[:, None, :]).astype(F32)
        sq = jnp.sum(same * jnp.einsum("mrf,msf->mrs", dd, dd, precision=HI), axis=(1, 2))
    else:
        table = jnp.zeros((m, v, dd.shape[-1]), F32).at[jnp.arange(m)[:, None], idx].add(dd, mode="drop")
        sq = jnp.sum(jnp.square(table), axis=(1, 2))

    def summer(weights: jax.Array) -> dict[str, jax.Array]:
        rows_w = _keep(weights, dd, True).reshape(-1, dd.shape[-1])
        table = jnp.zeros((v, dd.shape[-1]), F32).at[idx.reshape(-1)].add(rows_w, mode="drop")
        return {"embedding": table.reshape(params["embedding"].shape)}

    return sq, summer


def norm_layer_norms(params: Mapping[str, jax.Array], x: jax.Array, d: jax.Array, cfg: nnx_layers.Norm,
                     ghost: str = "auto", matmul: str = "auto") -> tuple[jax.Array, Summer]:
    """nnx.LayerNorm / RMSNorm: output xhat * scale + bias per feature, so with
    xhat_i and d_i as rows [R, F] (F = cfg.features) the per-example gradients are
    g_scale,i = sum_r d_ir * xhat_ir and g_bias,i = sum_r d_ir (float32). xhat comes from the
    layer's own code (``cfg.normalized``) on the recorded x with m merged into each call's axis 0
    (3-D reductions here instead of the perturbed parameters' reductions inside the tap pass,
    which carry the size-1 augmult axis and are slow on XLA:CPU)."""
    del ghost, matmul  # no matmul: two row reductions
    m, f = x.shape[0], cfg.features
    dd = d.astype(F32).reshape(m, -1, f)
    grads = {}
    if "scale" in params:
        xhat = cfg.normalized(x.reshape((-1,) + x.shape[2:])).reshape(m, -1, f)
        grads["scale"] = jnp.sum(dd * xhat, axis=1)
    if "bias" in params:
        grads["bias"] = jnp.sum(dd, axis=1)
    sq = sum(jnp.sum(jnp.square(g), axis=1) for g in grads.values())

    def summer(weights: jax.Array) -> dict[str, jax.Array]:
        return {n: weighted_rows(weights, g).reshape(params[n].shape) for n, g in grads.items()}

    return sq, summer


ROUTES = {"nnx_dense": dense_norms, "nnx_conv": conv_norms, "nnx_embed": embed_norms, "nnx_norm": norm_layer_norms}


def layer_norms(kind: str, params: Mapping[str, jax.Array], x: jax.Array, d: jax.Array, cfg: object,
                ghost: str = "auto", matmul: str = "auto") -> tuple[jax.Array, Summer]:
    """Dispatch on the kind of a standard-layer tap (``matmul``: `native_operands`; embeddings
    are scatter-adds, always float32)."""
    return ROUTES[kind](params, x, d, cfg, ghost, matmul)


__all__ = ["dense_norms", "conv_norms", "embed_norms", "norm_layer_norms", "layer_norms", "use_ghost", "matmul_flops",
           "matmul_cost", "embed_cost", "RouteCost", "GHOST_CHOICES", "embed_flops", "keep_per_example_grads",
           "matmul_norms", "ghost_sq_norms", "conv_grads", "conv_patches",
           "conv_patches_cm", "patch_rows", "patches_weighted_sum", "weighted_rows", "native_operands", "dot",
           "split_dot", "MATMUL_CHOICES"]
