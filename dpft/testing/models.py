"""Tiny models for the privacy tests and the DP-overhead benchmark (not for training).

`SmallConvNet` (Flax NNX) and `haiku_small_convnet` compute the same function:
conv3x3(c1) -> relu -> conv3x3(c2, stride 2) -> relu -> global mean -> linear(num_classes),
with optional dropout on the pooled features when called with train=True and a key.
`nnx_to_haiku_params` copies NNX weights into the Haiku parameter dict.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


class SmallConvNet(nnx.Module):
    """images float [B, H, W, C_in] -> logits float32 [B, num_classes]."""

    def __init__(self, in_channels: int, num_classes: int, *, channels: tuple[int, int] = (4, 8),
                 dropout_rate: float = 0.0, seed: int = 0, dtype: Any = jnp.float32):
        rngs = nnx.Rngs(seed)
        c1, c2 = channels
        self.conv1 = nnx.Conv(in_channels, c1, (3, 3), rngs=rngs, param_dtype=dtype, dtype=dtype)
        self.conv2 = nnx.Conv(c1, c2, (3, 3), strides=2, rngs=rngs, param_dtype=dtype, dtype=dtype)
        self.head = nnx.Linear(c2, num_classes, rngs=rngs, param_dtype=dtype, dtype=dtype)
        self.dropout_rate = dropout_rate

    def __call__(self, images: jax.Array, *, train: bool = False, key: jax.Array | None = None) -> jax.Array:
        h = jax.nn.relu(self.conv1(images))
        h = jax.nn.relu(self.conv2(h))
        h = jnp.mean(h, axis=(1, 2))
        if train and key is not None and self.dropout_rate > 0:
            keep = jax.random.bernoulli(key, 1.0 - self.dropout_rate, h.shape)
            h = jnp.where(keep, h / (1.0 - self.dropout_rate), 0.0)
        return self.head(h).astype(jnp.float32)


def haiku_small_convnet(num_classes: int, channels: tuple[int, int] = (4, 8)):
    """hk.transform of the same function as SmallConvNet (no dropout)."""
    import haiku as hk

    def forward(images: jax.Array) -> jax.Array:
        c1, c2 = channels
        h = jax.nn.relu(hk.Conv2D(c1, 3, name="conv1")(images))
        h = jax.nn.relu(hk.Conv2D(c2, 3, stride=2, name="conv2")(h))
        h = jnp.mean(h, axis=(1, 2))
        return hk.Linear(num_classes, name="head")(h)

    return hk.transform(forward)


def nnx_to_haiku_params(model: SmallConvNet) -> dict[str, dict[str, jax.Array]]:
    """The Haiku params dict holding the weights of `model` (kernels are HWIO / [in, out] in both)."""
    return {name: {"w": jnp.asarray(getattr(model, name).kernel[...]), "b": jnp.asarray(getattr(model, name).bias[...])}
            for name in ("conv1", "conv2", "head")}


class GroupNormConvNet(nnx.Module):
    """A plain user CNN of standard flax layers (the benchmark's "GroupNorm CNN"):
    [conv3x3 -> GroupNorm -> relu] x 3 (the last two strided) -> global mean -> linear.
    images float [B, H, W, C_in] -> logits float32 [B, num_classes]."""

    def __init__(self, in_channels: int, num_classes: int, *, channels: tuple[int, int, int] = (16, 32, 64),
                 groups: int = 4, seed: int = 0, dtype: Any = jnp.float32):
        rngs = nnx.Rngs(seed)
        c = (in_channels,) + tuple(channels)
        self.convs = nnx.List([nnx.Conv(c[i], c[i + 1], (3, 3), strides=1 if i == 0 else 2, rngs=rngs, dtype=dtype)
                               for i in range(3)])
        self.norms = nnx.List([nnx.GroupNorm(c[i + 1], num_groups=groups, rngs=rngs, dtype=dtype) for i in range(3)])
        self.head = nnx.Linear(c[-1], num_classes, rngs=rngs, dtype=dtype)

    def __call__(self, images: jax.Array) -> jax.Array:
        h = images
        for conv, norm in zip(self.convs, self.norms):
            h = jax.nn.relu(norm(conv(h)))
        return self.head(jnp.mean(h, axis=(1, 2))).astype(jnp.float32)
