"""The Flax networks that dpft and its peers are compared on (issue 18), as `common.Setup`s.

    gn_convnet  dpft.testing.models.GroupNormConvNet(3, 10)               32x32, B=64
    nfnet_tiny  dpft's `nfnet_tiny`, drop_rate=0, stochdepth_rate=0       32x32, B=64
    vit_ti16    dpft's `vit_ti16` (ViT-Ti/16)                             224x224, B=8

No dropout or stochastic depth (their PyTorch twins in `benchmarks.torch_twins` have none), so
both frameworks run the same computation. `flat_params` gives the {path: array} that
`torch_twins.load_flax_params` copies into a twin.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from benchmarks import common


@dataclasses.dataclass(frozen=True)
class Network:
    """A benchmark network: builder(num_classes, resolution, seed) -> nnx.Module, default size/batch."""
    build: Callable[[int, int, int], Any]
    resolution: int
    batch: int
    takes_train_key: bool  # __call__(images, train=..., key=...) (dpft models) or __call__(images)


def _gn_convnet(nc: int, res: int, seed: int):
    from dpft.testing.models import GroupNormConvNet
    return GroupNormConvNet(3, nc, seed=seed)


def _registry(name: str, **overrides: Any) -> Callable[[int, int, int], Any]:
    def build(nc: int, res: int, seed: int):
        import dpft.models
        return dpft.models.create(name, nc, seed=seed, head_init="normal", **overrides)
    return build


NETWORKS: dict[str, Network] = {
    "gn_convnet": Network(_gn_convnet, 32, 64, False),
    "nfnet_tiny": Network(_registry("nfnet_tiny", drop_rate=0.0, stochdepth_rate=0.0), 32, 64, True),
    "vit_ti16": Network(lambda nc, res, seed: _registry("vit_ti16", image_size=res)(nc, res, seed), 224, 8, True),
}
NUM_CLASSES = 10


def build(name: str, resolution: int | None = None, seed: int = 0):
    """The Flax module of network `name` (fresh init) at `resolution` (default: the network's)."""
    net = NETWORKS[name]
    return net.build(NUM_CLASSES, resolution or net.resolution, seed)


def make_setup(name: str, batch_size: int | None = None, *, resolution: int | None = None,
               seed: int = 0) -> common.Setup:
    """Network `name` as the engine sees it (pure loss, params, apply) + a random batch [B, K=1, H, W, 3]."""
    import jax
    import jax.numpy as jnp

    from dpft.privacy import adapters
    net = NETWORKS[name]
    res, b = resolution or net.resolution, batch_size or net.batch
    loss_fn, params, merge = adapters.nnx_loss_fn(build(name, res, seed), adapters.softmax_cross_entropy_loss)
    rs = np.random.RandomState(seed)
    batch = {"image": jnp.asarray(rs.randn(b, 1, res, res, 3), jnp.float32),
             "label": jnp.asarray(rs.randint(0, NUM_CLASSES, (b, 1)), jnp.int32),
             "mask": jnp.ones((b,), jnp.float32), "example_id": jnp.arange(b, dtype=jnp.int32)}
    if net.takes_train_key:
        apply = lambda p, x, key: merge(p)(x, train=True, key=key)
    else:
        apply = lambda p, x, key: merge(p)(x)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    return common.Setup(name, loss_fn, params, batch, n, apply)


def flat_params(params: Any) -> dict[tuple, np.ndarray]:
    """An nnx.State of params -> {(module, ..., leaf name): numpy array} (list indices as ints)."""
    import jax
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = []
        for k in path:
            if hasattr(k, "key"):
                keys.append(k.key)
            elif hasattr(k, "idx"):
                keys.append(k.idx)
            elif getattr(k, "name", None) != "value":
                keys.append(k.name)
        out[tuple(keys)] = np.asarray(leaf)
    return out
