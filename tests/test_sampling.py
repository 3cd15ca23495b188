"""dpft.privacy.sampling: Poisson selection per update and fixed-shape physical batches."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps

from dpft.privacy import adapters, engine, sampling
from dpft.testing.models import SmallConvNet

P_FAIL = 1e-7  # per statistical check: false alarm probability


def test_poisson_batch_size_is_binomial():
    n, q, updates = 2000, 0.03, 3000
    sizes = np.empty(updates)
    counts = np.zeros(n)
    for t in range(updates):
        idx = sampling.poisson_selection(5, t, n, q)
        assert idx.dtype == np.int64
        assert np.all(np.diff(idx) > 0)  # sorted, no duplicates
        assert idx.size == 0 or (idx[0] >= 0 and idx[-1] < n)
        sizes[t] = idx.size
        counts[idx] += 1
    mean, var = n * q, n * q * (1 - q)
    z = (sizes.mean() - mean) / np.sqrt(var / updates)
    assert abs(z) < sps.norm.isf(P_FAIL / 2)
    # sample variance: (T-1) s^2 / var ~ chi2(T-1) (normal approximation of Binomial(2000, 0.03))
    stat = (updates - 1) * sizes.var(ddof=1) / var
    assert sps.chi2.ppf(P_FAIL / 2, updates - 1) * 0.9 < stat < sps.chi2.isf(P_FAIL / 2, updates - 1) * 1.1
    # every example is included at rate q: counts ~ Binomial(updates, q); chi-square goodness of fit
    expected = updates * q
    chi = np.sum((counts - expected) ** 2 / (expected * (1 - q)))
    assert chi < sps.chi2.isf(P_FAIL, n)


def test_poisson_selection_is_deterministic_and_scales():
    a = sampling.poisson_selection(1, 7, 100_000, 0.01)
    np.testing.assert_array_equal(a, sampling.poisson_selection(1, 7, 100_000, 0.01))
    assert not np.array_equal(a, sampling.poisson_selection(1, 8, 100_000, 0.01))
    assert not np.array_equal(a, sampling.poisson_selection(2, 7, 100_000, 0.01))
    big = sampling.poisson_selection(0, 0, 2_000_000, 0.001)
    assert abs(big.size - 2000) < 6 * np.sqrt(2000)
    assert sampling.poisson_selection(0, 0, 50, 1.0).tolist() == list(range(50))
    assert sampling.expected_batch_size(60_000, 0.01) == pytest.approx(600.0)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="sampling_rate"):
            sampling.poisson_selection(0, 0, 10, bad)
    with pytest.raises(ValueError, match="update_index"):
        sampling.poisson_selection(0, -1, 10, 0.5)


@pytest.mark.parametrize("num_shards,pbs", [(1, 16), (3, 4), (8, 5)])
def test_physical_batches_cover_selection_exactly_once(num_shards, pbs):
    selected = sampling.poisson_selection(3, 0, 1000, 0.1)
    all_batches = [sampling.physical_batches(selected, pbs, num_shards=num_shards, shard_index=s)
                   for s in range(num_shards)]
    lengths = {len(b) for b in all_batches}
    assert len(lengths) == 1  # same number of steps on every shard
    largest_shard = -(-selected.size // num_shards)
    assert lengths.pop() == -(-largest_shard // pbs)  # no truncation: a big batch takes more steps
    seen = []
    for shard in all_batches:
        for idx, mask in shard:
            assert idx.shape == (pbs,) and mask.shape == (pbs,) and mask.dtype == np.float32
            np.testing.assert_array_equal(mask, (idx >= 0).astype(np.float32))
            seen.extend(idx[idx >= 0].tolist())
    assert sorted(seen) == selected.tolist()


def test_physical_batches_edge_cases():
    batches = sampling.physical_batches(np.array([], np.int64), 4, num_shards=2, shard_index=1)
    assert len(batches) == 1 and batches[0][1].sum() == 0  # empty update still runs (noise only)
    with pytest.raises(ValueError, match="shard_index"):
        sampling.physical_batches(np.arange(3), 4, num_shards=2, shard_index=2)
    with pytest.raises(ValueError, match="physical_batch_size"):
        sampling.physical_batches(np.arange(3), 0)


def test_padding_rows_never_change_the_clipped_sum():
    """Same Poisson selection cut into physical batches of different sizes/shards, padding rows
    filled with real data: the accumulated clipped sum equals the brute-force sum over the
    selected examples."""
    n, q = 40, 0.3
    rs = np.random.RandomState(0)
    images = rs.randn(n, 1, 5, 5, 1).astype(np.float32)
    labels = rs.randint(0, 3, (n, 1)).astype(np.int32)
    model = SmallConvNet(1, 3, channels=(2, 3), seed=0)
    loss_fn, params, _ = adapters.nnx_loss_fn(model, adapters.softmax_cross_entropy_loss)
    cfg = engine.ClippingConfig("flat", clip_norm=0.05)
    selected = sampling.poisson_selection(9, 0, n, q)
    assert selected.size > 4

    grad = jax.jit(jax.grad(lambda p, v: loss_fn(p, v, jax.random.key(0))[0]))
    want = None
    for i in selected:
        g = grad(params, {"image": images[i], "label": labels[i]})
        g = engine.clip_gradient(g, cfg)[0]
        want = g if want is None else engine.accumulate(want, g)

    step = jax.jit(lambda b: engine.clipped_grad_sum(loss_fn, params, b, jax.random.key(0), clipping=cfg,
                                                     microbatch_size=2)[0])
    for num_shards, pbs in ((1, 8), (2, 6)):
        total = engine.zeros_like_grad_sum(params)
        for s in range(num_shards):
            for idx, mask in sampling.physical_batches(selected, pbs, num_shards=num_shards, shard_index=s):
                fill = np.where(idx >= 0, idx, rs.randint(0, n, idx.shape))  # padding = real, unselected data
                batch = {"image": jnp.asarray(images[fill]), "label": jnp.asarray(labels[fill]),
                         "mask": jnp.asarray(mask), "example_id": jnp.asarray(idx, jnp.int32)}
                total = engine.accumulate(total, step(batch))
        for a, b in zip(jax.tree.leaves(total), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
