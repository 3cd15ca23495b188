"""Adapters: NNX and Haiku loss functions, standard per-view losses."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dpft.privacy import adapters, engine
from dpft.testing.models import SmallConvNet, haiku_small_convnet, nnx_to_haiku_params

B, K, H, C_IN, NUM_CLASSES = 6, 2, 6, 2, 3


def test_haiku_and_nnx_give_the_same_clipped_sums():
    model = SmallConvNet(C_IN, NUM_CLASSES, channels=(3, 4), seed=2)
    nnx_loss, nnx_params, _ = adapters.nnx_loss_fn(model, adapters.softmax_cross_entropy_loss)
    hk_loss = adapters.haiku_loss_fn(haiku_small_convnet(NUM_CLASSES, channels=(3, 4)),
                                     adapters.softmax_cross_entropy_loss)
    hk_params = nnx_to_haiku_params(model)
    rs = np.random.RandomState(0)
    batch = {"image": jnp.asarray(rs.randn(B, K, H, H, C_IN), jnp.float32),
             "label": jnp.asarray(np.repeat(rs.randint(0, NUM_CLASSES, (B, 1)), K, 1), jnp.int32),
             "mask": jnp.asarray([1, 1, 1, 0, 1, 0], jnp.float32)}
    cfg = engine.ClippingConfig("flat", clip_norm=0.2)
    run = lambda loss, p: jax.jit(lambda pp: engine.clipped_grad_sum(loss, pp, batch, jax.random.key(0),  # noqa: E731
                                                                      clipping=cfg, microbatch_size=2))(p)
    g_nnx, s_nnx = run(nnx_loss, nnx_params)
    g_hk, s_hk = run(hk_loss, hk_params)
    for key in ("norms", "loss", "accuracy"):
        np.testing.assert_allclose(np.asarray(s_nnx[key]), np.asarray(s_hk[key]), rtol=1e-5, atol=1e-7)
    assert float(np.min(np.asarray(s_nnx["norms"])[:3])) > 0
    for name in ("conv1", "conv2", "head"):
        np.testing.assert_allclose(np.asarray(g_nnx[name]["kernel"][...]), np.asarray(g_hk[name]["w"]),
                                   rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.asarray(g_nnx[name]["bias"][...]), np.asarray(g_hk[name]["b"]),
                                   rtol=1e-5, atol=1e-7)


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_softmax_cross_entropy_against_numpy():
    rs = np.random.RandomState(1)
    logits = rs.randn(4, 5).astype(np.float32)
    labels = np.array([0, 3, 3, 1])
    losses, aux = adapters.softmax_cross_entropy_loss(jnp.asarray(logits), {"label": jnp.asarray(labels)})
    want = -log_softmax(logits.astype(np.float64))[np.arange(4), labels]
    np.testing.assert_allclose(np.asarray(losses), want, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(aux["accuracy"]), (logits.argmax(-1) == labels).astype(np.float32))


def test_sigmoid_bce_masks_labels():
    rs = np.random.RandomState(2)
    logits = rs.randn(3, 4).astype(np.float32)
    labels = rs.randint(0, 2, (3, 4)).astype(np.float32)
    mask = np.array([[1, 1, 0, 1], [0, 0, 0, 0], [1, 0, 1, 1]], np.float32)
    logits[0, 2] = 1e4  # a masked label with a huge loss must not matter
    labels[0, 2] = 0.0
    losses, aux = adapters.sigmoid_binary_cross_entropy_loss(
        jnp.asarray(logits), {"label": jnp.asarray(labels), "label_mask": jnp.asarray(mask)})
    x = logits.astype(np.float64)
    bce = np.maximum(x, 0) - x * labels + np.log1p(np.exp(-np.abs(x)))
    for k in range(3):
        m = mask[k] > 0
        want = bce[k][m].mean() if m.any() else 0.0
        acc = ((x[k] > 0) == (labels[k] > 0))[m].mean() if m.any() else 0.0
        assert float(losses[k]) == pytest.approx(want, rel=1e-5, abs=1e-7)
        assert float(aux["accuracy"][k]) == pytest.approx(acc)
    # no label_mask: mean over all labels
    losses, _ = adapters.sigmoid_binary_cross_entropy_loss(jnp.asarray(logits), {"label": jnp.asarray(labels)})
    np.testing.assert_allclose(np.asarray(losses), bce.mean(-1), rtol=1e-5)


class PlainModule(nnx.Module):
    """No train/key keywords; a non-Param variable that must stay constant."""

    def __init__(self):
        self.linear = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
        self.scale = nnx.Variable(jnp.asarray(3.0))

    def __call__(self, x):
        return self.linear(x.reshape(x.shape[0], -1)) * self.scale[...]


class KeyedModule(nnx.Module):
    """Adds key-dependent noise when train=True: proves the adapter passes train and key."""

    def __init__(self):
        self.linear = nnx.Linear(4, 2, rngs=nnx.Rngs(0))

    def __call__(self, x, *, train=False, key=None):
        out = self.linear(x.reshape(x.shape[0], -1))
        if train:
            out = out + jax.random.normal(key, out.shape)
        return out


def test_nnx_adapter_call_conventions_and_merge():
    x = jnp.asarray(np.random.RandomState(3).randn(2, 2, 2, 1), jnp.float32)  # K=2 views of 2x2x1
    views = {"image": x, "label": jnp.asarray([1, 1])}

    loss_fn, params, merge = adapters.nnx_loss_fn(PlainModule(), adapters.softmax_cross_entropy_loss)
    assert set(jax.tree.leaves(jax.tree.map(lambda p: p.shape, params), is_leaf=lambda t: isinstance(t, tuple))) \
        == {(4, 2), (2,)}  # only Params are trainable: the Variable `scale` is a constant
    loss, aux = loss_fn(params, views, jax.random.key(0))
    logits = PlainModule()(x)
    want = np.mean(adapters.softmax_cross_entropy_loss(logits, views)[0])
    assert float(loss) == pytest.approx(float(want), rel=1e-6)
    assert set(aux) == {"accuracy"} and aux["accuracy"].shape == ()
    np.testing.assert_allclose(np.asarray(merge(params)(x)), np.asarray(logits), rtol=1e-6)
    g = jax.grad(lambda p: loss_fn(p, views, jax.random.key(0))[0])(params)
    assert jax.tree.structure(g) == jax.tree.structure(params)

    keyed_loss, keyed_params, _ = adapters.nnx_loss_fn(KeyedModule(), adapters.softmax_cross_entropy_loss)
    l1 = float(keyed_loss(keyed_params, views, jax.random.key(1))[0])
    l1_again = float(keyed_loss(keyed_params, views, jax.random.key(1))[0])
    l2 = float(keyed_loss(keyed_params, views, jax.random.key(2))[0])
    assert l1 == l1_again and l1 != l2
    assert adapters.accepts_train_and_key(KeyedModule.__call__)
    assert not adapters.accepts_train_and_key(PlainModule.__call__)


def test_per_view_loss_shape_is_checked():
    loss_fn, params, _ = adapters.nnx_loss_fn(PlainModule(), lambda logits, views: jnp.sum(logits))
    with pytest.raises(ValueError, match=r"shape \[K\]"):
        loss_fn(params, {"image": jnp.zeros((2, 2, 2, 1))}, jax.random.key(0))
