"""dpft.privacy.noise: privatize (sigma C / B, independent leaves, linear in sigma) and noise keys."""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps

from dpft.privacy import keys, noise


def _base(n: int):
    """The noise base key of a (test-only) insecure fixed secret n."""
    return keys.noise_base_key(keys.RunSecret.insecure_fixed(int(n)))

P_FAIL = 1e-7  # per statistical check: false alarm probability


def zeros_tree():
    return {"a": jnp.zeros((4000,), jnp.float32), "b": {"w": jnp.zeros((100, 60), jnp.float32)}}


def flat(tree) -> np.ndarray:
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def test_noise_std_matches_sigma_c_over_b_chi_square():
    sigma, c, b = 1.3, 0.7, 50.0
    target_std = sigma * c / b
    privatize = jax.jit(lambda g, k: noise.privatize(g, k, noise_multiplier=sigma, clip_norm=c, expected_batch_size=b))
    draws = np.concatenate([flat(privatize(zeros_tree(), noise.noise_key(_base(11), t))) for t in range(5)])
    n = draws.size  # 50,000 coordinates
    ss = np.sum((draws / target_std) ** 2)  # ~ chi2(n) if the std is right
    assert sps.chi2.ppf(P_FAIL / 2, n) < ss < sps.chi2.isf(P_FAIL / 2, n)
    # the bound has power: a 5% wrong std would fail it
    assert not sps.chi2.ppf(P_FAIL / 2, n) < ss / 1.05 ** 2 < sps.chi2.isf(P_FAIL / 2, n)
    # mean zero
    z = np.mean(draws) / (target_std / np.sqrt(n))
    assert abs(z) < sps.norm.isf(P_FAIL / 2)
    # leaves get independent noise (not the same stream reused)
    one = privatize({"a": jnp.zeros(3000), "b": jnp.zeros(3000)}, noise.noise_key(_base(0), 0))
    r = np.corrcoef(np.asarray(one["a"]), np.asarray(one["b"]))[0, 1]
    assert abs(r) < 6 / np.sqrt(3000)


def test_sigma_zero_is_the_exact_mean_and_the_noise_is_linear_in_sigma():
    rs = np.random.RandomState(0)
    g = {"x": jnp.asarray(rs.randn(7, 3), jnp.float32), "y": jnp.asarray(rs.randn(5), jnp.float32)}
    out = noise.privatize(g, noise.noise_key(_base(1), 2), noise_multiplier=0.0, clip_norm=1.0, expected_batch_size=4.0)
    for k in g:
        np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(g[k]) / np.float32(4.0))
    # sigma 2 doubles the noise exactly (same key)
    z = jax.tree.map(jnp.zeros_like, g)
    n1 = noise.privatize(z, noise.noise_key(_base(1), 2), noise_multiplier=1.0, clip_norm=1.0, expected_batch_size=1.0)
    n2 = noise.privatize(z, noise.noise_key(_base(1), 2), noise_multiplier=2.0, clip_norm=1.0, expected_batch_size=1.0)
    np.testing.assert_allclose(flat(n2), 2 * flat(n1), rtol=1e-6)
    with pytest.raises(ValueError, match="expected_batch_size"):
        noise.privatize(g, noise.noise_key(_base(1), 2), noise_multiplier=1.0, clip_norm=1.0, expected_batch_size=0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        noise.privatize(g, noise.noise_key(_base(1), 2), noise_multiplier=-1.0, clip_norm=1.0, expected_batch_size=1)


def test_noise_is_a_function_of_seed_and_update_only():
    z = zeros_tree()

    def draw(seed, t):
        return flat(noise.privatize(z, noise.noise_key(_base(seed), t), noise_multiplier=1.0, clip_norm=1.0,
                                    expected_batch_size=1.0))

    np.testing.assert_array_equal(draw(3, 10), draw(3, 10))
    assert not np.allclose(draw(3, 10), draw(3, 11))
    assert not np.allclose(draw(3, 10), draw(4, 10))
    # traced update index under jit gives the same key as the Python int
    jitted = jax.jit(lambda t: jax.random.key_data(noise.noise_key(_base(3), t)))
    np.testing.assert_array_equal(np.asarray(jitted(jnp.int32(10))),
                                  np.asarray(jax.random.key_data(noise.noise_key(_base(3), 10))))




def test_the_noise_needs_all_three_64_bit_streams():
    """192 key bits: the draw is (z_1 + z_2 + z_3) / sqrt(3) over three independent threefry streams
    (two were not enough: a meet in the middle finds two 64-bit keys from the noise in ~2^64; three
    cost ~2^128). A guess of all but one stream's key leaves a third of the noise variance unknown
    (correlation 2/3); a guess of one stream, two thirds (correlation 1/3)."""
    assert keys.NOISE_KEY_BITS == 192 and _base(3).shape == (keys.NOISE_STREAMS,) == (3,)
    zeros = {"w": jnp.zeros((40_000,), jnp.float32)}
    k = noise.noise_key(_base(3), 0)
    other = noise.noise_key(_base(4), 0)
    draw = lambda key: flat(noise.privatize(zeros, key, noise_multiplier=1.0, clip_norm=1.0,  # noqa: E731
                                            expected_batch_size=1.0))
    full = draw(k)
    assert abs(np.std(full) - 1.0) < 0.02
    for right in ((0, 1), (0, 2), (1, 2), (0,), (1,), (2,)):  # these streams guessed right, the others not
        mixed = jnp.stack([k[s] if s in right else other[s] for s in range(3)])
        r = np.corrcoef(full, draw(mixed))[0, 1]
        assert abs(r - len(right) / 3) < 0.03, (right, r)
    np.testing.assert_array_equal(draw(jnp.stack([k[0], k[1], k[2]])), full)
    for wrong in (k[:2], jnp.stack([k[0], k[1], k[2], other[0]])):  # two streams (or four) are refused
        with pytest.raises(TypeError, match="3 threefry keys"):
            noise.noise_key(wrong, 1)
    with pytest.raises(TypeError, match="3 threefry keys"):
        noise.noise_key(k[0], 1)  # a single 64-bit key is refused
