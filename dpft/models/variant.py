"""`Variant`: what a model file registers for each model name it provides."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from flax import nnx


@dataclasses.dataclass(frozen=True)
class Variant:
    """A named model: its family, builder (``builder(num_classes, dtype=, rngs=, **kwargs)``),
    constructor kwargs and recommended train/test resolutions (pixels)."""

    family: str
    builder: Callable[..., nnx.Module]
    kwargs: dict[str, Any]
    train_imsize: int
    test_imsize: int
