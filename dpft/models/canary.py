"""`dpft audit`'s model: one tapped linear unit over the pixels of a Dirac canary image.

Input [B, S, S, C] (normalised images of `dpft.data.canaries`), channel 0 rescaled per image to
[0, FEATURE_SCALE] (so a canary's one white pixel is exactly FEATURE_SCALE and every other pixel 0,
whatever the normalisation); logits [B, 2] = [0, <w, features> + b]. With label 1 the loss is
softplus(-z) and the gradient of canary i is -sigmoid(-z) FEATURE_SCALE e_i on w (plus 1 / FEATURE_SCALE
of that on b): clipped to C whenever sigmoid(-z) FEATURE_SCALE >= C, i.e. for any C <= MAX_CLIP_NORM while
|z| stays small (the audit's learning rate sees to that). Weights start at 0.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from dpft.models import layers
from dpft.models.variant import Variant

FEATURE_SCALE = 1e4
#: The image sizes of the variants `canary_linear_<S>` (those of `dpft.data.canaries.SIZES`).
IMAGE_SIZES = (32, 64, 128)
#: The largest clip norm the model's canary gradients exceed (by 10x at z = 0).
MAX_CLIP_NORM = FEATURE_SCALE / 20


class CanaryLinear(nnx.Module):
    """logits [B, 2] = [0, z], z = <w, f(x)> + b over the S^2 pixels (num_classes must be 2)."""

    def __init__(self, num_classes: int, *, image_size: int, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if num_classes != 2:
            raise ValueError(f"canary_linear: num_classes must be 2 (other, canary), got {num_classes}")
        self.image_size = int(image_size)
        self.linear = layers.Linear(self.image_size ** 2, 1, w_init="zeros", dtype=dtype,
                                    init=layers.ParamInit.from_rngs(rngs))

    def __call__(self, images: Any, *, train: bool = False, key: Any = None) -> Any:
        x = images
        f = x[..., 0].reshape(x.shape[0], -1).astype(jnp.float32)
        lo, hi = jnp.min(f, axis=1, keepdims=True), jnp.max(f, axis=1, keepdims=True)
        f = (f - lo) / jnp.maximum(hi - lo, 1e-12) * FEATURE_SCALE
        z = self.linear(f).astype(jnp.float32)
        return jnp.concatenate([jnp.zeros_like(z), z], axis=-1)


def weight_of_pixels(params: Any) -> Any:
    """w [S^2]: the weight of each pixel (canary i's coordinate is entry i) from a params tree."""
    return params["linear"]["w"][..., 0]


VARIANTS: dict[str, Variant] = {
    f"canary_linear_{s}": Variant("canary", CanaryLinear, dict(image_size=s), s, s, head="linear") for s in IMAGE_SIZES}
