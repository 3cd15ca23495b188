"""PyTorch twins of the Flax networks that the peer benchmarks compare on (bench venv only).

    gn_convnet  dpft.testing.models.GroupNormConvNet(3, 10): 3x [Conv 3x3 -> GroupNorm(4) -> relu]
                (16/32/64 channels, strides 1/2/2, SAME padding), mean pool, Linear       32x32
    nfnet_tiny  dpft's NFNet `nfnet_tiny` (WS-conv, tanh-GELU x 1.7015, squeeze-excite, SkipInit)  32x32
    vit_ti16    dpft.models.vit ViT-Ti/16 (width 192, depth 12, 3 heads, MLP 768, class token) 224x224

Module and parameter names mirror the Flax parameter paths, so `load_flax_params` copies a Flax
model's parameters into its twin one to one (and refuses a missing, extra or mis-shaped one: the
parameter sets and counts are equal by construction). Layouts: NCHW images; Flax HWIO kernels become
OIHW, [in, out] kernels [out, in]. Every parameterised leaf module is either a standard layer with an
Opacus grad sampler (exactly nn.Conv2d, nn.Linear, nn.GroupNorm, nn.LayerNorm: Opacus matches the
type, not subclasses) or a small custom module (WSConv2d, Scale, ClassToken, PositionEmbedding) that
Opacus handles with its functorch fallback.
No dropout or stochastic depth anywhere: the Flax networks are benchmarked without them too.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

GELU_GAMMA = 1.7015043497085571


def scaled_gelu(x: torch.Tensor) -> torch.Tensor:
    """dpft's NFNet activation: tanh-approximated GELU times 1.7015043497085571."""
    return F.gelu(x, approximate="tanh") * GELU_GAMMA


def pad_same(x: torch.Tensor, k: int, stride: int) -> torch.Tensor:
    """TF/XLA SAME padding of NCHW `x` for a k x k window: the odd pixel goes at the end."""
    pads = []
    for size in (x.shape[3], x.shape[2]):  # F.pad order: last dim first
        out = -(-size // stride)
        total = max((out - 1) * stride + k - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


# ----------------------------------------------------------------------------- GroupNorm CNN
class GroupNormConvNet(nn.Module):
    """Twin of dpft.testing.models.GroupNormConvNet: [B, C, H, W] -> logits [B, num_classes].
    The convs are plain nn.Conv2d (padding applied before them, XLA's SAME), because Opacus picks its
    grad sampler by exact module type: a subclass would fall back to functorch."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, channels=(16, 32, 64), groups: int = 4):
        super().__init__()
        c = (in_channels,) + tuple(channels)
        self.convs = nn.ModuleList([nn.Conv2d(c[i], c[i + 1], 3, stride=1 if i == 0 else 2) for i in range(3)])
        self.norms = nn.ModuleList([nn.GroupNorm(groups, c[i + 1], eps=1e-6) for i in range(3)])
        self.head = nn.Linear(c[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, norm in zip(self.convs, self.norms):
            x = F.relu(norm(conv(pad_same(x, 3, conv.stride[0]))))
        return self.head(x.mean(dim=(2, 3)))


# ----------------------------------------------------------------------------- NFNet (nfnet_tiny)
class WSConv2d(nn.Module):
    """Scaled weight-standardised conv (dpft.nn.ops.ws_conv): weight [O, I/groups, k, k], gain [O],
    bias [O]; SAME padding."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin // groups, k, k) / math.sqrt(cin // groups * k * k))
        self.gain = nn.Parameter(torch.ones(cout))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.stride, self.groups, self.k = stride, groups, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        scale = torch.rsqrt(torch.clamp(var * w[0].numel(), min=1e-4)) * self.gain.view(-1, 1, 1, 1)
        w = w * scale - mean * scale
        return F.conv2d(pad_same(x, self.k, self.stride), w, self.bias, stride=self.stride, groups=self.groups)


class Scale(nn.Module):
    """Learned scalar gain (SkipInit) as a leaf module, so Opacus can sample its gradient."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


class SqueezeExcite(nn.Module):
    """Gates [B, C, 1, 1] = sigmoid(linear_1(relu(linear(mean_hw(x)))))."""

    def __init__(self, ch: int, ratio: float = 0.5):
        super().__init__()
        hidden = max(1, int(ch * ratio))
        self.linear, self.linear_1 = nn.Linear(ch, hidden), nn.Linear(hidden, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.linear_1(F.relu(self.linear(x.mean(dim=(2, 3))))))[:, :, None, None]


class NFBlock(nn.Module):
    """dpft.models.nfnet.NFBlock (inference path: no stochastic depth)."""

    def __init__(self, cin: int, cout: int, stride: int, beta: float, group_size: int, alpha: float = 0.2):
        super().__init__()
        width = int(cout * 0.5)
        groups = width // group_size
        self.beta, self.alpha, self.stride = beta, alpha, stride
        self.conv0 = WSConv2d(cin, width, 1)
        self.conv1 = WSConv2d(width, width, 3, stride, groups)
        self.conv1b = WSConv2d(width, width, 3, 1, groups)
        self.conv2 = WSConv2d(width, cout, 1)
        self.conv_shortcut = WSConv2d(cin, cout, 1) if (stride > 1 or cin != cout) else None
        self.squeeze_excite, self.skip_gain = SqueezeExcite(cout), Scale()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = scaled_gelu(x) * self.beta
        if self.stride > 1:  # 2x2 average pool, even sizes: no padding
            shortcut = F.avg_pool2d(out, 2, 2, ceil_mode=True, count_include_pad=False)
            if self.conv_shortcut is not None:
                shortcut = self.conv_shortcut(shortcut)
        elif self.conv_shortcut is not None:
            shortcut = self.conv_shortcut(out)
        else:
            shortcut = x
        out = self.conv2(scaled_gelu(self.conv1b(scaled_gelu(self.conv1(scaled_gelu(self.conv0(out)))))))
        out = self.squeeze_excite(out) * 2 * out
        return self.skip_gain(out) * self.alpha + shortcut


class TinyNFNet(nn.Module):
    """Twin of dpft's `nfnet_tiny` (depth 1 per stage): [B, 3, H, W] -> logits [B, num_classes]."""

    def __init__(self, num_classes: int = 10, width=(16, 32, 64, 64), group_width: int = 8,
                 stem=(8, 8, 16), alpha: float = 0.2):
        super().__init__()
        s0, s1, s2 = stem
        ch = width[0] // 2
        self.stem_conv0, self.stem_conv1 = WSConv2d(3, s0, 3, 2), WSConv2d(s0, s1, 3)
        self.stem_conv2, self.stem_conv3 = WSConv2d(s1, s2, 3), WSConv2d(s2, ch, 3, 2)
        blocks, expected = [], 1.0
        for w, stride in zip(width, (1, 2, 2, 2)):
            blocks.append(NFBlock(ch, w, stride, 1.0 / expected, group_width, alpha))
            expected = (1.0 + alpha ** 2) ** 0.5  # depth 1 per stage: reset to 1, then one block
            ch = w
        self.blocks = nn.ModuleList(blocks)
        self.final_conv = WSConv2d(ch, 2 * ch, 1)
        self.linear = nn.Linear(2 * ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = scaled_gelu(self.stem_conv0(x))
        x = scaled_gelu(self.stem_conv1(x))
        x = self.stem_conv3(scaled_gelu(self.stem_conv2(x)))
        for b in self.blocks:
            x = b(x)
        return self.linear(scaled_gelu(self.final_conv(x)).mean(dim=(2, 3)))


# ----------------------------------------------------------------------------- ViT
class PositionEmbedding(nn.Module):
    """x [B, N, D] + learned embedding [1, N, D] (added before the class token, as big_vision)."""

    def __init__(self, num_tokens: int, width: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(1, num_tokens, width) * width ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.embedding


class ClassToken(nn.Module):
    """[B, N, D] -> [B, 1 + N, D] with the learned token first."""

    def __init__(self, width: int):
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 1, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.token.expand(x.shape[0], -1, -1), x], dim=1)


class Attention(nn.Module):
    """nnx.MultiHeadAttention (self-attention, no dropout) with separate q/k/v/out nn.Linear layers."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.query, self.key, self.value, self.out = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        split = lambda t: t.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)  # [B, H, N, hd]
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.num_heads), dim=-1)
        return self.out((att @ v).transpose(1, 2).reshape(b, n, d))


class EncoderBlock(nn.Module):
    """Pre-LN block: x + attention(norm_0(x)); x + mlp_1(gelu_tanh(mlp_0(norm_1(x))))."""

    def __init__(self, width: int, mlp_dim: int, num_heads: int):
        super().__init__()
        self.norm_0, self.norm_1 = nn.LayerNorm(width, eps=1e-6), nn.LayerNorm(width, eps=1e-6)
        self.attention = Attention(width, num_heads)
        self.mlp_0, self.mlp_1 = nn.Linear(width, mlp_dim), nn.Linear(mlp_dim, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm_0(x))
        return x + self.mlp_1(F.gelu(self.mlp_0(self.norm_1(x)), approximate="tanh"))


class ViT(nn.Module):
    """Twin of dpft.models.vit.ViT (pool "tok"): [B, 3, S, S] -> logits [B, num_classes]."""

    def __init__(self, num_classes: int = 10, *, width: int = 192, depth: int = 12, mlp_dim: int = 768,
                 num_heads: int = 3, patch_size: int = 16, image_size: int = 224):
        super().__init__()
        grid = image_size // patch_size
        self.embedding = nn.Conv2d(3, width, patch_size, stride=patch_size)
        self.pos_embedding = PositionEmbedding(grid * grid, width)
        self.cls_token = ClassToken(width)
        self.blocks = nn.ModuleList([EncoderBlock(width, mlp_dim, num_heads) for _ in range(depth)])
        self.encoder_norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embedding(x).flatten(2).transpose(1, 2)  # [B, N, D], row-major patches as Flax
        x = self.cls_token(self.pos_embedding(x))
        for block in self.blocks:
            x = block(x)
        return self.head(self.encoder_norm(x)[:, 0])


#: name -> builder(num_classes, resolution) of the twin of dpft's network `name`.
TWINS: dict[str, Callable[[int, int], nn.Module]] = {
    "gn_convnet": lambda nc, res: GroupNormConvNet(3, nc),
    "nfnet_tiny": lambda nc, res: TinyNFNet(nc),
    "vit_ti16": lambda nc, res: ViT(nc, image_size=res),
}


def num_params(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def flax_to_torch(path: tuple, value: np.ndarray) -> tuple[str, np.ndarray]:
    """One Flax parameter (path of keys, array) -> (twin's parameter name, array in torch layout)."""
    *mods, leaf = [str(k) for k in path]
    name = {"kernel": "weight", "w": "weight", "b": "bias", "scale": "weight", "skip_gain": "skip_gain.gain"}.get(leaf, leaf)
    v = np.asarray(value, np.float32)
    if leaf in ("kernel", "w"):
        if v.ndim == 4:  # conv HWIO -> OIHW
            v = v.transpose(3, 2, 0, 1)
        elif v.ndim == 3 and mods[-1] == "out":  # attention out [H, hd, D] -> Linear [D, H*hd]
            v = v.reshape(-1, v.shape[-1]).T
        elif v.ndim == 3:  # attention q/k/v [D, H, hd] -> Linear [H*hd, D]
            v = v.reshape(v.shape[0], -1).T
        elif v.ndim == 2:
            v = v.T
    elif leaf == "bias" and v.ndim == 2:  # attention q/k/v bias [H, hd]
        v = v.reshape(-1)
    return ".".join(mods + [name]), v


def load_flax_params(model: nn.Module, flat: Mapping[tuple, np.ndarray]) -> nn.Module:
    """Copy Flax parameters {path tuple: array} into the twin `model` (in place; returned).
    Raises ValueError unless every Flax parameter maps onto a twin parameter of the same shape and
    every twin parameter is covered."""
    params = dict(model.named_parameters())
    seen = set()
    for path, value in flat.items():
        name, v = flax_to_torch(path, value)
        if name not in params or tuple(params[name].shape) != v.shape:
            got = tuple(params[name].shape) if name in params else "missing"
            raise ValueError(f"twin {type(model).__name__}: Flax {path} {v.shape} -> {name}: {got}")
        with torch.no_grad():
            params[name].copy_(torch.from_numpy(np.array(v, np.float32, copy=True)))
        seen.add(name)
    if set(params) - seen:
        raise ValueError(f"twin {type(model).__name__}: no Flax value for {sorted(set(params) - seen)}")
    return model
