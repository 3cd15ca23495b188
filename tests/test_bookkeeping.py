"""Book-keeping clipped sums (dpft.privacy.bookkeeping) == brute-force per-example gradients.

Each per-kind norm is checked against jax.grad of one example at a time (an independent
computation: no patches, no Jacobian formula), on both the materialised and the ghost route;
the whole clipped sum against `engine.clipped_grad_sum` (vmap of per-example grads) on
NFNets (grouped WS convs, squeeze-excite, skip gains, stochastic depth, dropout) and a WRN
(GroupNorm), with augmult K=2 and padding rows.
"""
from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpft.models
from dpft.nn import nnx_layers, ops, taps
from dpft.privacy import adapters, bk_layers, bookkeeping, engine, keys
from dpft.privacy import plan as plan_lib
from dpft.privacy.engine import ClippingConfig
from dpft.testing.jaxprs import float32_contractions, float32_convolutions, low_precision_dots
from dpft.testing.models import SmallConvNet


def brute_sq_norms(fn, params, x, d):
    """sum of squares of grad_p <fn(p, x_i), d_i>, one example at a time, float64 sums."""
    out = []
    for i in range(x.shape[0]):
        g = jax.grad(lambda p: jnp.sum(fn(p, x[i]) * d[i]))(params)
        out.append(sum(float(np.sum(np.asarray(v, np.float64) ** 2)) for v in jax.tree.leaves(g)))
    return np.array(out)


def conv_case(seed, k, stride, groups, cin=4, cout=6, clamp_channel=False, zero_gain=False, h=7):
    rs = np.random.RandomState(seed)
    w = rs.randn(k, k, cin // groups, cout).astype(np.float32)
    if clamp_channel:  # a constant output channel: var = 0, the clamped branch of standardize_weight
        w[..., 0] = 0.3
    gain = (1.0 + 0.5 * rs.randn(cout)).astype(np.float32)
    if zero_gain:
        gain[1] = 0.0
    params = {"w": jnp.asarray(w), "gain": jnp.asarray(gain), "bias": jnp.asarray(rs.randn(cout), jnp.float32)}
    m, kv = 3, 2
    x = jnp.asarray(rs.randn(m, kv, h, h, cin), jnp.float32)
    fn = functools.partial(ops.ws_conv, stride=stride, groups=groups, dtype=jnp.float32)
    z = jax.eval_shape(lambda: fn(params, x[0]))
    d = jnp.asarray(rs.randn(m, *z.shape), jnp.float32)
    return fn, params, x, d


@pytest.mark.parametrize("ghost", ["never", "always"])
@pytest.mark.parametrize("k,stride,groups", [(3, 1, 1), (3, 2, 2), (1, 1, 1), (1, 2, 2), (3, 2, 1)])
def test_ws_conv_norms_match_brute_force(ghost, k, stride, groups):
    fn, params, x, d = conv_case(k * 10 + stride + groups, k, stride, groups)
    got = bookkeeping.ws_conv_sq_norms(params, x, d, stride=stride, groups=groups, ghost=ghost)
    np.testing.assert_allclose(np.asarray(got), brute_sq_norms(fn, params, x, d), rtol=2e-5)


@pytest.mark.parametrize("ghost", ["never", "always"])
def test_ws_conv_norms_clamped_channel_and_zero_gain(ghost):
    fn, params, x, d = conv_case(5, 3, 1, 2, clamp_channel=True, zero_gain=True)
    got = bookkeeping.ws_conv_sq_norms(params, x, d, stride=1, groups=2, ghost=ghost)
    np.testing.assert_allclose(np.asarray(got), brute_sq_norms(fn, params, x, d), rtol=2e-5)


@pytest.mark.parametrize("ghost", ["never", "always"])
@pytest.mark.parametrize("h,cin,cout,kept", [(7, 4, 6, True), (2, 8, 16, False)])
def test_ws_conv_weighted_sum_matches_brute_force(ghost, h, cin, cout, kept):
    """sum_i w_i g_i of ws_conv from the kept per-example gradients (materialised route, g no
    larger than (x, d)), from (x, d) alone (g larger) or by the op's float32 weight-gradient VJP
    (ghost route, float32 operands) == brute force; a row of weight 0 contributes exactly 0 even
    with NaN inputs."""
    fn, params, x, d = conv_case(11, 3, 1, 1, cin=cin, cout=cout, h=h)
    x = x.at[1].set(jnp.nan)
    weights = jnp.asarray([0.5, 0.0, 2.0], jnp.float32)
    _, summer = bookkeeping.ws_conv_norms(params, x, d, stride=1, groups=1, ghost=ghost)
    # which sum route was taken
    route = "conv_summer" if ghost == "always" else "kept_summer" if kept else "xd_summer"
    assert summer.__qualname__.split(".")[-1] == route
    got = bookkeeping.weighted_param_grads({"c:conv": summer}, weights)["c:conv"]
    for name in params:
        want = sum(float(weights[i]) * np.asarray(jax.grad(lambda p: jnp.sum(fn(p, x[i]) * d[i]))(params)[name],
                                                    np.float64) for i in (0, 2))
        np.testing.assert_allclose(np.asarray(got[name]), want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


@pytest.mark.parametrize("ghost", ["never", "always"])
@pytest.mark.parametrize("k,stride,groups,h,cin,cout", [(3, 1, 1, 7, 4, 6), (3, 2, 2, 7, 4, 6), (3, 1, 1, 2, 8, 16),
                                                        (1, 1, 1, 5, 4, 6)])
def test_ws_conv_native_bfloat16_operands_equal_the_float32_route(ghost, k, stride, groups, h, cin, cout):
    """bf16 x and d: matmul="native" (bf16 patches, tensor-core contractions with float32
    accumulation, the weighted sum and the centred-weight dot split into bf16 high + low parts)
    gives the float32 route's norms and weighted sums (kept, from (x, d), and the ghost route's
    float32 VJP) on the same inputs, with no float32 convolution (a GPU runs one without tensor
    cores)."""
    _, params, x, d = conv_case(3, k, stride, groups, cin=cin, cout=cout, h=h)
    x, d = x.astype(jnp.bfloat16), d.astype(jnp.bfloat16)
    weights = jnp.asarray([0.5, 0.0, 2.0], jnp.float32)
    out = {}
    for mm in ("float32", "native"):
        def run(xx, dd, mm=mm):
            sq, summer = bookkeeping.ws_conv_norms(params, xx, dd, stride=stride, groups=groups, ghost=ghost, matmul=mm)
            return sq, bookkeeping.weighted_param_grads({"c:conv": summer}, weights)["c:conv"]
        out[mm] = jax.jit(run)(x, d)
        out[mm + "_bf16_dots"] = low_precision_dots(run, x, d)
        out[mm + "_f32_convs"] = float32_convolutions(run, x, d)
    assert out["native_bf16_dots"] > 0 and out["float32_bf16_dots"] == 0, out
    assert out["native_f32_convs"] == 0, out
    (sq32, g32), (sqn, gn) = out["float32"], out["native"]
    np.testing.assert_allclose(np.asarray(sqn), np.asarray(sq32), rtol=1e-5)
    for name in g32:
        scale = float(jnp.max(jnp.abs(g32[name])))
        np.testing.assert_allclose(np.asarray(gn[name]), np.asarray(g32[name]), rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("ghost", ["never", "always"])
@pytest.mark.parametrize("h,cin,cout", [(7, 4, 6), (2, 8, 16)])
def test_float32_contractions_of_norms_and_sums_run_at_highest_precision(ghost, h, cin, cout):
    """Steps 2 and 3 (per_example_norms, weighted_param_grads) of ws_conv and linear ops: every
    float32 dot/conv is at HIGHEST precision (a GPU would run the others as TF32, and a norm
    ~1e-3 low lets a contribution exceed C; CPU results cannot show it, the jaxpr does)."""
    fn, params, x, d = conv_case(11, 3, 1, 1, cin=cin, cout=cout, h=h)
    lin = functools.partial(ops.linear, dtype=jnp.float32)
    lp = {"w": jnp.ones((cin, 5), jnp.float32), "b": jnp.zeros((5,), jnp.float32)}
    specs = {"c:conv": taps.OpSpec("c:conv", "ws_conv", fn, {n: ("c", n) for n in params},
                                   jax.eval_shape(lambda: fn(params, x[0]))),
             "l:lin": taps.OpSpec("l:lin", "linear", lin, {n: ("l", n) for n in lp},
                                  jax.eval_shape(lambda: lin(lp, x[0])))}
    op_params = {"c:conv": params, "l:lin": lp}
    dl = jnp.ones((x.shape[0],) + specs["l:lin"].z.shape, jnp.float32)
    weights = jnp.asarray([0.5, 0.0, 2.0], jnp.float32)

    def run(xx, dd, dl):
        inputs, grads = {"c:conv": xx, "l:lin": xx}, {"c:conv": dd, "l:lin": dl}
        sq, summers = bookkeeping.per_example_norms(specs, op_params, inputs, grads, ghost, "float32")
        return sq, bookkeeping.weighted_param_grads(summers, weights)
    total, not_highest = float32_contractions(run, x, d, dl)
    assert total > 0 and not_highest == 0, (total, not_highest)


def test_conv_patches_reproduce_the_convolution():
    """`bk_layers.conv_patches` of ws_conv's SAME convolution (`bookkeeping.ws_conv_config`: the one
    patch builder of both route families) contracted with the kernel == the convolution."""
    rs = np.random.RandomState(0)
    for h, k, s in [(7, 3, 1), (7, 3, 2), (8, 3, 2), (6, 1, 2), (5, 5, 1)]:
        x = jnp.asarray(rs.randn(2, h, h, 3), jnp.float32)
        w = jnp.asarray(rs.randn(k, k, 3, 4), jnp.float32)
        want = jax.lax.conv_general_dilated(x, w, (s, s), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        p = bk_layers.conv_patches(x, bookkeeping.ws_conv_config(k, s, 1, (h, h)))  # [b, h', w', k k, c]
        got = jnp.einsum("bhwpc,pco->bhwo", p, w.reshape(k * k, 3, 4))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ghost", ["never", "always"])
@pytest.mark.parametrize("x_shape", [(3, 2, 5), (3, 2, 4, 5)])
def test_linear_norms_match_brute_force(ghost, x_shape):
    """`ops.linear` through `bk_layers.dense_norms` (its parameters renamed): per-example norms and
    the weighted sum == brute force; a row of weight 0 contributes exactly 0 even with NaN inputs."""
    rs = np.random.RandomState(1)
    params = {"w": jnp.asarray(rs.randn(5, 7), jnp.float32), "b": jnp.asarray(rs.randn(7), jnp.float32)}
    fn = functools.partial(ops.linear, dtype=jnp.float32)
    x = jnp.asarray(rs.randn(*x_shape), jnp.float32)
    d = jnp.asarray(rs.randn(*x_shape[:-1], 7), jnp.float32)
    got = bookkeeping.linear_sq_norms(params, x, d, ghost)
    np.testing.assert_allclose(np.asarray(got), brute_sq_norms(fn, params, x, d), rtol=2e-5)
    weights = jnp.asarray([0.5, 0.0, 2.0], jnp.float32)
    _, summer = bookkeeping.linear_norms(params, x.at[1].set(jnp.nan), d, ghost)
    sums = bookkeeping.weighted_param_grads({"l:linear": summer}, weights)["l:linear"]
    assert set(sums) == set(params)
    for name in params:
        want = sum(float(weights[i]) * np.asarray(jax.grad(lambda p: jnp.sum(fn(p, x[i]) * d[i]))(params)[name],
                                                    np.float64) for i in (0, 2))
        np.testing.assert_allclose(np.asarray(sums[name]), want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


def test_the_route_rules_count_flops_or_bytes_per_example():
    """`bk_layers.use_ghost`: under "auto" matmul layers go ghost iff R (n + o) < n o, embeddings iff
    R^2 < V (the decisions of the two former rules); under "bytes" iff the two R x R Gram matrices are
    smaller than the per-example gradient, 2 R^2 < n o (embeddings: 2 R^2 < V F), on a tie by flops;
    "always"/"never" force the route; an unknown rule is an error."""
    for r, n, o in itertools.product((1, 2, 7, 10, 64, 197), (1, 3, 16, 48, 768), (1, 5, 16, 96, 3072)):
        cost = bk_layers.matmul_cost(r, n, o)
        assert bk_layers.use_ghost("auto", cost) == (r * (n + o) < n * o)
        assert bk_layers.use_ghost("bytes", cost) == (2 * r * r < n * o or (2 * r * r == n * o and r * (n + o) < n * o))
    for r, v, f in itertools.product((1, 3, 10, 32), (2, 9, 100, 1024), (1, 8)):
        cost = bk_layers.embed_cost(r, v, f)
        assert bk_layers.use_ghost("auto", cost) == (r * r < v)
        assert bk_layers.use_ghost("bytes", cost) == (2 * r * r < v * f or (2 * r * r == v * f and r * r < v))
    # the rules differ: 10 rows of 16 -> 16 features need fewer flops materialised, fewer bytes as ghost norms
    cost = bk_layers.matmul_cost(10, 16, 16)
    assert not bk_layers.use_ghost("auto", cost) and bk_layers.use_ghost("bytes", cost)
    for cost in (bk_layers.RouteCost(1, 2, 2, 1), bk_layers.RouteCost(2, 1, 1, 2)):
        assert bk_layers.use_ghost("always", cost) and not bk_layers.use_ghost("never", cost)
    with pytest.raises(ValueError, match="ghost='fewest'"):
        bk_layers.use_ghost("fewest", cost)


def test_every_route_asks_the_one_rule(monkeypatch):
    """ws_conv and linear (dpft's ops) and nnx conv, dense and embedding layers each decide their
    route by one call of `bk_layers.use_ghost`, with their own (ghost, materialised) flops and bytes."""
    calls = []
    real = bk_layers.use_ghost
    monkeypatch.setattr(bk_layers, "use_ghost", lambda ghost, cost: calls.append(cost) or real(ghost, cost))
    _, params, x, d = conv_case(1, 3, 2, 2)  # x [3, 2, 7, 7, 4], d [3, 2, 4, 4, 6], groups 2
    bookkeeping.ws_conv_norms(params, x, d, stride=2, groups=2)
    conv = nnx_layers.Conv((3, 3), (2, 2), (1, 1), ((1, 1), (1, 1)), 2)
    bk_layers.conv_norms({"kernel": params["w"], "bias": params["bias"]}, x, d, conv)
    lp = {"w": jnp.ones((4, 5), jnp.float32), "b": jnp.zeros((5,), jnp.float32)}
    bookkeeping.linear_norms(lp, x, jnp.ones(x.shape[:-1] + (5,), jnp.float32))
    bk_layers.dense_norms({"kernel": lp["w"]}, x, jnp.ones(x.shape[:-1] + (5,)), nnx_layers.Dense((3,)))
    tokens = jnp.zeros((3, 2, 6), jnp.int32)
    bk_layers.embed_norms({"embedding": jnp.ones((9, 4))}, tokens, jnp.ones((3, 2, 6, 4)), nnx_layers.Embed(9))
    conv_cost = bk_layers.matmul_cost(2 * 4 * 4, 3 * 3 * 2, 3)  # K * out positions, k k in/groups, out/groups
    dense_cost = bk_layers.matmul_cost(2 * 7 * 7, 4, 5)
    assert calls == [conv_cost, conv_cost, dense_cost, dense_cost, bk_layers.embed_cost(12, 9, 4)]
    assert conv_cost == (32 * 32 * 21, 32 * 18 * 3, 2 * 32 * 32 * 4, 18 * 3 * 4)  # flops and float32 bytes by hand


def test_generic_norms_match_brute_force():
    rs = np.random.RandomState(2)
    params = {"scale": jnp.asarray(rs.randn(8), jnp.float32), "offset": jnp.asarray(rs.randn(8), jnp.float32)}
    fn = functools.partial(ops.group_norm, groups=4, eps=1e-5, dtype=jnp.float32)
    x = jnp.asarray(rs.randn(3, 2, 4, 4, 8), jnp.float32)
    d = jnp.asarray(rs.randn(3, 2, 4, 4, 8), jnp.float32)
    got = bookkeeping.generic_sq_norms(fn, params, x, d)
    np.testing.assert_allclose(np.asarray(got), brute_sq_norms(fn, params, x, d), rtol=2e-5)


B, NUM_CLASSES = 8, 3
MASK = np.array([1, 1, 0, 1, 1, 1, 0, 1], np.float32)


def make_batch(k, h, seed=0, nan_padding=False):
    rs = np.random.RandomState(seed)
    image = rs.randn(B, k, h, h, 3).astype(np.float32)
    if nan_padding:
        image[MASK == 0] = np.nan
    return {"image": jnp.asarray(image),
            "label": jnp.asarray(np.repeat(rs.randint(0, NUM_CLASSES, (B, 1)), k, axis=1), jnp.int32),
            "mask": jnp.asarray(MASK)}


@functools.lru_cache(maxsize=None)
def model_setup(name):
    model = dpft.models.create(name, NUM_CLASSES, head_init="normal")
    loss_fn, params, _ = adapters.nnx_loss_fn(model, adapters.softmax_cross_entropy_loss)
    return loss_fn, params


def run_both(name, h, clipping, microbatch, ghost="auto", nan_padding=False, k=2):
    loss_fn, params = model_setup(name)
    batch = make_batch(k, h, nan_padding=nan_padding)
    rng = jax.random.key(7)
    ref = jax.jit(lambda p, b: engine.clipped_grad_sum(
        loss_fn, p, b, rng, clipping=clipping, microbatch_size=microbatch, position_offset=3))(params, batch)
    got = jax.jit(lambda p, b: bookkeeping.bk_clipped_grad_sum(
        loss_fn, p, b, rng, clipping=clipping, microbatch_size=microbatch, position_offset=3, ghost=ghost))(
        params, batch)
    return ref, got


def assert_same(ref, got, rtol=2e-5):
    (ref_sum, ref_stats), (got_sum, got_stats) = ref, got
    assert jax.tree.structure(ref_sum) == jax.tree.structure(got_sum)
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(ref_sum))
    for a, b in zip(jax.tree.leaves(got_sum), jax.tree.leaves(ref_sum)):
        assert a.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(a)))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=rtol * scale)
    assert set(got_stats) == set(ref_stats)
    for key in ref_stats:
        np.testing.assert_allclose(np.asarray(got_stats[key]), np.asarray(ref_stats[key]), rtol=rtol, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("ghost", ["never", "always"])  # "auto" picks one of the two per layer
def test_nfnet_flat_clipping_equals_vmap_engine(ghost):
    # nfnet_nano: grouped WS convs, SE, skip gains, stochastic depth and dropout (train=True).
    ref, got = run_both("nfnet_nano", 16, ClippingConfig(mode="flat", clip_norm=0.1), 4, ghost=ghost)
    assert np.all(np.asarray(ref[1]["norms"])[MASK > 0] > 0.1)  # clipping is active
    assert_same(ref, got)


@pytest.mark.slow  # > 30 s on 2 loaded cores (two compiles of a whole model)
def test_nfnet_automatic_clipping_single_microbatch_equals_vmap_engine():
    ref, got = run_both("nfnet_nano", 16, ClippingConfig(mode="automatic", clip_norm=1.0, gamma=0.01), B)
    assert_same(ref, got)


@pytest.mark.slow  # > 30 s on 2 loaded cores (two compiles of a whole model)
def test_wrn_groupnorm_equals_vmap_engine():
    ref, got = run_both("wrn_16_4", 8, ClippingConfig(mode="flat", clip_norm=1.0), 4, k=1)
    assert_same(ref, got)


@pytest.mark.slow  # > 30 s on 2 loaded cores (two compiles of a whole model)
def test_nan_padding_rows_give_exactly_zero():
    ref, got = run_both("nfnet_nano", 16, ClippingConfig(mode="flat", clip_norm=0.1), 4, nan_padding=True)
    assert_same(ref, got)
    assert np.all(np.asarray(got[1]["norms"])[MASK == 0] == 0)


@pytest.mark.slow  # quick tier: see docs/running.md
def test_nonprivate_mode_delegates_to_engine():
    ref, got = run_both("nfnet_nano", 16, ClippingConfig(mode="none", clip_norm=1.0), 4)
    assert_same(ref, got, rtol=1e-6)


def test_every_nfnet_parameter_is_tapped_once():
    loss_fn, params = model_setup("nfnet_nano")
    batch = make_batch(1, 16)
    specs = bookkeeping.discover_ops(loss_fn.tapped, params, {k: v for k, v in batch.items() if k != "mask"},
                                     jax.random.key(0))
    used = sorted(p for s in specs.values() for p in s.param_paths.values())
    leaves = sorted(taps.param_path(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(params))
    assert used == leaves
    assert {s.kind for s in specs.values()} == {"ws_conv", "linear", "generic"}


def test_errors_name_the_problem():
    loss_fn, params = model_setup("nfnet_nano")
    batch = make_batch(1, 16)
    with pytest.raises(ValueError, match="per_layer"):
        bookkeeping.bk_clipped_grad_sum(loss_fn, params, batch, jax.random.key(0),
                                        clipping=ClippingConfig(mode="per_layer", clip_norm=1.0), microbatch_size=4)
    with pytest.raises(ValueError, match="tapped"):
        bookkeeping.bk_clipped_grad_sum(lambda p, v, r: loss_fn(p, v, r), params, batch, jax.random.key(0),
                                        clipping=ClippingConfig(mode="flat", clip_norm=1.0), microbatch_size=4)
    # SmallConvNet uses flax's own nnx.Conv / nnx.Linear: tapped too now (tests/test_bookkeeping_nnx.py).
    small = SmallConvNet(3, NUM_CLASSES, channels=(3, 4), seed=1)
    small_loss, small_params, _ = adapters.nnx_loss_fn(small, adapters.softmax_cross_entropy_loss)
    small_views = {k: v for k, v in make_batch(1, 6).items() if k != "mask"}
    specs = bookkeeping.discover_ops(small_loss.tapped, small_params, small_views, jax.random.key(0))
    assert sorted(s.kind for s in specs.values()) == ["nnx_conv", "nnx_conv", "nnx_dense"]


@pytest.mark.slow
def test_eight_devices_equal_the_vmap_engine_on_eight_devices():
    """Under shard_map each device's clipped sum must use only its own examples: the output-gradient
    pass must not psum over devices (device-varying perturbations), so 8 devices == vmap engine."""
    from dpft import distributed
    from dpft.train import step as step_lib
    if jax.device_count() < 8:
        pytest.skip("needs 8 fake devices (tests/conftest.py)")
    loss_fn, params = model_setup("nfnet_nano")
    mesh = distributed.make_data_mesh(jax.devices()[:8])
    rs = np.random.RandomState(3)
    n = 16
    mask = np.ones(n, np.float32)
    mask[[3, 12]] = 0
    batch = {"image": rs.randn(n, 1, 8, 8, 3).astype(np.float32),
             "label": rs.randint(0, NUM_CLASSES, (n, 1)).astype(np.int32), "mask": mask}
    sums, stats = {}, {}
    for method in ("vmap", "bookkeeping"):
        clipping = ClippingConfig(mode="flat", clip_norm=0.1)
        plan = plan_lib.fixed_plan(clipping=clipping, noise_multiplier=0.0, expected_batch_size=8.0, params=params,
                                   secret=keys.RunSecret.insecure_fixed(0), grad_method=method)
        cfg = step_lib.StepConfig(plan=plan, microbatch_size=2)
        accumulate = step_lib.make_accumulate_fn(loss_fn, cfg, mesh)
        acc, st = accumulate(distributed.replicate(params, mesh), step_lib.zeros_accumulator(params, mesh),
                             distributed.shard_batch(batch, mesh), jax.random.key(5))
        sums[method] = step_lib.global_sum(acc, mesh)
        stats[method] = {k: np.asarray(v) for k, v in st.items()}
    assert_same((sums["vmap"], stats["vmap"]), (sums["bookkeeping"], stats["bookkeeping"]))
    assert np.all(stats["vmap"]["norms"][mask > 0] > 0.1)


@pytest.mark.slow
def test_bfloat16_compute_matches_the_vmap_engine_to_bf16_precision():
    """Mixed precision: bf16 activations/perturbations, float32 params and norms."""
    model = dpft.models.create("nfnet_nano", NUM_CLASSES, head_init="normal", dtype=jnp.bfloat16)
    loss_fn, params, _ = adapters.nnx_loss_fn(model, adapters.softmax_cross_entropy_loss)
    batch = make_batch(1, 16)
    clipping = ClippingConfig(mode="flat", clip_norm=0.1)
    rng = jax.random.key(2)
    ref = jax.jit(lambda p, b: engine.clipped_grad_sum(loss_fn, p, b, rng, clipping=clipping,
                                                       microbatch_size=4))(params, batch)
    got = jax.jit(lambda p, b: bookkeeping.bk_clipped_grad_sum(loss_fn, p, b, rng, clipping=clipping,
                                                               microbatch_size=4))(params, batch)
    np.testing.assert_allclose(np.asarray(got[1]["norms"]), np.asarray(ref[1]["norms"]), rtol=3e-2)
    flat_ref = np.concatenate([np.ravel(x) for x in jax.tree.leaves(ref[0])])
    flat_got = np.concatenate([np.ravel(x) for x in jax.tree.leaves(got[0])])
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(got[0]))
    cos = flat_ref @ flat_got / (np.linalg.norm(flat_ref) * np.linalg.norm(flat_got))
    assert cos > 0.999, cos
    assert np.linalg.norm(flat_got - flat_ref) < 0.05 * np.linalg.norm(flat_ref)
