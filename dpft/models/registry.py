"""Model variants by name: ``create``, ``variant_info``, ``load_pretrained``.

NFNet-F0..F7 follow the DeepMind variant table (Brock et al. 2021). Small variants
for tests and the demo:
  * ``nfnet_tiny``: widths [16, 32, 64, 64], depths [1, 1, 1, 1], group width 8,
    stem 8/8/16 -> 8 channels, final conv to 128; same blocks as F0.
  * ``nfnet_micro``: widths [8, 16, 16, 16], depths [1, 1, 1, 1], group width 4,
    stem 4/4/8 -> 4 channels; the fastest model for unit tests.
  * ``wrn_16_4``: WideResNet-16-4 for 32x32 inputs with GroupNorm(16) and weight
    standardisation (De et al. 2022); see ``dpft.models.wrn``.
  * ``vit_ti16``, ``vit_s16``, ``vit_b16``: ViT-Ti/S/B with 16x16 patches at 224 px
    (big_vision sizes); ``vit_micro``: width 32, depth 2, 2 heads, 8x8 patches at 32 px, for
    tests. See ``dpft.models.vit``; checkpoints: ``dpft.models.vit_checkpoints``.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterable

import jax.numpy as jnp
from flax import nnx

from dpft.cli import UsageError
from dpft.models.nfnet import NFNet
from dpft.models.vit import ViT
from dpft.models.wrn import WideResNet


@dataclasses.dataclass(frozen=True)
class Variant:
    """A named model: its class, constructor kwargs and recommended resolutions (pixels)."""
    family: str
    builder: Callable[..., nnx.Module]
    kwargs: dict[str, Any]
    train_imsize: int
    test_imsize: int


_F_DEPTHS = {"f0": (1, 2, 6, 3), "f1": (2, 4, 12, 6), "f2": (3, 6, 18, 9), "f3": (4, 8, 24, 12),
             "f4": (5, 10, 30, 15), "f5": (6, 12, 36, 18), "f6": (7, 14, 42, 21), "f7": (8, 16, 48, 24)}
_F_RES = {"f0": (192, 256), "f1": (224, 320), "f2": (256, 352), "f3": (320, 416),
          "f4": (384, 512), "f5": (416, 544), "f6": (448, 576), "f7": (480, 608)}
_F_DROP = {"f0": 0.2, "f1": 0.3, "f2": 0.4, "f3": 0.4, "f4": 0.5, "f5": 0.5, "f6": 0.5, "f7": 0.5}

VARIANTS: dict[str, Variant] = {
    f"nfnet_{v}": Variant("nfnet", NFNet, dict(
        width=(256, 512, 1536, 1536), depth=_F_DEPTHS[v], group_width=128, expansion=0.5,
        big_width=True, se_ratio=0.5, alpha=0.2, stochdepth_rate=0.1, drop_rate=_F_DROP[v],
        final_conv_mult=2, activation="gelu"), *_F_RES[v])
    for v in _F_DEPTHS
}
VARIANTS["nfnet_tiny"] = Variant("nfnet", NFNet, dict(
    width=(16, 32, 64, 64), depth=(1, 1, 1, 1), group_width=8, stem_width=(8, 8, 16),
    stochdepth_rate=0.1, drop_rate=0.2), 32, 32)
VARIANTS["nfnet_micro"] = Variant("nfnet", NFNet, dict(
    width=(8, 16, 16, 16), depth=(1, 1, 1, 1), group_width=4, stem_width=(4, 4, 8),
    stochdepth_rate=0.1, drop_rate=0.2), 32, 32)
VARIANTS["wrn_16_4"] = Variant("wrn", WideResNet, dict(depth=16, width=4, groups=16), 32, 32)
VARIANTS["vit_ti16"] = Variant("vit", ViT, dict(width=192, depth=12, mlp_dim=768, num_heads=3), 224, 224)
VARIANTS["vit_s16"] = Variant("vit", ViT, dict(width=384, depth=12, mlp_dim=1536, num_heads=6), 224, 224)
VARIANTS["vit_b16"] = Variant("vit", ViT, dict(width=768, depth=12, mlp_dim=3072, num_heads=12), 224, 224)
VARIANTS["vit_micro"] = Variant("vit", ViT, dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8,
                                                 image_size=32), 32, 32)


def _variant(name: str) -> Variant:
    key = name.lower()
    if key not in VARIANTS:
        raise UsageError(f"unknown model {name!r}; choose from {', '.join(VARIANTS)}")
    return VARIANTS[key]


def variant_info(name: str) -> dict[str, Any]:
    """Plain-data description: family, train/test resolution (pixels) and constructor kwargs."""
    v = _variant(name)
    return {"name": name.lower(), "family": v.family, "train_imsize": v.train_imsize,
            "test_imsize": v.test_imsize, **{k: (list(x) if isinstance(x, tuple) else x)
                                             for k, x in v.kwargs.items()}}


def create(name: str, num_classes: int, *, seed: int = 0, dtype: Any = jnp.float32,
           **overrides: Any) -> nnx.Module:
    """Build a model by name with freshly initialised parameters.

    ``dtype`` is the compute dtype (params stay float32); ``overrides`` replace
    constructor kwargs (e.g. ``drop_rate=0.0``, ``head_init="normal"``).
    """
    v = _variant(name)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise UsageError(f"num_classes must be a positive int, got {num_classes!r}")
    kwargs = {**v.kwargs, **overrides}
    try:
        return v.builder(num_classes, dtype=dtype, rngs=nnx.Rngs(seed), **kwargs)
    except (TypeError, ValueError) as e:
        raise UsageError(f"model {name!r}: bad override ({e})") from None


def load_pretrained(path: str | os.PathLike, variant: str, num_classes: int | None = None, *,
                    allow_missing: Iterable[str] = ("head",), seed: int = 0,
                    dtype: Any = jnp.float32, **overrides: Any) -> nnx.Module:
    """Build ``variant`` and load the checkpoint at ``path`` (any supported format).

    ``num_classes=None`` takes the class count from the checkpoint's head. With a
    different count the head is replaced (zeros init, as De et al. 2022) and every
    other parameter loaded; this needs ``"head"`` in ``allow_missing``.
    """
    from dpft.models import checkpoints  # local: avoids a cycle at import time

    if _variant(variant).family == "vit":
        return _load_vit(path, variant, num_classes, allow_missing=allow_missing, seed=seed, dtype=dtype,
                         **overrides)
    probe = nnx.eval_shape(lambda: create(variant, 1, seed=seed, dtype=dtype, **overrides))
    tree = checkpoints.read_checkpoint(path, probe)
    head = checkpoints.head_modules(probe)[0]
    if num_classes is None:
        if head not in tree or "b" not in tree[head]:
            raise checkpoints.CheckpointError(f"{os.fspath(path)}: no head {head}/b to infer num_classes from")
        num_classes = int(tree[head]["b"].shape[0])
    model = create(variant, num_classes, seed=seed, dtype=dtype, **overrides)
    checkpoints.apply_haiku_tree(model, tree, allow_missing=allow_missing, source=os.fspath(path))
    return model


def _load_vit(path: str | os.PathLike, variant: str, num_classes: int | None, *, allow_missing: Iterable[str],
              seed: int, dtype: Any, **overrides: Any) -> nnx.Module:
    """``load_pretrained`` for a big_vision/AugReg ViT ``.npz`` (see ``dpft.models.vit_checkpoints``)."""
    from dpft.models import vit_checkpoints

    source = os.fspath(path)
    flat = vit_checkpoints.normalise(vit_checkpoints.read_flat(source), source)
    if num_classes is None:
        num_classes = vit_checkpoints.head_classes(flat, source)
    model = create(variant, num_classes, seed=seed, dtype=dtype, **overrides)
    vit_checkpoints.apply_flat(model, flat, allow_missing=allow_missing, source=source)
    return model
