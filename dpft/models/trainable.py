"""`config.train.trainable`: which parameters of a model a run trains, as a `dpft.nn.partition.Partition`.

Forms (`parse` checks the syntax; `partition` needs the model):
  "all"              every parameter (the default; the step is the same code as before the field existed);
  "head"             the classification head only (`Variant.head`, e.g. "linear" for NFNet/WRN, "head" for ViT);
  "norms_and_head"   the head and the affine parameters of normalisation: every nnx.Param of an
                     nnx.LayerNorm / GroupNorm / BatchNorm / RMSNorm or a `dpft.models.layers.GroupNorm`
                     (scale, bias, offset); NFNets have no norm layers, their normalisation is in the weights
                     (scaled weight standardisation), so the equivalents are each `layers.WSConv2D`'s
                     per-channel affine `gain` and `bias` and each NFBlock's `skip_gain`;
  "regex:<pattern>"  the parameters whose '/'-joined path ('blocks/0/conv1/w') `re.search`es the pattern;
  "lora:<r>"         LoRA of rank r on every dense and conv kernel outside the head, the head fully trained
                     (`dpft.nn.lora`: not a subset of the parameters, see there).
A regex that does not compile or matches no parameter is a UsageError naming the field, the value
and example paths.
"""
from __future__ import annotations

import re
from typing import Any

from flax import nnx

from dpft.errors import UsageError
from dpft.models import layers
from dpft.nn import lora
from dpft.nn.partition import Partition, param_paths, path_name

FIELD = "config.train.trainable"
SUBSETS = ("all", "head", "norms_and_head")
PREFIXES = ("regex:", "lora:")
#: Module types whose every nnx.Param is a normalisation's affine parameter.
NORM_TYPES: tuple[type, ...] = (nnx.LayerNorm, nnx.GroupNorm, nnx.BatchNorm, nnx.RMSNorm, layers.GroupNorm)
#: NFNet's equivalents (normalisation in the weights): module type -> its affine parameter names.
NORM_LIKE: dict[str, tuple[str, ...]] = {"WSConv2D": ("gain", "bias"), "NFBlock": ("skip_gain",)}


def choices_text() -> str:
    return "'all', 'head', 'norms_and_head', 'regex:<pattern>' or 'lora:<rank>'"


def parse(value: Any) -> tuple[str, Any]:
    """(form, argument) of a `train.trainable` value: ("all", None), ("regex", compiled), ("lora", r).
    UsageError naming the field and the value when it is not one of the forms."""
    if not isinstance(value, str):
        raise UsageError(f"{FIELD}={value!r}: must be a string, one of {choices_text()}")
    if value in SUBSETS:
        return value, None
    if value.startswith("regex:"):
        pattern = value[len("regex:"):]
        if not pattern:
            raise UsageError(f"{FIELD}={value!r}: the regex is empty")
        try:
            return "regex", re.compile(pattern)
        except re.error as e:
            raise UsageError(f"{FIELD}={value!r}: not a valid Python regex ({e})") from None
    if value.startswith("lora:"):
        rank = value[len("lora:"):]
        if not rank.isdigit() or int(rank) < 1:
            raise UsageError(f"{FIELD}={value!r}: the LoRA rank must be a positive integer, e.g. 'lora:4'")
        return "lora", int(rank)
    raise UsageError(f"{FIELD}={value!r}: unknown; use {choices_text()}")


def norm_paths(model: nnx.Module) -> set[tuple]:
    """Paths of the normalisation affine parameters of `model` (module doc)."""
    out: set[tuple] = set()
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Module):
            continue
        if isinstance(node, NORM_TYPES):
            names = [n for n, v in vars(node).items() if isinstance(v, nnx.Param)]
        else:
            names = [n for n in NORM_LIKE.get(type(node).__name__, ()) if isinstance(getattr(node, n, None), nnx.Param)]
        out.update(tuple(path) + (n,) for n in names)
    return out


def head_paths(paths: list[tuple], head: str) -> set[tuple]:
    """The paths under the head module `head` ("linear", "fc.out"). UsageError if none."""
    prefix = tuple(head.split(".")) if head else ()
    found = {p for p in paths if prefix and p[:len(prefix)] == prefix}
    if not found:
        raise UsageError(f"{FIELD}: the model declares no classification head with parameters (Variant.head="
                         f"{head!r}); use 'regex:<pattern>' instead")
    return found


def examples(paths: list[tuple], n: int = 6) -> str:
    return ", ".join(path_name(p) for p in paths[:n]) + (", ..." if len(paths) > n else "")


def partition(value: str, model: nnx.Module, params: nnx.State, head: str, seed: int = 0
              ) -> Partition | lora.Lora | None:
    """The partition of `params` (the model's nnx.Param State) that `value` trains; None for "all"
    (the unpartitioned step); a `dpft.nn.lora.Lora` (factors initialised from `seed`) for "lora:<r>"."""
    form, arg = parse(value)
    if form == "all":
        return None
    paths = param_paths(params)
    if form == "lora":
        try:
            return lora.Lora.create(value, arg, params, frozenset(head_paths(paths, head)), seed)
        except ValueError as e:
            raise UsageError(f"{FIELD}={value!r}: {e}") from None
    if form == "head":
        keep = head_paths(paths, head)
    elif form == "norms_and_head":
        keep = head_paths(paths, head) | (norm_paths(model) & set(paths))
    else:
        keep = {p for p in paths if arg.search(path_name(p))}
        if not keep:
            raise UsageError(f"{FIELD}={value!r}: the regex matches no parameter path of model "
                             f"{type(model).__name__}; paths look like {examples(paths)}")
    return Partition.of(value if form == "regex" else form, [p for p in paths if p not in keep])


__all__ = ["parse", "partition", "norm_paths", "NORM_TYPES", "NORM_LIKE", "FIELD"]
