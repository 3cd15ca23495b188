"""Book-keeping clipped gradient sum: per-example norms without per-example backward passes.

`bk_clipped_grad_sum` has the contract of `dpft.privacy.engine.clipped_grad_sum` (same
arguments, same (grad_sum, stats), same per-example keys, exact up to float summation order)
for losses made by `dpft.privacy.adapters.nnx_loss_fn` over any Flax NNX model: parameters used
through a tapped op (`dpft.nn.taps`: dpft's layers; `dpft.nn.nnx_layers`: standard nnx.Conv,
nnx.Linear, nnx.LinearGeneral, nnx.Embed, nnx.LayerNorm, nnx.RMSNorm, whose routes
are in `dpft.privacy.bk_layers`) get the norm routes below; every other parameter is "free": a
per-example zero perturbation is added to it, and the gradient w.r.t. that perturbation IS its
per-example gradient (exact, for GroupNorm scales, class tokens, position embeddings, unknown
layers; one [m, *param] array each).
Discovery traces one example and refuses (naming the layer) a tapped layer called twice or a
tapped parameter also used elsewhere (weight sharing), and nnx.BatchNorm. Per microbatch:

1. ONE forward and ONE backward of the batch, w.r.t. zero perturbations added to each tapped
   op's output (and to each free parameter) (the parameters are constants there, so no weight gradient is computed): it
   yields each op's input x_l and output gradient d_l per example.
2. Per-example squared norms of each op's parameter gradient from (x_l, d_l) alone:
   * "linear" and "ws_conv": g_i = A_i^T D_i (A: input rows / conv patches, D: output
     gradients) either materialised per example with one batched matmul, or as a ghost norm
     <A_i A_i^T, D_i D_i^T> (Li et al. 2022), whichever needs fewer flops per layer (Bu et
     al. 2023, mixed ghost clipping; `bk_layers.use_ghost`, the one rule of every tapped layer).
     "linear" is a dense layer of `bk_layers.dense_norms`; "ws_conv" shares its patches, Gram
     norms and materialised gradients with nnx convs (`bk_layers`). For weight-standardised
     convs the gradient reaches the raw weight through the standardisation's Jacobian
     J = gain*r*(I - e e^T - v v^T) (r = rsqrt(n var), e = 1/sqrt(n), v = (w - mean)/sqrt(n var),
     orthonormal), so ||J^T g||^2 = (gain r)^2 (||g||^2 - (e.g)^2 - (v.g)^2): exact, with the
     two dot products read off the patches too; the gain's gradient is r (w - mean).g.
     While n var <= eps (the clamp of `standardize_weight`) the v term is absent.
   * "generic" (small ops: skip gains, GroupNorm): local per-example VJP of the op alone.
   Materialised conv gradients come from channel-major patches (`bk_layers.conv_grads`:
   features in the kernel's HWI order, output positions last), so each g_i is one plain
   batched matmul with no transpose of the patches.
3. The clipped sum per op: sum_i c_i g_i of the per-example gradients where step 2
   materialised them and they are no larger than the op's (x_i, d_i)
   (`bk_layers.keep_per_example_grads`; then the standardisation's VJP once), else one
   contraction of rebuilt patches of x_l with c_i d_l,i (c_i the clip factor; materialised convs,
   and ghost-normed ones with native bf16 operands), or ONE batched float32 weight-gradient VJP of
   the op with cotangent c_i d_l,i (ghost-normed convs with float32 operands).
   What lives from step 2 to step 3 per op is thus the smaller of g_i and (x_i, d_i), never
   patches. Both are exact.

A loss over a trainable subset (`dpft.privacy.adapters.restrict_loss`, `config.train.trainable`) names
its frozen parameter paths (`loss_fn.frozen_paths`): an op that uses one is not tapped (no input kept,
no output gradient recorded, no norm), its trainable parameters (if any) are free; only the trained
tree's ops cost norms, so a frozen layer costs its forward and backward pass only.

Clipping modes whose record (`dpft.privacy.clipping`) lists the "bookkeeping" engine are
supported (flat, automatic: one factor per example); others raise; a non-private mode ("none")
delegates to the engine.
References: Bu, Mao, Xu, "Scalable and efficient training of large convolutional neural
networks with differential privacy" (NeurIPS 2022); Bu et al., "Differentially private
optimization on large model at small cost" (ICML 2023).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from jax import lax

from dpft.nn import nnx_layers, ops, taps
from dpft.privacy import bk_layers, clipping as clipping_lib, engine
from dpft.privacy.engine import ClippingConfig, PyTree

GHOST_CHOICES = bk_layers.GHOST_CHOICES
F32 = jnp.float32
#: weights [m] -> {param name: sum_i weights_i * per-example gradient_i} of one op.
Summer = Callable[[jax.Array], dict]


#: `ops.linear`'s parameter names -> those of `bk_layers.dense_norms` (nnx.Linear's).
LINEAR_PARAMS = {"w": "kernel", "b": "bias"}


def linear_norms(params: Mapping[str, jax.Array], x: jax.Array, d: jax.Array, ghost: str = "auto",
                 matmul: str = "auto") -> tuple[jax.Array, Summer]:
    """Per-example ||grad w||^2 + ||grad b||^2 of `ops.linear` ([m]) and the function weights [m]
    -> the weighted sum of the per-example gradients: a dense layer contracting the last axis,
    computed by `bk_layers.dense_norms` under dpft's parameter names (w [in, out], b [out]).
    x [m, ..., in], d [m, ..., out]."""
    sq, dense_summer = bk_layers.dense_norms({LINEAR_PARAMS[n]: v for n, v in params.items()}, x, d,
                                             nnx_layers.Dense((x.ndim - 2,)), ghost, matmul)

    def summer(weights: jax.Array) -> dict[str, jax.Array]:
        sums = dense_summer(weights)
        return {n: sums[LINEAR_PARAMS[n]] for n in params}

    return sq, summer


def linear_sq_norms(params: Mapping[str, jax.Array], x: jax.Array, d: jax.Array, ghost: str = "auto",
                    matmul: str = "auto") -> jax.Array:
    """Per-example ||grad w||^2 + ||grad b||^2 of `ops.linear`. x [m, ..., in], d [m, ..., out] -> [m]."""
    return linear_norms(params, x, d, ghost, matmul)[0]


def ws_conv_config(k: int, stride: int, groups: int, spatial: tuple[int, int]) -> nnx_layers.Conv:
    """The convolution of `ops.ws_conv` (k x k kernel, SAME padding of the [H, W] ``spatial``
    input) as the conv record the patch builders of `bk_layers` take."""
    pads = tuple(map(tuple, lax.padtype_to_pads(spatial, (k, k), (stride, stride), "SAME")))
    return nnx_layers.Conv((k, k), (stride, stride), (1, 1), pads, groups)


def ws_conv_norms(params: Mapping[str, jax.Array], x: jax.Array, d: jax.Array, *, stride: int,
                  groups: int, ghost: str = "auto", eps: float = ops.WS_EPS, matmul: str = "auto"
                  ) -> tuple[jax.Array, Summer]:
    """Per-example squared norm of the gradient w.r.t. (w, gain, bias) of `ops.ws_conv`.

    params: w [k, k, in/groups, out], gain [out]; x [m, K, H, W, in] (K rows per example),
    d [m, K, H', W', out] = dLoss_i/d(output). Returns (float32 [m], summer): summer(weights [m])
    is the weighted sum of the per-example gradients {w, gain, bias}: from the kept per-example
    gradients where they were materialised and are no larger than (x, d)
    (`bk_layers.keep_per_example_grads`), else from (x, d) alone: by rebuilt patches
    (`bk_layers.patches_weighted_sum`, then the standardisation's VJP once) on the materialised
    route and on the native ghost route, by one float32 weight-gradient VJP of the op on the
    float32 ghost route.
    ``matmul``: `bk_layers.native_operands` (bfloat16 patches and tensor-core contractions with
    float32 accumulation for bfloat16 x and d off CPU). See the module doc.
    """
    native = bk_layers.native_operands(matmul, x, d)
    w = params["w"].astype(F32)
    gain = params["gain"].astype(F32)
    k, _, cin_g, cout = w.shape
    cout_g = cout // groups
    n = k * k * cin_g
    m = x.shape[0]
    xr = x.reshape((-1,) + x.shape[-3:]).astype(x.dtype if native else F32)
    rows = (xr.shape[0] // m) * d.shape[-3] * d.shape[-2]  # K views x output positions per example

    mean = jnp.mean(w, axis=(0, 1, 2))
    var = jnp.var(w, axis=(0, 1, 2))
    r = lax.rsqrt(jnp.maximum(var * n, eps))
    scale = (gain * r).reshape(groups, cout_g)  # d w_hat / d w = scale * projection
    unclamped = (var * n > eps).reshape(groups, cout_g)
    n_var = jnp.where(unclamped, (var * n).reshape(groups, cout_g), 1.0)
    dd = d.astype(F32).reshape(m, rows, groups, cout_g)
    bias_rows = jnp.sum(dd, axis=1)  # [m, groups, o]
    centred = (w - mean).reshape(n, groups, cout_g)  # HWI order, as the patches' features

    cfg = ws_conv_config(k, stride, groups, xr.shape[1:3])

    def xd_summer(weights: jax.Array) -> dict[str, jax.Array]:
        # From (x, weights * d) alone: patches rebuilt, one contraction (bfloat16 x with the
        # float32 weighted d's bfloat16 high and low parts if native, `bk_layers.split_dot`):
        # no float32 convolution, which a GPU runs at HIGHEST precision without tensor cores.
        g_sum = bk_layers.patches_weighted_sum(xr, d, weights, cfg, native)  # [g, n, o]
        _, vjp = jax.vjp(ops.standardize_weight, w, gain)
        g_w, g_gain = vjp(jnp.moveaxis(g_sum, 0, 1).reshape(w.shape))
        return {"w": g_w, "gain": g_gain, "bias": bk_layers.weighted_rows(weights, bias_rows).reshape(cout)}

    def conv_summer(weights: jax.Array) -> dict[str, jax.Array]:
        # Not native (float32 operands): one weight-gradient VJP of the op computed in float32 at
        # (x, weights * d); on CPU one XLA convolution is cheaper than rebuilding patches for the
        # small ghost-normed layers (many slices per group and offset, inside the microbatch scan).
        keep = (weights != 0).reshape((-1,) + (1,) * (x.ndim - 1))
        x_rows = jnp.where(keep, x, 0.0).astype(F32).reshape(xr.shape)
        d_rows = jnp.where(keep, d.astype(F32) * weights.reshape((-1,) + (1,) * (d.ndim - 1)), 0.0)
        p32 = {name: v.astype(F32) for name, v in params.items()}
        _, vjp = jax.vjp(lambda p: ops.ws_conv(p, x_rows, stride=stride, groups=groups, dtype=F32), p32)
        (g,) = vjp(d_rows.reshape((-1,) + d.shape[-3:]))
        return g

    if bk_layers.use_ghost(ghost, bk_layers.matmul_cost(rows, n, cout_g)):
        a = bk_layers.patch_rows(xr, m, cfg)  # [m, R, groups, n], features (kh, kw, in/groups), as w's HWI
        # e.g and c.g from the patches; ||g||^2 (channel-weighted) as a ghost norm.
        e_dot = bk_layers.dot("mrg,mrgo->mgo", jnp.sum(a, axis=-1, dtype=F32), dd, False) / math.sqrt(n)
        c_dot = bk_layers.dot("mrgo,mrgo->mgo", bk_layers.split_dot("mrgn,ngo->mrgo", a, centred, native), dd, False)
        g_sq = bk_layers.ghost_sq_norms(a, dd * scale, native)  # float32 d * scale: a float32 Gram
        summer = xd_summer if native else conv_summer  # the norm's patches are not kept for the sum
    else:
        # Materialised g = dL_i/dw_hat [m, groups, n, o] from channel-major patches (features in
        # w's HWI order, no transpose of the patches): every term is a contraction of it.
        g = bk_layers.conv_grads(xr, d, cfg, native)  # [m, groups, n, o]
        e_dot = jnp.sum(g, axis=2) / math.sqrt(n)
        c_dot = bk_layers.dot("mgno,ngo->mgo", g, centred, False)
        g_sq = jnp.sum(jnp.square(scale) * jnp.sum(jnp.square(g), axis=2), axis=(1, 2))

        def kept_summer(weights: jax.Array) -> dict[str, jax.Array]:
            g_hat = jnp.moveaxis(bk_layers.weighted_rows(weights, g), 0, 1).reshape(w.shape)  # [n, g, o] -> HWIO
            _, vjp = jax.vjp(ops.standardize_weight, w, gain)
            g_w, g_gain = vjp(g_hat)
            return {"w": g_w, "gain": g_gain, "bias": bk_layers.weighted_rows(weights, bias_rows).reshape(cout)}

        # Keep g for the sum only where it is no larger than (x, d) per example.
        summer = kept_summer if bk_layers.keep_per_example_grads(w.size, x.size // m, d.size // m) else xd_summer

    v_sq = jnp.where(unclamped, jnp.square(c_dot) / n_var, 0.0)
    w_sq = g_sq - jnp.sum(jnp.square(scale) * (jnp.square(e_dot) + v_sq), axis=(1, 2))
    gain_sq = jnp.sum(jnp.square(r.reshape(groups, cout_g) * c_dot), axis=(1, 2))
    bias_sq = jnp.sum(jnp.square(bias_rows), axis=(1, 2))
    return jnp.maximum(w_sq, 0.0) + gain_sq + bias_sq, summer


def ws_conv_sq_norms(params: Mapping[str, jax.Array], x: jax.Array, d: jax.Array, *, stride: int,
                     groups: int, ghost: str = "auto", eps: float = ops.WS_EPS, matmul: str = "auto") -> jax.Array:
    """`ws_conv_norms` without the summer: float32 [m]."""
    return ws_conv_norms(params, x, d, stride=stride, groups=groups, ghost=ghost, eps=eps, matmul=matmul)[0]


def ws_conv_affine_norms(params: Mapping[str, jax.Array], x: jax.Array, d: jax.Array, *, stride: int, groups: int,
                         dtype: Any, trained: tuple[str, ...]) -> tuple[jax.Array, Summer]:
    """Per-example squared norm [m] of the gradient w.r.t. the `trained` ones of (gain, bias) of
    `ops.ws_conv` whose kernel w is frozen, and their summer. The op is z = gain * u + bias per output
    channel with u = ws_conv(x; w, gain=1, bias=0) (the standardisation is linear in the gain), so
    dL_i/dgain = sum over example i's rows of d * u, dL_i/dbias = sum of d: one ordinary batched conv
    with the shared kernel, no per-example weight gradient. x [m, K, H, W, in], d [m, K, H', W', out]."""
    m, out = x.shape[0], d.shape[-1]
    dd = d.astype(F32).reshape(m, -1, out)
    grads = {}
    if "gain" in trained:
        ones = {"w": params["w"], "gain": jnp.ones((out,), F32), "bias": jnp.zeros((out,), F32)}
        u = ops.ws_conv(ones, x.reshape((-1,) + x.shape[-3:]), stride=stride, groups=groups, dtype=dtype)
        grads["gain"] = jnp.sum(dd * u.astype(F32).reshape(m, -1, out), axis=1)
    if "bias" in trained:
        grads["bias"] = jnp.sum(dd, axis=1)
    sq = sum(jnp.sum(jnp.square(g), axis=1) for g in grads.values())

    def summer(weights: jax.Array) -> dict[str, jax.Array]:
        return {n: bk_layers.weighted_rows(weights, g) for n, g in grads.items()}

    return sq, summer


def generic_norms(fn: taps.OpFn, params: Mapping[str, jax.Array], x: jax.Array, d: jax.Array
                  ) -> tuple[jax.Array, Summer]:
    """Per-example squared norm [m] of the VJP of `fn(params, x_i)` at d_i, materialised (float32),
    and the summer of those per-example gradients (their weighted sum in float32)."""
    def one(xi: jax.Array, di: jax.Array) -> dict:
        _, vjp = jax.vjp(lambda p: fn(p, xi), params)
        (g,) = vjp(di)
        return {n: v.astype(F32) for n, v in g.items()}

    grads = jax.vmap(one)(x, d)
    sq = sum(jnp.sum(jnp.square(v), axis=tuple(range(1, v.ndim))) for v in grads.values())

    def summer(weights: jax.Array) -> dict[str, jax.Array]:
        return {n: bk_layers.weighted_rows(weights, v) for n, v in grads.items()}

    return sq, summer


def generic_sq_norms(fn: taps.OpFn, params: Mapping[str, jax.Array], x: jax.Array, d: jax.Array) -> jax.Array:
    """Per-example squared norm of the VJP of `fn(params, x_i)` at d_i, materialised. -> [m]."""
    return generic_norms(fn, params, x, d)[0]


def op_norms(spec: taps.OpSpec, params: Mapping[str, jax.Array], x: jax.Array, d: jax.Array,
             ghost: str, matmul: str = "auto") -> tuple[jax.Array, Summer]:
    """Dispatch on ``spec.kind``. x: [m, *op input shape], d: [m, *spec.z.shape] ->
    (squared norms [m] float32, summer: weights [m] -> the op's weighted gradient sum)."""
    if spec.kind == "ws_conv":
        kw = getattr(spec.fn, "keywords", None)
        if getattr(spec.fn, "func", None) is not ops.ws_conv or kw is None:
            raise ValueError(f"tap {spec.key}: kind 'ws_conv' needs fn = functools.partial(ops.ws_conv, ...)")
        if spec.frozen_paths:  # frozen kernel (taps.PARTIAL_ROUTES): gain and/or bias trained
            return ws_conv_affine_norms(params, x, d, stride=kw["stride"], groups=kw["groups"], dtype=kw["dtype"],
                                        trained=tuple(spec.param_paths))
        return ws_conv_norms(params, x, d, stride=kw["stride"], groups=kw["groups"], ghost=ghost, matmul=matmul)
    if spec.kind == "linear":
        if getattr(spec.fn, "func", None) is not ops.linear:
            raise ValueError(f"tap {spec.key}: kind 'linear' needs fn = functools.partial(ops.linear, ...)")
        return linear_norms(params, x, d, ghost, matmul)
    if spec.kind in bk_layers.ROUTES:
        return bk_layers.layer_norms(spec.kind, params, x, d, spec.layer, ghost, matmul)
    return generic_norms(spec.fn, params, x, d)


@dataclasses.dataclass(frozen=True)
class Discovery:
    """What one example's forward pass uses: ``specs`` {op key: OpSpec} (tapped ops, call order)
    and ``free`` {name: param path} (parameters used outside any tapped op: their per-example
    gradients come from parameter perturbations, `dpft.nn.taps`)."""

    specs: Mapping[str, taps.OpSpec]
    free: Mapping[str, tuple]
    skipped: tuple[str, ...] = ()  # ops not tapped: they use a frozen parameter (`taps.Recorder.frozen`)


def _used_inputs(closed: Any) -> list[bool]:
    """Which inputs of a closed jaxpr its outputs depend on (dead code eliminated)."""
    from jax._src.interpreters import partial_eval as pe  # no public API for dead-code elimination
    _, used = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
    return list(used)


def discover(tapped_loss: Any, params: PyTree, views: Mapping[str, jax.Array], rng: jax.Array,
             frozen: frozenset = frozenset()) -> Discovery:
    """The tapped ops and the free parameters of one example's forward pass (traced, nothing
    computed). `params` is the trainable tree; an op using a `frozen` parameter path is not tapped
    (`taps.Recorder.frozen`). The ops compute with a second copy of the parameters (`taps.Recorder.tap_params`),
    so the trace shows whether a tapped op's parameter is also used elsewhere. Raises ValueError
    naming the layer for a parameter used by two tapped ops, or by a tapped op and elsewhere."""
    view0 = jax.tree.map(lambda v: v[0], views)
    paths = [taps.param_path(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(params)]
    found: dict[str, Any] = {}

    def traced(model_params, tap_params, view, key):
        flat = {taps.param_path(kp): v for kp, v in jax.tree_util.tree_leaves_with_path(tap_params)}
        recorder = taps.Recorder("discover", tap_params=flat, frozen=frozen)
        out = tapped_loss(model_params, view, key, recorder)
        found["specs"], found["skipped"] = recorder.specs, tuple(recorder.skipped)
        return out

    closed = jax.make_jaxpr(traced)(params, params, view0, rng)
    specs = found["specs"]
    used_by_model = dict(zip(paths, _used_inputs(closed)[:len(paths)]))
    used: dict[tuple, str] = {}
    for spec in specs.values():
        for path in spec.param_paths.values():
            where = "/".join(map(str, path))
            if path in used:
                raise ValueError(f"bookkeeping: parameter {where} is used by two tapped layers ({used[path]}, "
                                 f"{spec.key}): weight sharing is not supported; use grad_method='vmap'")
            if used_by_model.get(path, False):
                raise ValueError(f"bookkeeping: parameter {where} of layer {spec.key.rsplit(':', 1)[0]} is used by "
                                 "that layer's call and elsewhere too (e.g. tied weights such as nnx.Embed.attend): "
                                 "weight sharing is not supported; use grad_method='vmap'")
            used[path] = spec.key
    free = {"/".join(map(str, p)): p for p in paths if p not in used}
    return Discovery(specs, free, found["skipped"])


def discover_ops(tapped_loss: Any, params: PyTree, views: Mapping[str, jax.Array], rng: jax.Array
                 ) -> dict[str, taps.OpSpec]:
    """The tapped ops of one example's forward pass (`discover`, without the free parameters)."""
    return dict(discover(tapped_loss, params, views, rng).specs)


def tap_pass(tapped_loss: Any, params: PyTree, specs: Mapping[str, taps.OpSpec],
             views: Mapping[str, jax.Array], keys: jax.Array, free: Mapping[str, tuple] | None = None,
             frozen: frozenset = frozenset()):
    """Step 1: one batched forward + backward w.r.t. zero perturbations of every op's output and
    of every free parameter (``free`` {name: param path}).

    views leaves [m, K, ...], keys [m]. Returns (losses [m], aux {name: [m]},
    inputs {op key: x [m, *op x shape]}, out_grads {op key: dLoss_i/dz [m, *op z shape],
    free name: dLoss_i/dparam [m, *param shape]}).
    No weight gradient is computed for tapped ops; a free parameter's per-example gradient is
    exactly the gradient w.r.t. its perturbation.
    """
    free = dict(free or {})
    flat = {taps.param_path(kp): leaf for kp, leaf in jax.tree_util.tree_leaves_with_path(params)}

    def per_example(perturbations, view, key):
        op_p = {k: perturbations[k] for k in specs}
        recorder = taps.Recorder("record", op_p, param_perturbations={free[n]: perturbations[n] for n in free},
                                 frozen=frozen)
        loss, aux = tapped_loss(params, view, key, recorder)
        return loss, (aux, recorder.inputs)

    m = keys.shape[0]
    zeros = {key: jnp.zeros((m,) + s.z.shape, s.z.dtype) for key, s in specs.items()}
    zeros.update({n: jnp.zeros((m,) + flat[p].shape, flat[p].dtype) for n, p in free.items()})
    # Device-varying zeros under shard_map: gradients w.r.t. replicated inputs would be psummed
    # over devices, mixing examples of different devices (see engine.device_local_params).
    zeros = engine.device_local_params(zeros, jax.tree.leaves(views))
    (losses, (aux, inputs)), out_grads = jax.vmap(jax.value_and_grad(per_example, has_aux=True))(zeros, views, keys)
    return losses, aux, inputs, out_grads


def per_example_norms(specs: Mapping[str, taps.OpSpec], op_params: Mapping[str, Mapping[str, jax.Array]],
                      inputs: Mapping[str, jax.Array], out_grads: Mapping[str, jax.Array],
                      ghost: str = "auto", matmul: str = "auto") -> tuple[jax.Array, dict[str, Summer]]:
    """Step 2: squared L2 norm of each example's whole parameter gradient (float32 [m]) and each
    op's summer {op key: weights [m] -> its weighted gradient sum} (see `ws_conv_norms`)."""
    total, summers = 0.0, {}
    # Full float32 for every float32 dot a route does not pin itself (a GPU would take TF32).
    with jax.default_matmul_precision("highest"):
        for key, s in specs.items():
            sq, summer = op_norms(s, op_params[key], inputs[key], out_grads[key], ghost, matmul)
            total = total + sq
            summers[key] = summer
    return total, summers


def weighted_param_grads(summers: Mapping[str, Summer], weights: jax.Array) -> dict[str, dict[str, jax.Array]]:
    """Step 3: sum_i weights_i * (gradient of example i) per op, by each op's summer from step 2
    (from its kept per-example gradients, or one contraction of (x, weights * d)). Every weighted
    contribution is formed and summed in float32 whatever the compute dtype, so the sensitivity
    is C (tested). weights float32 [m]; a row with weight 0 contributes exactly 0 even if its
    activations or gradients are NaN. Returns {op key: {param name: float32 array}}."""
    with jax.default_matmul_precision("highest"):  # no TF32 for float32 dots on a GPU
        return {key: {n: v.astype(F32) for n, v in summer(weights).items()} for key, summer in summers.items()}


def bk_clipped_grad_sum(loss_fn: Any, params: PyTree, batch: Mapping[str, jax.Array], rng: jax.Array, *,
                        clipping: ClippingConfig, microbatch_size: int, position_offset: int | jax.Array = 0,
                        ghost: str = "auto", matmul: str = "auto") -> tuple[PyTree, dict[str, jax.Array]]:
    """`engine.clipped_grad_sum`, computed by book-keeping (module doc).

    Args: as `engine.clipped_grad_sum`; `loss_fn` must carry `loss_fn.tapped` (made by
    `adapters.nnx_loss_fn`). ghost: "auto" (per layer, fewer flops), "bytes" (fewer bytes), "always" or "never".
    matmul: "auto" (bfloat16 operands with float32 accumulation for layers computing in bfloat16,
    off CPU), "native" (the same on any backend) or "float32" (`bk_layers.native_operands`).
    Returns (grad_sum pytree like params float32, stats {"norms","loss","mask",<aux>}: [B]).
    Raises ValueError for a clipping mode whose record does not list "bookkeeping" (per_layer),
    a loss without taps, or a model with parameters outside tapped ops.
    """
    if not clipping.record.private:
        return engine.clipped_grad_sum(loss_fn, params, batch, rng, clipping=clipping,
                                       microbatch_size=microbatch_size, position_offset=position_offset)
    if not clipping.record.supports("bookkeeping"):
        raise ValueError(f"bk_clipped_grad_sum: ClippingConfig.mode={clipping.mode!r} is not supported; "
                         f"use one of {clipping_lib.names(private=True, engine='bookkeeping')} or grad_method='vmap'")
    if ghost not in GHOST_CHOICES:
        raise ValueError(f"bk_clipped_grad_sum: ghost={ghost!r}; use one of {GHOST_CHOICES}")
    if matmul not in bk_layers.MATMUL_CHOICES:
        raise ValueError(f"bk_clipped_grad_sum: matmul={matmul!r}; use one of {bk_layers.MATMUL_CHOICES}")
    tapped = getattr(loss_fn, "tapped", None)
    if tapped is None:
        raise ValueError("bk_clipped_grad_sum: loss_fn has no `tapped` variant; make it with "
                         "dpft.privacy.adapters.nnx_loss_fn (Haiku models: use grad_method='vmap')")
    views, mask = engine.checked_views(batch, microbatch_size, "bk_clipped_grad_sum")
    batch_size = mask.shape[0]
    num_micro = batch_size // microbatch_size
    positions = engine.example_key_ids(batch, position_offset)
    params = engine.device_local_params(params, [mask, positions, engine.raw_key(rng), *jax.tree.leaves(views)])
    # A loss over a trainable subset (`dpft.privacy.adapters.restrict_loss`) names its frozen paths:
    # their ops are neither tapped nor normed (cheaper), their trainable parameters are free.
    frozen = frozenset(getattr(loss_fn, "frozen_paths", frozenset()))
    found = discover(tapped, params, views, rng, frozen)
    specs, free = found.specs, found.free
    flat_params = {taps.param_path(kp): leaf for kp, leaf in jax.tree_util.tree_leaves_with_path(params)}
    name = {path: "/".join(map(str, path)) for path in flat_params}  # sortable keys for the scan carry
    # A partly frozen op's frozen parameters (`taps.PARTIAL_ROUTES`) come from the restricted loss's
    # frozen part (`adapters.restrict_loss`); the norm routes read them, nothing is summed into them.
    frozen_flat = {taps.param_path(kp): leaf for kp, leaf in
                   jax.tree_util.tree_leaves_with_path(getattr(loss_fn, "frozen_values", {}))}
    op_params = {key: {**{pname: flat_params[path] for pname, path in spec.param_paths.items()},
                       **{pname: frozen_flat[path] for pname, path in spec.frozen_paths.items()}}
                 for key, spec in specs.items()}

    def chunk(x: jax.Array) -> jax.Array:
        return x.reshape((num_micro, microbatch_size) + x.shape[1:])

    xs = (jax.tree.map(chunk, views), chunk(mask), chunk(positions))

    def body(acc: dict[str, jax.Array], x):
        views_mb, mask_mb, pos_mb = x
        keys = jax.vmap(lambda p: jax.random.fold_in(rng, p))(pos_mb)
        real = mask_mb > 0
        losses, aux, inputs, out_grads = tap_pass(tapped, params, specs, views_mb, keys, free, frozen)
        sq, summers = per_example_norms(specs, op_params, inputs, out_grads, ghost, matmul)
        free_grads = {n: out_grads[n].astype(F32) for n in free}
        for g in free_grads.values():
            sq = sq + jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim)))
        norms = jnp.sqrt(sq)
        factors = jnp.where(real, engine.clip_factors(norms, clipping), 0.0)
        grads = weighted_param_grads(summers, factors)
        acc = dict(acc)
        for key, s in specs.items():
            for pname, path in s.param_paths.items():
                acc[name[path]] = acc[name[path]] + grads[key][pname]
        for n, g in free_grads.items():
            acc[name[free[n]]] = acc[name[free[n]]] + bk_layers.weighted_rows(factors, g)
        stats = {"norms": norms, "loss": losses, **engine.aux_to_stats(aux)}
        stats = {k: jnp.where(real, v.astype(F32), 0.0) for k, v in stats.items()}
        return acc, stats

    init = {name[path]: jnp.zeros_like(leaf, F32) for path, leaf in flat_params.items()}  # device-varying
    if num_micro == 1:  # no loop for one microbatch, as the engine
        sums, stats = body(init, jax.tree.map(lambda v: v[0], xs))
    else:
        sums, stats = jax.lax.scan(body, init, xs)
    grad_sum = jax.tree_util.tree_map_with_path(lambda kp, _: sums[name[taps.param_path(kp)]], params)
    stats = {k: v.reshape((batch_size,)) for k, v in stats.items()}
    stats["mask"] = mask
    return grad_sum, stats

