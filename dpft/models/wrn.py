"""Wide-ResNet for 32x32 inputs as used for DP-SGD by De et al. (2022).

WRN-d-k: a 3x3 conv to 16 channels, then three groups of (d-4)/6 pre-activation
basic blocks with widths 16k, 32k, 64k and strides 1, 2, 2, then
norm -> relu -> global mean pool -> linear head (zeros init). No batch
normalisation: every norm is a GroupNorm with 16 groups (per-example statistics,
so per-example gradients stay independent) and every conv is a weight-standardised
``WSConv2D`` (with gain and bias), as in De et al.

Block: ``h = relu(norm_0(x))``; shortcut = ``conv_shortcut(h)`` (1x1, stride) when the
shape changes, else ``x``; ``out = conv_1(relu(norm_1(conv_0(h))))``; return ``out + shortcut``.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dpft.models import layers
from dpft.models.variant import HaikuLayout, Variant

Array = jax.Array


class WRNBlock(nnx.Module):
    """Pre-activation basic block. [B, H, W, in_ch] -> [B, H/stride, W/stride, out_ch]."""

    def __init__(self, in_ch: int, out_ch: int, *, stride: int = 1, groups: int = 16,
                 dtype: Any = jnp.float32, init: layers.ParamInit):
        self.norm_0 = layers.GroupNorm(in_ch, groups, dtype=dtype)
        self.conv_0 = layers.WSConv2D(in_ch, out_ch, 3, stride=stride, dtype=dtype, init=init)
        self.norm_1 = layers.GroupNorm(out_ch, groups, dtype=dtype)
        self.conv_1 = layers.WSConv2D(out_ch, out_ch, 3, dtype=dtype, init=init)
        self.use_projection = stride > 1 or in_ch != out_ch
        self.conv_shortcut = (layers.WSConv2D(in_ch, out_ch, 1, stride=stride, dtype=dtype, init=init)
                              if self.use_projection else None)

    def __call__(self, x: Array) -> Array:
        h = jax.nn.relu(self.norm_0(x))
        shortcut = self.conv_shortcut(h) if self.use_projection else x
        out = self.conv_0(h)
        out = self.conv_1(jax.nn.relu(self.norm_1(out)))
        return out + shortcut.astype(out.dtype)


class WideResNet(nnx.Module):
    """WRN-depth-width. ``model(images [B,H,W,C], *, train=False, key=None)`` -> float32 [B, num_classes].

    No dropout and no stochastic depth (``train`` and ``key`` are accepted for the
    common model interface and ignored).
    """

    def __init__(self, num_classes: int, *, depth: int = 16, width: int = 4, groups: int = 16,
                 in_channels: int = 3, head_init: str = "zeros", dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet: depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        self.dtype = dtype
        init = layers.ParamInit.from_rngs(rngs)
        self.conv_stem = layers.WSConv2D(in_channels, 16, 3, dtype=dtype, init=init)
        blocks, ch = [], 16
        for out_ch, stride in ((16 * width, 1), (32 * width, 2), (64 * width, 2)):
            for i in range(n):
                blocks.append(WRNBlock(ch, out_ch, stride=stride if i == 0 else 1, groups=groups,
                                       dtype=dtype, init=init))
                ch = out_ch
        self.blocks = nnx.List(blocks)
        self.final_norm = layers.GroupNorm(ch, groups, dtype=dtype)
        self.linear = layers.Linear(ch, num_classes, w_init=head_init, dtype=dtype, init=init)

    def __call__(self, images: Array, *, train: bool = False, key: Array | None = None) -> Array:
        del train, key
        if images.ndim != 4:
            raise ValueError(f"WideResNet: images must be [B, H, W, C], got shape {images.shape}")
        out = self.conv_stem(images.astype(self.dtype))
        for block in self.blocks:
            out = block(out)
        out = jax.nn.relu(self.final_norm(out))
        return self.linear(jnp.mean(out, axis=(1, 2))).astype(jnp.float32)


#: Checkpoint names: root module "WideResNet", blocks as wrn_block[_i]; head "linear".
HAIKU = HaikuLayout("WideResNet", {"blocks": "wrn_block"})

VARIANTS: dict[str, Variant] = {
    "wrn_16_4": Variant("wrn", WideResNet, dict(depth=16, width=4, groups=16), 32, 32, head="linear", haiku=HAIKU),
}
