"""`Variant`: what a model file registers for each model name it provides."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from flax import nnx


@dataclasses.dataclass(frozen=True)
class Variant:
    """A named model: its family, builder (``builder(num_classes, dtype=, rngs=, **kwargs)``),
    constructor kwargs and recommended train/test resolutions (pixels).

    checkpoint_loader: "module:function" reading the family's own pre-trained format, called as
    ``fn(path, variant, num_classes, *, allow_missing, seed, dtype, **overrides) -> nnx.Module``;
    "" = the DeepMind Haiku / flat npz / orbax reader of ``dpft.models.checkpoints``."""

    family: str
    builder: Callable[..., nnx.Module]
    kwargs: dict[str, Any]
    train_imsize: int
    test_imsize: int
    checkpoint_loader: str = ""
