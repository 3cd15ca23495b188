"""WideResNet-16-4 with GroupNorm + weight standardisation (dpft.models.wrn)."""
import math

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

import dpft.models as models
from dpft.models import layers


def n_params(model):
    return sum(math.prod(v.get_value().shape) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


def expected_wrn_params(depth, k, num_classes, in_ch=3):
    conv = lambda ksz, i, o: ksz * ksz * i * o + 2 * o  # w + gain + bias
    norm = lambda c: 2 * c
    n, total, ch = (depth - 4) // 6, conv(3, in_ch, 16), 16
    for out in (16 * k, 32 * k, 64 * k):
        for i in range(n):
            total += norm(ch) + conv(3, ch, out) + norm(out) + conv(3, out, out)
            if i == 0:  # every group starts with a shape change for k > 1
                total += conv(1, ch, out)
            ch = out
    return total + norm(ch) + ch * num_classes + num_classes


def test_wrn_16_4_parameter_count():
    model = nnx.eval_shape(lambda: models.create("wrn_16_4", 10))
    assert n_params(model) == expected_wrn_params(16, 4, 10)
    assert 2.7e6 < n_params(model) < 2.8e6  # WRN-16-4 is the usual ~2.75M
    info = models.variant_info("wrn_16_4")
    assert info["family"] == "wrn" and info["train_imsize"] == 32


def test_group_norm_matches_numpy():
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 32)).astype(np.float32) * 3 + 1
    gn = layers.GroupNorm(32, 16)
    scale = np.linspace(0.5, 2, 32).astype(np.float32)
    offset = np.linspace(-1, 1, 32).astype(np.float32)
    gn.scale.set_value(jnp.asarray(scale))
    gn.offset.set_value(jnp.asarray(offset))
    xg = x.reshape(2, 3, 5, 16, 2).astype(np.float64)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = xg.var(axis=(1, 2, 4), keepdims=True)
    want = ((xg - mean) / np.sqrt(var + 1e-5)).reshape(x.shape) * scale + offset
    np.testing.assert_allclose(np.asarray(gn(jnp.asarray(x))), want, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def small_wrn():
    model = models.create("wrn_16_4", 10, width=1, head_init="normal")
    graphdef, params = nnx.split(model, nnx.Param)
    return model, params, jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))


def test_examples_are_independent_no_batch_statistics(small_wrn):
    """An example's logits do not depend on the rest of the batch (GroupNorm, no BN)."""
    _, params, apply = small_wrn
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    y = x.at[1:].set(jax.random.normal(jax.random.key(1), (3, 32, 32, 3)) * 5)
    a, b = apply(params, x), apply(params, y)
    assert a.shape == (4, 10) and a.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b[0]), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(a[1]), np.asarray(b[1]))


def test_bfloat16_close_to_float32(small_wrn):
    model, params, apply = small_wrn
    bf16 = models.create("wrn_16_4", 10, width=1, head_init="normal", dtype=jnp.bfloat16)
    nnx.update(bf16, params)
    graphdef, bf_params = nnx.split(bf16, nnx.Param)
    x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
    want = apply(params, x)
    got = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(bf_params, x)
    assert got.dtype == jnp.float32
    assert all(v.get_value().dtype == jnp.float32 for _, v in nnx.to_flat_state(nnx.state(bf16, nnx.Param)))
    err, scale = float(jnp.max(jnp.abs(got - want))), float(jnp.max(jnp.abs(want)))
    assert 0 < err < 0.05 * scale


def test_bad_depth_is_rejected():
    from dpft.errors import UsageError
    with pytest.raises((ValueError, UsageError), match="6n\\+4"):
        models.create("wrn_16_4", 10, depth=15)
