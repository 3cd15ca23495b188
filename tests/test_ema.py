"""EMA and Polyak averaging against plain numpy loops."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpft.train import ema as E


def _iterates(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{"a": rng.normal(size=(3, 2)).astype(np.float32), "b": {"c": rng.normal(size=(4,)).astype(np.float32)}}
            for _ in range(n)]


def _numpy_ema(init, iterates, decay, warmup):
    e = {str(p): np.asarray(leaf, np.float64) for p, leaf in jax.tree_util.tree_flatten_with_path(init)[0]}
    for t, params in enumerate(iterates):
        d = min(decay, (1 + t) / (10 + t)) if warmup else decay
        for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            e[str(p)] = d * e[str(p)] + (1 - d) * np.asarray(leaf, np.float64)
    return e


@pytest.mark.parametrize("decay,warmup", [(0.9, True), (0.9, False), (0.9999, True), (0.0, True)])
def test_ema_matches_numpy_loop(decay, warmup):
    its = _iterates(30)
    init = its[0]
    ema = E.ema_init(init)
    update = jax.jit(lambda e, p, t: E.ema_update(e, p, decay, t, warmup=warmup))
    for t, p in enumerate(its[1:]):
        ema = update(ema, p, t)
    want = _numpy_ema(init, its[1:], decay, warmup)
    for path, leaf in jax.tree_util.tree_flatten_with_path(ema)[0]:
        assert leaf.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(leaf), want[str(path)], rtol=1e-5, atol=1e-6)
    if decay == 0.0:  # EMA off: the last iterate
        np.testing.assert_allclose(np.asarray(ema["a"]), its[-1]["a"], rtol=0, atol=0)


def test_decay_schedule_values():
    assert float(E.ema_decay_at(0.9999, 0)) == pytest.approx(0.1)
    assert float(E.ema_decay_at(0.9999, 90)) == pytest.approx(91 / 100)
    assert float(E.ema_decay_at(0.5, 90)) == pytest.approx(0.5)
    assert float(E.ema_decay_at(0.9999, 0, warmup=False)) == pytest.approx(0.9999)


def test_ema_keeps_float32_for_bfloat16_params():
    p = {"w": jnp.ones((4,), jnp.bfloat16) * 3}
    e = E.ema_init(p)
    assert e["w"].dtype == jnp.float32
    e = E.ema_update(e, {"w": jnp.full((4,), 1.0 / 3, jnp.bfloat16)}, 0.9, 5)
    assert e["w"].dtype == jnp.float32
    d = 6 / 15
    want = d * 3 + (1 - d) * float(jnp.asarray(1.0 / 3, jnp.bfloat16))
    np.testing.assert_allclose(np.asarray(e["w"]), want, rtol=1e-6)


def test_polyak_is_uniform_mean():
    its = _iterates(17, seed=1)
    avg = E.polyak_init(its[0])
    step = jax.jit(E.polyak_update)
    for t, p in enumerate(its):
        avg = step(avg, p, t)
    np.testing.assert_allclose(np.asarray(avg["a"]), np.mean([i["a"] for i in its], axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(avg["b"]["c"]), np.mean([i["b"]["c"] for i in its], axis=0), rtol=1e-5, atol=1e-6)
    assert avg["a"].dtype == jnp.float32
