"""benchmarks.torch_twins: each PyTorch twin, loaded with the Flax network's weights, has the same
parameter count and computes the same logits (the peers are compared on the same network).

Needs torch (the `bench` extras, .venv-bench): skipped where it is not installed.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks import peer_networks, torch_twins  # noqa: E402  (after the importorskip)

# (network, resolution, batch): ViT-Ti/16 at its benchmark resolution; the CNNs at 32x32.
CASES = [("gn_convnet", 32, 4), ("nfnet_tiny", 32, 4), ("vit_ti16", 224, 2)]


def _perturbed(params, seed: int = 0):
    """Every parameter + N(0, 0.05^2) noise, so that zero biases, unit gains and a small head
    cannot hide a mis-mapped parameter."""
    leaves, tdef = jax.tree.flatten(params)
    rs = np.random.RandomState(seed)
    return jax.tree.unflatten(tdef, [x + np.float32(0.05) * rs.standard_normal(np.shape(x)).astype(np.float32) for x in leaves])


@pytest.mark.parametrize("name,resolution,batch", CASES)
def test_twin_forward_equals_flax(name: str, resolution: int, batch: int):
    from flax import nnx
    module = peer_networks.build(name, resolution)
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    params = _perturbed(params)
    module = nnx.merge(graphdef, params, rest)
    twin = torch_twins.TWINS[name](peer_networks.NUM_CLASSES, resolution)
    flat = peer_networks.flat_params(params)
    torch_twins.load_flax_params(twin, flat)  # raises on a missing, extra or mis-shaped parameter
    assert torch_twins.num_params(twin) == sum(v.size for v in flat.values())

    images = np.random.RandomState(1).randn(batch, resolution, resolution, 3).astype(np.float32)
    want = np.asarray(module(images))  # inference mode: the nets have no dropout here anyway
    with torch.no_grad():
        got = twin(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    assert want.shape == got.shape == (batch, peer_networks.NUM_CLASSES)
    assert np.std(want) > 0.05  # non-trivial logits
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * float(np.max(np.abs(want))))


def test_load_refuses_a_missing_parameter():
    twin = torch_twins.TWINS["gn_convnet"](10, 32)
    flat = peer_networks.flat_params(nnx_params("gn_convnet"))
    flat.pop(next(iter(flat)))
    with pytest.raises(ValueError, match="no Flax value"):
        torch_twins.load_flax_params(twin, flat)


def nnx_params(name: str):
    from flax import nnx
    return nnx.split(peer_networks.build(name), nnx.Param, ...)[1]
