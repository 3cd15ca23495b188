"""Normalizer-Free Networks (NFNet-F*, Brock et al. 2021) in Flax NNX.

Exact to the DeepMind reference (``nfnets/nfnet.py``, ``nfnets/base.py``): same
stem, NFBlocks (two grouped 3x3 convs, squeeze-excite x2, SkipInit gain, stochastic
depth without rescaling), same signal-propagation betas, final conv to
``final_conv_mult * width[-1]`` channels, mean pool, dropout, linear head.

Attribute names equal the Haiku module names (``stem_conv0``, ``conv1b``,
``squeeze_excite.linear_1``, ``skip_gain``, ``final_conv``, ``linear``); the list
``blocks[i]`` is Haiku's ``nf_block`` (i = 0) / ``nf_block_{i}`` (``HAIKU``, read by
``dpft.models.checkpoints``).

Randomness (dropout, stochastic depth) comes only from the ``key`` argument; the
module holds no RNG state and no batch statistics.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dpft.models import layers
from dpft.models.variant import HaikuLayout, Variant
from dpft.nn import ops, taps

Array = jax.Array


def _scale_by_skip_gain(params: dict[str, Array], x: Array) -> Array:
    """``x * skip_gain`` (a scalar param), in x's dtype."""
    return x * params["skip_gain"].astype(x.dtype)


class NFBlock(nnx.Module):
    """One NF-ResNet bottleneck block with two grouped 3x3 convolutions.

    [B, H, W, in_ch] -> [B, H/stride, W/stride, out_ch].
    ``out = act(x) * beta``; shortcut = conv_shortcut(avgpool(out)) on a downsample,
    conv_shortcut(out) on a channel change, else x; residual
    conv0 -> act -> conv1 (stride) -> act -> conv1b -> act -> conv2 -> 2*SE gate;
    result ``residual * skip_gain * alpha + shortcut``.
    """

    def __init__(self, in_ch: int, out_ch: int, *, expansion: float = 0.5,
                 se_ratio: float = 0.5, group_size: int = 128, stride: int = 1,
                 beta: float = 1.0, alpha: float = 0.2, stochdepth_rate: float = 0.0,
                 big_width: bool = True, activation: str = "gelu",
                 dtype: Any = jnp.float32, init: layers.ParamInit):
        width = int((out_ch if big_width else in_ch) * expansion)
        groups = width // group_size
        if groups < 1:
            raise ValueError(f"NFBlock: expanded width {width} < group_size {group_size}")
        width = group_size * groups
        self.in_ch, self.out_ch, self.width, self.groups = in_ch, out_ch, width, groups
        self.stride, self.beta, self.alpha = stride, float(beta), float(alpha)
        self.stochdepth_rate = float(stochdepth_rate)
        self.activation = activation
        self.dtype = dtype
        conv = lambda i, o, k, **kw: layers.WSConv2D(i, o, k, dtype=dtype, init=init, **kw)
        self.conv0 = conv(in_ch, width, 1)
        self.conv1 = conv(width, width, 3, stride=stride, groups=groups)
        self.conv1b = conv(width, width, 3, groups=groups)
        self.conv2 = conv(width, out_ch, 1)
        self.use_projection = stride > 1 or in_ch != out_ch
        self.conv_shortcut = conv(in_ch, out_ch, 1) if self.use_projection else None
        self.squeeze_excite = layers.SqueezeExcite(out_ch, out_ch, se_ratio, dtype=dtype, init=init)
        self.skip_gain = nnx.Param(jnp.zeros((), jnp.float32))

    @property
    def has_stochdepth(self) -> bool:
        """As the reference: stochastic depth only for a rate strictly in (0, 1)."""
        return 0.0 < self.stochdepth_rate < 1.0

    def __call__(self, x: Array, *, uniform: Array | None = None) -> Array:
        """``uniform`` [B] U[0,1) draws given = training mode (stochastic depth); None = inference."""
        act = ops.ACTIVATIONS[self.activation]
        out = act(x) * jnp.asarray(self.beta, x.dtype)
        if self.stride > 1:
            shortcut = ops.avg_pool_same(out, 2, 2)
            if self.use_projection:
                shortcut = self.conv_shortcut(shortcut)
        elif self.use_projection:
            shortcut = self.conv_shortcut(out)
        else:
            shortcut = x
        out = self.conv0(out)
        out = self.conv1(act(out))
        out = self.conv1b(act(out))
        out = self.conv2(act(out))
        out = (self.squeeze_excite(out) * 2) * out
        if uniform is not None and self.has_stochdepth:
            out = ops.stochastic_depth(out, self.stochdepth_rate, uniform)
        out = taps.tap(self, "skip_gain", "generic", _scale_by_skip_gain, {"skip_gain": self.skip_gain[...]}, out)
        return out * jnp.asarray(self.alpha, out.dtype) + shortcut.astype(out.dtype)


def block_betas(depth: Sequence[int], alpha: float) -> list[float]:
    """The reference's per-block beta = 1/expected_std; the expected std is reset
    to 1 after the first (transition) block of each stage and grows by alpha^2
    in variance after every block."""
    betas, expected_std = [], 1.0
    for stage_depth in depth:
        for block_index in range(stage_depth):
            betas.append(1.0 / expected_std)
            if block_index == 0:
                expected_std = 1.0
            expected_std = (expected_std ** 2 + alpha ** 2) ** 0.5
    return betas


class NFNet(nnx.Module):
    """NFNet classifier. ``model(images [B,H,W,C], *, train=False, key=None)`` -> float32 [B, num_classes].

    Defaults are NFNet-F0; ``dpft.models.registry`` holds the variant table.
    ``head_init``: "zeros" (fine-tuning, as De et al. 2022) or "normal" (N(0, 0.01),
    the reference's pre-training default).
    """

    def __init__(self, num_classes: int, *, width: Sequence[int] = (256, 512, 1536, 1536),
                 depth: Sequence[int] = (1, 2, 6, 3), group_width: int | Sequence[int] = 128,
                 expansion: float = 0.5, big_width: bool = True, se_ratio: float = 0.5,
                 alpha: float = 0.2, stochdepth_rate: float = 0.1, drop_rate: float = 0.2,
                 final_conv_mult: int = 2, stem_width: Sequence[int] = (16, 32, 64),
                 strides: Sequence[int] = (1, 2, 2, 2), activation: str = "gelu",
                 in_channels: int = 3, head_init: str = "zeros",
                 dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if not (len(width) == len(depth) == len(strides)):
            raise ValueError(f"NFNet: width {width}, depth {depth}, strides {strides} differ in length")
        if activation not in ops.ACTIVATIONS:
            raise ValueError(f"NFNet: unknown activation {activation!r}")
        groups = [group_width] * len(width) if isinstance(group_width, int) else list(group_width)
        self.num_classes, self.drop_rate, self.activation, self.dtype = num_classes, float(drop_rate), activation, dtype
        init = layers.ParamInit.from_rngs(rngs)
        conv = lambda i, o, k, **kw: layers.WSConv2D(i, o, k, dtype=dtype, init=init, **kw)
        s0, s1, s2 = stem_width
        ch = width[0] // 2
        self.stem_conv0 = conv(in_channels, s0, 3, stride=2)
        self.stem_conv1 = conv(s0, s1, 3)
        self.stem_conv2 = conv(s1, s2, 3)
        self.stem_conv3 = conv(s2, ch, 3, stride=2)
        betas = block_betas(depth, alpha)
        num_blocks = sum(depth)
        blocks, index = [], 0
        for stage, (out_ch, stage_depth, stride) in enumerate(zip(width, depth, strides)):
            for block_index in range(stage_depth):
                blocks.append(NFBlock(
                    ch, out_ch, expansion=expansion, se_ratio=se_ratio, group_size=groups[stage],
                    stride=stride if block_index == 0 else 1, beta=betas[index], alpha=alpha,
                    stochdepth_rate=stochdepth_rate * index / num_blocks, big_width=big_width,
                    activation=activation, dtype=dtype, init=init))
                ch, index = out_ch, index + 1
        self.blocks = nnx.List(blocks)
        final_ch = int(final_conv_mult * ch)
        self.final_conv = conv(ch, final_ch, 1)
        self.linear = layers.Linear(final_ch, num_classes, w_init=head_init, dtype=dtype, init=init)

    def _forward(self, images: Array, train: bool, key: Array | None,
                 collect: dict[str, Array] | None) -> Array:
        if images.ndim != 4:
            raise ValueError(f"NFNet: images must be [B, H, W, C], got shape {images.shape}")
        if train and key is None:
            raise ValueError("NFNet: train=True needs an explicit `key` (dropout, stochastic depth)")
        act = ops.ACTIVATIONS[self.activation]
        n = len(self.blocks)
        if train:  # two random ops for the whole net (see ops.stochastic_depth)
            key_depth, key_drop = jax.random.split(key)
            uniforms = jax.random.uniform(key_depth, (n, images.shape[0]), jnp.float32)
        else:
            key_drop, uniforms = None, [None] * n
        out = images.astype(self.dtype)
        out = act(self.stem_conv0(out))
        out = act(self.stem_conv1(out))
        out = act(self.stem_conv2(out))
        out = self.stem_conv3(out)
        if collect is not None:
            collect["stem"] = out
        for i, block in enumerate(self.blocks):
            out = block(out, uniform=uniforms[i])
            if collect is not None:
                collect[f"block_{i}"] = out
        out = act(self.final_conv(out))
        pool = jnp.mean(out, axis=(1, 2))
        if collect is not None:
            collect["pool"] = pool
        if train and self.drop_rate > 0.0:
            pool = ops.dropout(pool, self.drop_rate, key_drop)
        return self.linear(pool).astype(jnp.float32)

    def __call__(self, images: Array, *, train: bool = False, key: Array | None = None) -> Array:
        return self._forward(images, train, key, None)

    def intermediates(self, images: Array) -> dict[str, Array]:
        """Inference-mode activations: ``stem``, ``block_{i}`` [B, h, w, c], ``pool`` [B, c], ``logits``."""
        collect: dict[str, Array] = {}
        collect["logits"] = self._forward(images, False, None, collect)
        return collect


# ---------------------------------------------------------------- registered variants
# NFNet-F0..F7 follow the DeepMind variant table (Brock et al. 2021); nfnet_tiny / nfnet_micro /
# nfnet_nano are small variants for tests and the demo (same blocks as F0; nano has two stages, every
# layer kind of the others, and compiles in about half the time: the end-to-end tests' model).
_F_DEPTHS = {"f0": (1, 2, 6, 3), "f1": (2, 4, 12, 6), "f2": (3, 6, 18, 9), "f3": (4, 8, 24, 12),
             "f4": (5, 10, 30, 15), "f5": (6, 12, 36, 18), "f6": (7, 14, 42, 21), "f7": (8, 16, 48, 24)}
_F_RES = {"f0": (192, 256), "f1": (224, 320), "f2": (256, 352), "f3": (320, 416),
          "f4": (384, 512), "f5": (416, 544), "f6": (448, 576), "f7": (480, 608)}
_F_DROP = {"f0": 0.2, "f1": 0.3, "f2": 0.4, "f3": 0.4, "f4": 0.5, "f5": 0.5, "f6": 0.5, "f7": 0.5}
#: DeepMind's checkpoint names (``F0_haiku.npz``): root module "NFNet", blocks as nf_block[_i]; head "linear".
HAIKU = HaikuLayout("NFNet", {"blocks": "nf_block"})
_CHECKPOINT = dict(head="linear", haiku=HAIKU)

VARIANTS: dict[str, Variant] = {
    f"nfnet_{v}": Variant("nfnet", NFNet, dict(
        width=(256, 512, 1536, 1536), depth=_F_DEPTHS[v], group_width=128, expansion=0.5,
        big_width=True, se_ratio=0.5, alpha=0.2, stochdepth_rate=0.1, drop_rate=_F_DROP[v],
        final_conv_mult=2, activation="gelu"), *_F_RES[v], **_CHECKPOINT)
    for v in _F_DEPTHS
}
VARIANTS["nfnet_tiny"] = Variant("nfnet", NFNet, dict(
    width=(16, 32, 64, 64), depth=(1, 1, 1, 1), group_width=8, stem_width=(8, 8, 16),
    stochdepth_rate=0.1, drop_rate=0.2), 32, 32, **_CHECKPOINT)
VARIANTS["nfnet_micro"] = Variant("nfnet", NFNet, dict(
    width=(8, 16, 16, 16), depth=(1, 1, 1, 1), group_width=4, stem_width=(4, 4, 8),
    stochdepth_rate=0.1, drop_rate=0.2), 32, 32, **_CHECKPOINT)
VARIANTS["nfnet_nano"] = Variant("nfnet", NFNet, dict(
    width=(8, 16), depth=(1, 1), strides=(1, 2), group_width=4, stem_width=(4, 4, 8),
    stochdepth_rate=0.1, drop_rate=0.2), 32, 32, **_CHECKPOINT)
