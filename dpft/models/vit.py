"""Vision Transformer (ViT, Dosovitskiy et al. 2021; AugReg, Steiner et al. 2022) in Flax NNX.

The computation of big_vision's ``models/vit.py`` (learned position embedding added
*before* the class token is prepended, pre-LN encoder blocks, GELU with the tanh
approximation, LayerNorm epsilon 1e-6, final ``encoder_norm``, linear head):

    images [B, H, W, C] -> embedding (Conv p x p, stride p) -> tokens [B, N, D], N = (H/p)(W/p)
      -> + pos_embedding [1, N, D] -> (pool "tok": prepend cls [1, 1, D]) -> [B, L, D]
      -> depth x { x + MHA(LN(x)); x + MLP(LN(x)) } -> encoder_norm
      -> pool ("tok": token 0, "gap": mean over tokens) [B, D] -> head -> float32 [B, classes]

Built only from standard Flax layers (``nnx.Conv``, ``nnx.LayerNorm``,
``nnx.MultiHeadAttention`` with ``dpft.nn.ops.self_attention`` as its core, flax's arithmetic
without size-1 axes, ``nnx.Linear``); the two parameters that are not a standard layer's
(class token, position embedding) each live in a small module of their own (``ClassToken``,
``PositionEmbedding``), so that per-layer machinery (e.g. book-keeping DP) sees every
parameter through one small module call.

``dtype`` is the compute dtype; parameters are float32. No dropout and no stochastic
depth: ``train`` and ``key`` are accepted for the common model interface and ignored.
Checkpoint names: ``dpft.models.vit_checkpoints``.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dpft.models.variant import Variant
from dpft.nn import ops

Array = jax.Array

POOL_TYPES = ("tok", "gap")
#: Initialisers of the fresh (not imported) model; big_vision's choices.
_XAVIER = nnx.initializers.xavier_uniform()
_MLP_BIAS = nnx.initializers.normal(stddev=1e-6)


class PositionEmbedding(nnx.Module):
    """Learned position embedding. ``__call__(x [B, N, D]) -> x + embedding`` (in x's dtype)."""

    def __init__(self, num_tokens: int, width: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(stddev=width ** -0.5)
        self.embedding = nnx.Param(init(rngs.params(), (1, num_tokens, width), jnp.float32))

    def __call__(self, x: Array) -> Array:
        emb = self.embedding.get_value()
        if x.shape[1:] != emb.shape[1:]:
            raise ValueError(f"PositionEmbedding: tokens of shape {x.shape[1:]} (N, D), expected "
                             f"{emb.shape[1:]}; the model was built for another image size")
        return x + emb.astype(x.dtype)


class ClassToken(nnx.Module):
    """Learned class token. ``__call__(x [B, N, D]) -> [B, 1 + N, D]`` with the token first."""

    def __init__(self, width: int):
        self.token = nnx.Param(jnp.zeros((1, 1, width), jnp.float32))

    def __call__(self, x: Array) -> Array:
        # Derived from x (not broadcast_to) so that it inherits x's batch sharding under explicit meshes.
        token = jnp.zeros_like(x[:, :1]) + self.token.get_value().astype(x.dtype)
        return jnp.concatenate([token, x], axis=1)


class EncoderBlock(nnx.Module):
    """Pre-LN transformer block. [B, L, D] -> [B, L, D]:
    ``x + attention(norm_0(x))``, then ``+ mlp_1(gelu_tanh(mlp_0(norm_1(.))))``."""

    def __init__(self, width: int, mlp_dim: int, num_heads: int, *, dtype: Any, rngs: nnx.Rngs):
        if width % num_heads:
            raise ValueError(f"EncoderBlock: width {width} is not a multiple of num_heads {num_heads}")
        self.norm_0 = nnx.LayerNorm(width, epsilon=1e-6, dtype=dtype, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(
            num_heads, width, dtype=dtype, kernel_init=_XAVIER, deterministic=True, decode=False,
            keep_rngs=False, attention_fn=ops.self_attention, rngs=rngs)
        self.norm_1 = nnx.LayerNorm(width, epsilon=1e-6, dtype=dtype, rngs=rngs)
        self.mlp_0 = nnx.Linear(width, mlp_dim, dtype=dtype, kernel_init=_XAVIER, bias_init=_MLP_BIAS, rngs=rngs)
        self.mlp_1 = nnx.Linear(mlp_dim, width, dtype=dtype, kernel_init=_XAVIER, bias_init=_MLP_BIAS, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        y = self.norm_0(x)
        x = x + self.attention(y, y, y, deterministic=True, decode=False)
        y = jax.nn.gelu(self.mlp_0(self.norm_1(x)), approximate=True)
        return x + self.mlp_1(y)


class ViT(nnx.Module):
    """ViT. ``model(images [B, H, W, C], *, train=False, key=None)`` -> float32 [B, num_classes].

    ``image_size`` (pixels, square) fixes the number of position embeddings,
    (image_size / patch_size)^2; other input sizes are refused. ``head_init`` "zeros"
    (default: a zero head, as in DP fine-tuning) or "normal" (stddev 0.01, for tests).
    """

    def __init__(self, num_classes: int, *, width: int = 768, depth: int = 12, mlp_dim: int = 3072,
                 num_heads: int = 12, patch_size: int = 16, image_size: int = 224, in_channels: int = 3,
                 pool_type: str = "tok", head_init: str = "zeros", dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        if pool_type not in POOL_TYPES:
            raise ValueError(f"ViT: pool_type={pool_type!r}; choose from {POOL_TYPES}")
        if image_size % patch_size:
            raise ValueError(f"ViT: image_size {image_size} is not a multiple of patch_size {patch_size}")
        if head_init not in ("zeros", "normal"):
            raise ValueError(f"ViT: head_init={head_init!r}; choose zeros or normal")
        self.dtype, self.pool_type = dtype, pool_type
        self.patch_size, self.image_size = patch_size, image_size
        grid = image_size // patch_size
        self.embedding = nnx.Conv(in_channels, width, (patch_size, patch_size), strides=patch_size,
                                  padding="VALID", dtype=dtype, kernel_init=nnx.initializers.lecun_normal(),
                                  rngs=rngs)
        self.pos_embedding = PositionEmbedding(grid * grid, width, rngs=rngs)
        self.cls_token = ClassToken(width) if pool_type == "tok" else None
        self.blocks = nnx.List([EncoderBlock(width, mlp_dim, num_heads, dtype=dtype, rngs=rngs)
                                for _ in range(depth)])
        self.encoder_norm = nnx.LayerNorm(width, epsilon=1e-6, dtype=dtype, rngs=rngs)
        head_kernel = (nnx.initializers.zeros if head_init == "zeros"
                       else nnx.initializers.normal(stddev=0.01))
        self.head = nnx.Linear(width, num_classes, dtype=dtype, kernel_init=head_kernel, rngs=rngs)

    def __call__(self, images: Array, *, train: bool = False, key: Array | None = None) -> Array:
        del train, key
        if images.ndim != 4:
            raise ValueError(f"ViT: images must be [B, H, W, C], got shape {images.shape}")
        if images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"ViT: built for {self.image_size}x{self.image_size} images, got "
                             f"{images.shape[1]}x{images.shape[2]}; build it with image_size={images.shape[1]}")
        x = self.embedding(images.astype(self.dtype))
        b, h, w, d = x.shape
        x = self.pos_embedding(x.reshape(b, h * w, d))
        if self.cls_token is not None:
            x = self.cls_token(x)
        for block in self.blocks:
            x = block(x)
        x = self.encoder_norm(x)
        pooled = x[:, 0] if self.pool_type == "tok" else jnp.mean(x, axis=1)
        return self.head(pooled).astype(jnp.float32)


# ---------------------------------------------------------------- registered variants (big_vision sizes)
_NPZ = dict(head="head", checkpoint_loader="dpft.models.vit_checkpoints:load_pretrained")  # big_vision .npz
VARIANTS: dict[str, Variant] = {
    "vit_ti16": Variant("vit", ViT, dict(width=192, depth=12, mlp_dim=768, num_heads=3), 224, 224, **_NPZ),
    "vit_s16": Variant("vit", ViT, dict(width=384, depth=12, mlp_dim=1536, num_heads=6), 224, 224, **_NPZ),
    "vit_b16": Variant("vit", ViT, dict(width=768, depth=12, mlp_dim=3072, num_heads=12), 224, 224, **_NPZ),
    "vit_micro": Variant("vit", ViT, dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8, image_size=32),
                         32, 32, **_NPZ),
}
