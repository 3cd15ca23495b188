"""`Variant`: what a model file registers for each model name it provides, and `HaikuLayout`: how
DeepMind Haiku checkpoints name its parameters."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from flax import nnx


@dataclasses.dataclass(frozen=True)
class HaikuLayout:
    """How a Haiku checkpoint (``{module_name: {param_name: ndarray}}``) names a model's parameters.

    The NNX path of a parameter, minus its last entry, is joined with ``/~/`` under ``root``; an
    entry ``i`` of a list attribute ``attr`` in ``lists`` is renamed ``lists[attr]`` (i = 0) or
    ``f"{lists[attr]}_{i}"``. The last entry is the param name. E.g. root "NFNet",
    lists {"blocks": "nf_block"}: ``blocks[3].conv1.w`` <-> ``("NFNet/~/nf_block_3/~/conv1", "w")``.
    """

    root: str
    lists: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Variant:
    """A named model: its family, builder (``builder(num_classes, dtype=, rngs=, **kwargs)``),
    constructor kwargs and recommended train/test resolutions (pixels).

    What pre-trained checkpoints need (keywords; a model without them trains from scratch only):
      head: the NNX attribute path of the classification head ("linear", "head", "fc.out"): the
        module replaced for another class count; its parameters hold the classes on their last
        axis (a dense layer: w [in, classes], b [classes]).
      haiku: how a DeepMind Haiku checkpoint names the parameters (read by ``dpft.models.checkpoints``).
      checkpoint_loader: "module:function" reading the family's own pre-trained format, called as
        ``fn(path, variant, num_classes, *, allow_missing, seed, dtype, **overrides) -> nnx.Module``;
        "" = ``dpft.models.checkpoints.load_pretrained`` (Haiku pickle / flat npz / orbax, by ``haiku``).
    """

    family: str
    builder: Callable[..., nnx.Module]
    kwargs: dict[str, Any]
    train_imsize: int
    test_imsize: int
    _: dataclasses.KW_ONLY
    head: str = ""
    haiku: HaikuLayout | None = None
    checkpoint_loader: str = ""

    @property
    def head_path(self) -> tuple[str, ...]:
        """``head`` as an NNX path, e.g. ``("fc", "out")``; () when none is declared."""
        return tuple(self.head.split(".")) if self.head else ()
