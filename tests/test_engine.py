"""DP engine: per-example gradients, clipping modes, microbatching, padding, shard_map, optax."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dpft.privacy import adapters, engine, noise
from dpft.privacy.engine import ClippingConfig
from dpft.testing.models import SmallConvNet

B, H, C_IN, NUM_CLASSES = 8, 6, 2, 3
MASK = np.array([1, 1, 0, 1, 1, 1, 0, 1], np.float32)  # padding in the middle and at the end


def make_batch(k: int, seed: int = 0, mask=MASK) -> dict[str, jnp.ndarray]:
    rs = np.random.RandomState(seed)
    return {"image": jnp.asarray(rs.randn(B, k, H, H, C_IN), jnp.float32),
            "label": jnp.asarray(np.repeat(rs.randint(0, NUM_CLASSES, (B, 1)), k, axis=1), jnp.int32),
            "mask": jnp.asarray(mask, jnp.float32),
            "example_id": jnp.asarray(np.where(mask > 0, np.arange(B), -1), jnp.int32)}


@functools.lru_cache(maxsize=None)
def setup(dropout_rate: float = 0.0):
    model = SmallConvNet(C_IN, NUM_CLASSES, channels=(3, 4), dropout_rate=dropout_rate, seed=1)
    loss_fn, params, _ = adapters.nnx_loss_fn(model, adapters.softmax_cross_entropy_loss)
    return loss_fn, params


def example_views(batch, i):
    return {k: v[i] for k, v in batch.items() if k not in ("mask", "example_id")}


@functools.lru_cache(maxsize=None)
def jitted_grad(loss_fn):
    return jax.jit(jax.grad(lambda p, v, r: loss_fn(p, v, r)[0]))


def reference_grads(loss_fn, params, batch, rng):
    """Python loop of single-example jax.grad, with the engine's documented per-example key."""
    grad = jitted_grad(loss_fn)
    out = []
    for i in range(B):
        g = grad(params, example_views(batch, i), jax.random.fold_in(rng, i))
        out.append([np.asarray(x, np.float64) for x in jax.tree.leaves(g)])
    return out  # [B][n_leaves] float64


def tree_norm(leaves):
    return float(np.sqrt(sum(np.sum(x ** 2) for x in leaves)))


def leaves64(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def assert_leaves_close(got, want, rtol=1e-5, atol=1e-6):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


_COMPILED: dict = {}  # (loss_fn, config, microbatch size) -> jitted engine: compile each once


def run_engine(loss_fn, params, batch, rng, clipping, microbatch_size=B, position_offset=0):
    key = (id(loss_fn), repr(clipping), microbatch_size)
    if key not in _COMPILED:
        _COMPILED[key] = jax.jit(lambda p, b, r, o: engine.clipped_grad_sum(
            loss_fn, p, b, r, clipping=clipping, microbatch_size=microbatch_size, position_offset=o))
    g, stats = _COMPILED[key](params, batch, rng, position_offset)
    return leaves64(g), {k: np.asarray(v) for k, v in stats.items()}


@pytest.mark.parametrize("k", [1, 3])
def test_per_example_grads_and_flat_clipping_match_loop(k):
    loss_fn, params = setup(dropout_rate=0.5)  # dropout: the per-example key matters
    batch, rng = make_batch(k), jax.random.key(7)
    ref = reference_grads(loss_fn, params, batch, rng)
    ref_norms = np.array([tree_norm(g) for g in ref])
    # Unclipped (huge C): the sum of per-example gradients of the real rows.
    got, stats = run_engine(loss_fn, params, batch, rng, ClippingConfig("flat", clip_norm=1e6), microbatch_size=4)
    want = [sum(MASK[i] * ref[i][j] for i in range(B)) for j in range(len(ref[0]))]
    assert_leaves_close(got, want)
    np.testing.assert_allclose(stats["norms"], ref_norms * MASK, rtol=1e-5)
    assert stats["norms"].dtype == np.float32
    # Clipped at the median norm: some examples are clipped, some are not.
    c = float(np.median(ref_norms[MASK > 0]))
    got, _ = run_engine(loss_fn, params, batch, rng, ClippingConfig("flat", clip_norm=c), microbatch_size=2)
    factors = np.minimum(1.0, c / ref_norms)
    want = [sum(MASK[i] * factors[i] * ref[i][j] for i in range(B)) for j in range(len(ref[0]))]
    assert_leaves_close(got, want)


def test_augmult_gradient_is_average_of_per_view_gradients():
    loss_fn, params = setup()
    batch, rng = make_batch(3, seed=3), jax.random.key(0)
    jgrad = jitted_grad(loss_fn)

    def grad(p, v):
        return jgrad(p, v, rng)

    for i in (0, 4):
        views = example_views(batch, i)
        per_view = [leaves64(grad(params, {kk: vv[j:j + 1] for kk, vv in views.items()})) for j in range(3)]
        want = [np.mean([pv[leaf] for pv in per_view], axis=0) for leaf in range(len(per_view[0]))]
        assert_leaves_close(leaves64(grad(params, views)), want)
        # and the engine sees that averaged gradient (unclipped, one real example)
        one_hot = np.zeros(B, np.float32)
        one_hot[i] = 1
        got, _ = run_engine(loss_fn, params, {**batch, "mask": jnp.asarray(one_hot)}, jax.random.key(5),
                            ClippingConfig("flat", clip_norm=1e6))
        assert_leaves_close(got, want)


def test_each_clipped_per_example_gradient_is_bounded_and_unclipped_unchanged():
    loss_fn, params = setup()
    batch, rng = make_batch(2, seed=1), jax.random.key(1)
    ref = reference_grads(loss_fn, params, batch, rng)
    ref_norms = np.array([tree_norm(g) for g in ref])
    c = float(np.median(ref_norms))
    f = jax.jit(lambda m: engine.clipped_grad_sum(loss_fn, params, {**batch, "mask": m}, rng,
                                                  clipping=ClippingConfig("flat", clip_norm=c), microbatch_size=4)[0])
    n_clipped = 0
    for i in range(B):  # isolate example i's clipped gradient with a one-hot mask
        one_hot = np.zeros(B, np.float32)
        one_hot[i] = 1
        gi = leaves64(f(jnp.asarray(one_hot)))
        assert tree_norm(gi) <= c + 1e-6
        if ref_norms[i] <= c:
            assert_leaves_close(gi, ref[i])
        else:
            n_clipped += 1
            np.testing.assert_allclose(tree_norm(gi), c, rtol=1e-5)
            assert_leaves_close(gi, [x * c / ref_norms[i] for x in ref[i]])
    assert 0 < n_clipped < B


def test_per_layer_and_automatic_match_brute_force():
    loss_fn, params = setup()
    batch, rng = make_batch(1, seed=2), jax.random.key(2)
    ref = reference_grads(loss_fn, params, batch, rng)
    n_leaves = len(ref[0])
    # per_layer, default split C_l = C / sqrt(n)
    c = 0.5
    got, _ = run_engine(loss_fn, params, batch, rng, ClippingConfig("per_layer", clip_norm=c), microbatch_size=4)
    cl = c / np.sqrt(n_leaves)
    want = [sum(MASK[i] * ref[i][j] * min(1.0, cl / np.linalg.norm(ref[i][j])) for i in range(B))
            for j in range(n_leaves)]
    assert_leaves_close(got, want)
    assert engine.sensitivity(ClippingConfig("per_layer", clip_norm=c), params) == pytest.approx(c)
    # per_layer with explicit norms
    norms_list = [0.05 * (j + 1) for j in range(n_leaves)]
    per_layer = jax.tree.unflatten(jax.tree.structure(params), norms_list)
    cfg = ClippingConfig("per_layer", clip_norm=1.0, per_layer_norms=per_layer)
    got, _ = run_engine(loss_fn, params, batch, rng, cfg)
    want = [sum(MASK[i] * ref[i][j] * min(1.0, norms_list[j] / np.linalg.norm(ref[i][j])) for i in range(B))
            for j in range(n_leaves)]
    assert_leaves_close(got, want)
    assert engine.sensitivity(cfg, params) == pytest.approx(np.sqrt(np.sum(np.square(norms_list))))
    # automatic: g * C / (||g|| + gamma)
    cfg = ClippingConfig("automatic", clip_norm=2.0, gamma=0.1)
    got, _ = run_engine(loss_fn, params, batch, rng, cfg, microbatch_size=2)
    want = [sum(MASK[i] * ref[i][j] * 2.0 / (tree_norm(ref[i]) + 0.1) for i in range(B)) for j in range(n_leaves)]
    assert_leaves_close(got, want)


def test_microbatches_and_accumulated_batches_equal_one_big_batch():
    loss_fn, params = setup(dropout_rate=0.5)
    batch, rng = make_batch(2, seed=4), jax.random.key(4)
    cfg = ClippingConfig("flat", clip_norm=0.3)
    whole, stats_whole = run_engine(loss_fn, params, batch, rng, cfg, microbatch_size=B)
    got, stats = run_engine(loss_fn, params, batch, rng, cfg, microbatch_size=1)
    assert_leaves_close(got, whole)
    np.testing.assert_allclose(stats["loss"], stats_whole["loss"], rtol=1e-6)
    # two half batches (2 microbatches each) with position offsets, accumulated
    halves = [{k: v[s:s + B // 2] for k, v in batch.items()} for s in (0, B // 2)]
    parts = [run_engine(loss_fn, params, h, rng, cfg, microbatch_size=2, position_offset=o)[0]
             for h, o in zip(halves, (0, B // 2))]
    assert_leaves_close(engine.accumulate(*parts), whole)


def test_mode_none_is_plain_grad_of_masked_sum():
    loss_fn, params = setup(dropout_rate=0.5)
    batch, rng = make_batch(2, seed=5), jax.random.key(5)

    def masked_sum(p):
        return sum(MASK[i] * loss_fn(p, example_views(batch, i), jax.random.fold_in(rng, i))[0] for i in range(B))

    want = leaves64(jax.jit(jax.grad(masked_sum))(params))
    got, stats = run_engine(loss_fn, params, batch, rng, ClippingConfig("none", clip_norm=0.0), microbatch_size=2)
    assert_leaves_close(got, want)
    np.testing.assert_array_equal(stats["norms"], np.zeros(B))
    assert engine.sensitivity(ClippingConfig("none"), params) == 0.0


@pytest.mark.parametrize("mode", ["flat", "per_layer", "automatic"])
def test_padding_contributes_exactly_zero_even_if_nan(mode):
    loss_fn, params = setup()
    batch, rng = make_batch(2, seed=6), jax.random.key(6)
    cfg = ClippingConfig(mode, clip_norm=0.2)
    clean, stats = run_engine(loss_fn, params, batch, rng, cfg, microbatch_size=4)
    pad = MASK == 0
    image = np.array(batch["image"])
    image[pad] = np.nan
    dirty, stats_dirty = run_engine(loss_fn, params, {**batch, "image": jnp.asarray(image)}, rng, cfg,
                                    microbatch_size=4)
    for a, b in zip(clean, dirty):
        np.testing.assert_array_equal(a, b)
    for key in ("norms", "loss", "accuracy"):
        np.testing.assert_array_equal(stats_dirty[key][pad], 0.0)
        np.testing.assert_array_equal(stats_dirty[key], stats[key])
    np.testing.assert_array_equal(stats_dirty["mask"], MASK)


def test_bf16_params_give_float32_sums_and_norms():
    model = SmallConvNet(C_IN, NUM_CLASSES, channels=(3, 4), seed=1, dtype=jnp.bfloat16)
    loss_fn, params = adapters.nnx_loss_fn(model, adapters.softmax_cross_entropy_loss)[:2]
    f32_params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    loss32 = setup()[0]
    batch, rng = make_batch(1, seed=7), jax.random.key(7)
    g, stats = jax.jit(lambda p, b, r: engine.clipped_grad_sum(
        loss_fn, p, b, r, clipping=ClippingConfig("flat", clip_norm=1e6), microbatch_size=4))(params, batch, rng)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(g))
    assert stats["norms"].dtype == jnp.float32
    ref = reference_grads(loss32, f32_params, batch, rng)
    np.testing.assert_allclose(np.asarray(stats["norms"]), [tree_norm(r) * m for r, m in zip(ref, MASK)], rtol=0.1)
    want = [sum(m * r[j] for r, m in zip(ref, MASK)) for j in range(len(ref[0]))]
    for got_leaf, want_leaf in zip(leaves64(g), want):
        assert np.linalg.norm(got_leaf - want_leaf) <= 0.1 * np.linalg.norm(want_leaf) + 1e-3


def test_invalid_inputs_raise_clear_errors():
    loss_fn, params = setup()
    batch = make_batch(1)
    with pytest.raises(ValueError, match="microbatch_size=3"):
        engine.clipped_grad_sum(loss_fn, params, batch, jax.random.key(0), clipping=ClippingConfig(),
                                microbatch_size=3)
    with pytest.raises(ValueError, match="mask"):
        engine.clipped_grad_sum(loss_fn, params, {"image": batch["image"]}, jax.random.key(0),
                                clipping=ClippingConfig(), microbatch_size=1)
    with pytest.raises(ValueError, match="mode"):
        ClippingConfig("flatt")
    with pytest.raises(ValueError, match="clip_norm"):
        ClippingConfig("flat", clip_norm=-1.0)
    with pytest.raises(ValueError, match="per_layer_norms"):
        ClippingConfig("flat", per_layer_norms={"a": 1.0})
    with pytest.raises(ValueError, match="gamma"):
        ClippingConfig("automatic", gamma=0.0)


def test_shard_map_per_device_sums_psum_to_single_device_result():
    """Per-example gradients must not be mixed across devices (JAX psums cotangents of replicated
    params inside shard_map; the engine must avoid that)."""
    n_dev = 4
    mesh = jax.make_mesh((n_dev,), ("data",), devices=jax.devices()[:n_dev])
    loss_fn, params = setup(dropout_rate=0.5)
    batch, rng = make_batch(2, seed=8), jax.random.key(8)
    local_b = B // n_dev
    for mode in ("flat", "none"):
        cfg = ClippingConfig(mode, clip_norm=0.1)

        def step(p, b):
            offset = jax.lax.axis_index("data") * local_b
            g, s = engine.clipped_grad_sum(loss_fn, p, b, rng, clipping=cfg, microbatch_size=1, position_offset=offset)
            return jax.lax.psum(g, "data"), s

        sharded = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P("data")), out_specs=(P(), P("data"))))
        g, stats = sharded(params, jax.device_put(batch, NamedSharding(mesh, P("data"))))
        want, want_stats = run_engine(loss_fn, params, batch, rng, cfg, microbatch_size=2)
        assert_leaves_close(leaves64(g), want)
        np.testing.assert_allclose(np.asarray(stats["norms"]), want_stats["norms"], rtol=1e-5)


def _base(n: int):
    from dpft.privacy import keys
    return keys.noise_base_key(keys.RunSecret.insecure_fixed(n))


def test_dp_aggregate_feeds_optax_adam():
    loss_fn, params = setup()
    batch, rng = make_batch(1, seed=9), jax.random.key(9)
    cfg = ClippingConfig("flat", clip_norm=0.1)
    grad_sum, _ = run_engine(loss_fn, params, batch, rng, cfg, microbatch_size=4)
    grad_sum = jax.tree.unflatten(jax.tree.structure(params), [jnp.asarray(x, jnp.float32) for x in grad_sum])
    expected_b = 6.0
    # sigma = 0: exactly adam on the clipped mean
    tx = optax.chain(engine.dp_aggregate(noise_base_key=_base(0), noise_multiplier=0.0, clip_norm=0.1, expected_batch_size=expected_b),
                     optax.adam(1e-2))
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(grad_sum, state, params)
    adam = optax.adam(1e-2)
    want, _ = jax.jit(adam.update)(jax.tree.map(lambda g: g / expected_b, grad_sum), adam.init(params), params)
    assert_leaves_close(leaves64(updates), leaves64(want), rtol=1e-5, atol=1e-8)
    new_params = optax.apply_updates(params, updates)
    assert jax.tree.structure(new_params) == jax.tree.structure(params)
    assert int(state[0].update_index) == 1
    # sigma > 0: the noise of update t is privatize(..., noise_key(seed, t))
    tx = engine.dp_aggregate(noise_base_key=_base(3), noise_multiplier=1.0, clip_norm=0.1, expected_batch_size=expected_b)
    state = tx.init(params)
    update = jax.jit(tx.update)
    first, state = update(grad_sum, state)
    second, state = update(grad_sum, state)
    for t, got in enumerate((first, second)):
        want = noise.privatize(grad_sum, noise.noise_key(_base(3), t), noise_multiplier=1.0, clip_norm=0.1,
                               expected_batch_size=expected_b)
        assert_leaves_close(leaves64(got), leaves64(want))
    assert not np.allclose(leaves64(first)[0], leaves64(second)[0])
