"""Model variants by name: ``create``, ``variant_info``, ``load_pretrained``.

Each model file registers its names in a ``VARIANTS`` dict (``dpft.models.variant.Variant``);
``MODEL_FAMILIES`` lists those files. NFNet-F0..F7 follow the DeepMind variant table
(Brock et al. 2021). Small variants for tests and the demo:
  * ``nfnet_tiny``: widths [16, 32, 64, 64], depths [1, 1, 1, 1], group width 8,
    stem 8/8/16 -> 8 channels, final conv to 128; same blocks as F0.
  * ``nfnet_micro``: widths [8, 16, 16, 16], depths [1, 1, 1, 1], group width 4,
    stem 4/4/8 -> 4 channels; a fast model for unit tests.
  * ``nfnet_nano``: widths [8, 16], depths [1, 1], strides [1, 2], group width 4, stem 4/4/8:
    every layer kind of F0 in two stages; the end-to-end tests' model (compiles in ~0.6x micro's time).
  * ``wrn_16_4``: WideResNet-16-4 for 32x32 inputs with GroupNorm(16) and weight
    standardisation (De et al. 2022); see ``dpft.models.wrn``.
  * ``vit_ti16``, ``vit_s16``, ``vit_b16``: ViT-Ti/S/B with 16x16 patches at 224 px
    (big_vision sizes); ``vit_micro``: width 32, depth 2, 2 heads, 8x8 patches at 32 px, for
    tests. See ``dpft.models.vit``; checkpoints: ``dpft.models.vit_checkpoints``.
  * ``canary_linear_32`` / ``_64`` / ``_128``: ``dpft audit``'s Dirac-canary model (``dpft.models.canary``).
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Iterable

import jax.numpy as jnp
from flax import nnx

from dpft.errors import UsageError
from dpft.models.variant import Variant
from dpft.registry import Registry


#: The one model registry: family -> "module:VARIANTS" ({model name: Variant}). Adding a model is
#: one new file with a VARIANTS dict and one line here.
MODEL_FAMILIES = Registry("model family", {
    "nfnet": "dpft.models.nfnet:VARIANTS",
    "wrn": "dpft.models.wrn:VARIANTS",
    "vit": "dpft.models.vit:VARIANTS",
    "canary": "dpft.models.canary:VARIANTS",
})
#: The checkpoint reader of variants without their own ``checkpoint_loader`` (Haiku pickle, flat npz, orbax).
HAIKU_LOADER = "dpft.models.checkpoints:load_pretrained"


def variants() -> dict[str, Variant]:
    """{model name: Variant} over every registered family (imports the family modules)."""
    out: dict[str, Variant] = {}
    for family in MODEL_FAMILIES:
        for name, v in MODEL_FAMILIES.get(family).items():
            if name in out:
                raise ValueError(f"model {name!r} is registered by two families ({out[name].family}, {family})")
            out[name] = v
    return out


def names() -> tuple[str, ...]:
    """Every registered model name."""
    return tuple(variants())


def lookup(name: str) -> Variant:
    """The Variant registered as ``name`` (case-insensitive); UsageError naming the choices if none."""
    table = variants()
    key = name.lower()
    if key not in table:
        raise UsageError(f"unknown model {name!r}; choose from {', '.join(table)}")
    return table[key]


def variant_of(model: nnx.Module) -> Variant:
    """The Variant whose builder is ``model``'s class (abstract models from ``nnx.eval_shape`` too):
    what checkpoint I/O reads ``head`` and ``haiku`` from, so every variant of a class must agree on them."""
    found = [v for v in variants().values() if v.builder is type(model)]
    if not found:
        raise UsageError(f"no registered model variant is built by {type(model).__name__}; "
                         "register its Variant (dpft.models.registry.MODEL_FAMILIES)")
    if any((v.head, v.haiku) != (found[0].head, found[0].haiku) for v in found):
        raise ValueError(f"the variants built by {type(model).__name__} disagree on head / haiku layout")
    return found[0]


def variant_info(name: str) -> dict[str, Any]:
    """Plain-data description: family, train/test resolution (pixels) and constructor kwargs."""
    v = lookup(name)
    return {"name": name.lower(), "family": v.family, "train_imsize": v.train_imsize,
            "test_imsize": v.test_imsize, **{k: (list(x) if isinstance(x, tuple) else x)
                                             for k, x in v.kwargs.items()}}


def create(name: str, num_classes: int, *, seed: int = 0, dtype: Any = jnp.float32,
           **overrides: Any) -> nnx.Module:
    """Build a model by name with freshly initialised parameters.

    ``dtype`` is the compute dtype (params stay float32); ``overrides`` replace
    constructor kwargs (e.g. ``drop_rate=0.0``, ``head_init="normal"``).
    """
    v = lookup(name)
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
    """Build ``variant`` and load the checkpoint at ``path`` with its ``Variant.checkpoint_loader``
    (default: ``HAIKU_LOADER``, names from ``Variant.haiku``).

    ``num_classes=None`` takes the class count from the checkpoint's head (``Variant.head``). With a
    different count the head is replaced (the model's own init: zeros for NFNet, WRN and ViT, as
    De et al. 2022) and every other parameter loaded; this needs ``"head"`` in ``allow_missing``.
    """
    loader = lookup(variant).checkpoint_loader or HAIKU_LOADER
    module, _, name = loader.partition(":")
    return getattr(importlib.import_module(module), name)(
        path, variant, num_classes, allow_missing=allow_missing, seed=seed, dtype=dtype, **overrides)
