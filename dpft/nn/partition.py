"""Which parameters a run trains: a `Partition` of a params tree into a trainable and a frozen part.

A partition is data: the set of frozen parameter paths (plain-key tuples, `dpft.nn.taps.param_path`,
e.g. ('blocks', 0, 'conv1', 'w')). `split(params) -> (trainable, frozen)` and `combine(trainable,
frozen) -> params` are pure and exact (no arithmetic: the leaves are moved, never copied or cast), so
a frozen leaf that goes through split/combine is bit-identical. Only the trainable part goes through
the privacy engine, the noise, the optimizer and the EMA (`dpft.train.step`); the book-keeping
engine neither taps nor norms an op whose parameters are frozen (`dpft.nn.taps.Recorder.frozen`).
Which paths are frozen is decided from the model by `dpft.models.trainable`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable

import jax
from flax import nnx

from dpft.nn import taps

PyTree = Any


def param_paths(params: PyTree) -> list[tuple]:
    """The plain-key path of every leaf of a params tree, in leaf order."""
    return [taps.param_path(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(params)]


def path_name(path: tuple) -> str:
    """'blocks/0/conv1/w' for ('blocks', 0, 'conv1', 'w')."""
    return "/".join(map(str, path))


def count(params: PyTree) -> int:
    """Number of scalars in a params tree."""
    return int(sum(math.prod(getattr(x, "shape", ())) for x in jax.tree.leaves(params)))


@dataclasses.dataclass(frozen=True)
class Partition:
    """The frozen parameter paths of a run (`frozen`), and a one-word description (`name`, e.g. "head")."""

    name: str
    frozen: frozenset

    @classmethod
    def of(cls, name: str, frozen: Iterable[tuple]) -> "Partition":
        return cls(name, frozenset(tuple(p) for p in frozen))

    def _is_trainable(self, path: tuple, _value: Any = None) -> bool:
        return tuple(path) not in self.frozen

    def split(self, params: nnx.State) -> tuple[nnx.State, nnx.State]:
        """(trainable, frozen): two States with the leaves of `params` (same paths, nothing copied)."""
        trainable, frozen = nnx.split_state(params, self._is_trainable, ...)
        return trainable, frozen

    def trainable(self, params: nnx.State) -> nnx.State:
        """The trainable part of `params`."""
        return self.split(params)[0]

    @staticmethod
    def combine(trainable: nnx.State, frozen: nnx.State) -> nnx.State:
        """The whole params State again (inverse of `split`)."""
        return nnx.merge_state(trainable, frozen)

    # The protocol of `dpft.train.step` (shared with `dpft.nn.lora.Lora`): what the compiled step reads
    # from the train state, how it splits, and what an update writes back.
    def init_items(self, params: nnx.State) -> dict:
        """Extra train-state items besides "params" (none: the frozen leaves stay in "params")."""
        return {}

    def step_input(self, state: dict) -> nnx.State:
        """What `accumulate` receives from the train state: the whole params State."""
        return state["params"]

    def split_input(self, x: nnx.State) -> tuple[nnx.State, nnx.State]:
        """(trainable, frozen) of `step_input`."""
        return self.split(x)

    def updated(self, state: dict, trainable: nnx.State) -> dict:
        """The state items an update writes: "params" with its trainable leaves replaced."""
        return {"params": self.combine(trainable, self.split(state["params"])[1])}

    @property
    def averaged(self) -> "Partition":
        """The leaves of "params" the EMA and Polyak average update (the others are passed through)."""
        return self


__all__ = ["Partition", "param_paths", "path_name", "count"]
