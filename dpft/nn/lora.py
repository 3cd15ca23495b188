"""LoRA (`config.train.trainable="lora:<r>"`): low-rank updates of the dense and conv kernels.

Each adapted kernel W0 (a leaf named "kernel" or "w" with >= 2 axes, outside the head), seen as the
matrix [prod(shape[:-1]), shape[-1]] (a conv's HWIO kernel as [k*k*in/groups, out]), is used as
  W = W0 + SCALE * (A @ B).reshape(W0.shape),  A [n_in, r] ~ N(0, 1/n_in),  B [r, out] = 0,
with SCALE = alpha / r and alpha = r (so SCALE = 1): at initialisation W == W0 exactly (the forward is
the pre-trained model's, bit for bit). The trained tree is {"head": the head's parameters (fully
trained, as with "head"), "factors": {'.'-joined kernel path: {"a", "b"}}}; W0 and every other
parameter are frozen. The factors' key is a public stream (`init_key(seed)`), apart from every other.

The train state keeps "params" = the MERGED model (W0 + SCALE A B folded in, recomputed after each
update), which is what checkpoints' params/EMA items, evaluation, export and the Predictor read: they
need not know that LoRA trained it. The item "lora" = {"base": the W0 kernels, "factors": A, B} is
kept for resuming (bitwise: the merge is recomputed from it). The EMA / Polyak averages average the
merged head and adapted kernels (the LoRA delta), the other leaves are passed through.
The factors are no parameters of a tapped layer: the book-keeping engine cannot norm them (refused by
`dpft.config.validation`; "auto" picks vmap).

`Lora` follows the step protocol of `dpft.nn.partition.Partition` (`dpft.train.step`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dpft.nn import taps
from dpft.nn.partition import Partition, param_paths

PyTree = Any
KERNEL_NAMES = ("kernel", "w")
SCALE = 1.0  # alpha / r, alpha = r
INIT_DOMAIN = 0x10_7A_0F  # fold_in tag of the LoRA factors' public init stream (not dropout's 0xD00A17)


def init_key(seed: int) -> jax.Array:
    """The public key of the factors' initialisation."""
    return jax.random.fold_in(jax.random.key(int(seed)), INIT_DOMAIN)


def adapted_paths(params: nnx.State, head: frozenset) -> list[tuple]:
    """The kernels LoRA adapts: leaves named "kernel"/"w" with >= 2 axes, not in `head`."""
    return [p for p, x in zip(param_paths(params), jax.tree.leaves(params))
            if p[-1] in KERNEL_NAMES and jnp.ndim(x) >= 2 and p not in head]


def factor_key(path: tuple) -> str:
    """'blocks.0.conv1.w': the factors' key of a kernel path (no '/', which checkpoints use as separator)."""
    return ".".join(map(str, path))


def delta(a: jax.Array, b: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """SCALE * A @ B as a kernel of `shape`, float32 (full precision: no TF32 on a GPU)."""
    return (SCALE * jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32), precision="highest")).reshape(shape)


@dataclasses.dataclass(frozen=True)
class Lora:
    """LoRA of rank `rank` on `kernels` (paths), the head (`head` paths) fully trained (module doc)."""

    name: str
    rank: int
    head: frozenset
    kernels: tuple
    others: frozenset  # every other parameter path (frozen, not averaged)
    seed: int = 0

    @classmethod
    def create(cls, name: str, rank: int, params: nnx.State, head: frozenset, seed: int) -> "Lora":
        kernels = tuple(adapted_paths(params, frozenset(head)))
        if not kernels:
            raise ValueError(f"{name}: the model has no dense or conv kernel outside the head to adapt")
        others = frozenset(p for p in param_paths(params) if p not in head and p not in kernels)
        return cls(name, int(rank), frozenset(head), kernels, others, int(seed))

    @property
    def frozen(self) -> frozenset:
        """The frozen model paths (W0 and the others), for `dpft.privacy.adapters.restrict_loss`."""
        return self.others | frozenset(self.kernels)

    @property
    def averaged(self) -> Partition:
        """The merged leaves the EMA averages: the head and the adapted kernels."""
        return Partition.of(self.name, self.others)

    def init_items(self, params: nnx.State) -> dict:
        """{"lora": {"base": the W0 kernels (a State), "factors": {path: {"a" [n_in, r], "b" [r, out] = 0}}}}."""
        kernels = set(self.kernels)
        base, _ = nnx.split_state(params, lambda path, _v: tuple(path) in kernels, ...)
        flat = dict(zip(param_paths(base), jax.tree.leaves(base)))
        key = init_key(self.seed)
        factors = {}
        for i, path in enumerate(self.kernels):
            shape = flat[path].shape
            n_in, n_out = math.prod(shape[:-1]), shape[-1]
            a = jax.random.normal(jax.random.fold_in(key, i), (n_in, self.rank), jnp.float32) / math.sqrt(n_in)
            factors[factor_key(path)] = {"a": a, "b": jnp.zeros((self.rank, n_out), jnp.float32)}
        return {"lora": {"base": base, "factors": factors}}

    def step_input(self, state: dict) -> dict:
        return {"params": state["params"], "lora": state["lora"]}

    def split_input(self, x: dict) -> tuple[dict, dict]:
        """({"head", "factors"}, {"rest": the other params (merged kernels included, overwritten by
        `combine`), "base": W0})."""
        head, rest = nnx.split_state(x["params"], lambda path, _v: tuple(path) in self.head, ...)
        return {"head": head, "factors": x["lora"]["factors"]}, {"rest": rest, "base": x["lora"]["base"]}

    def combine(self, trained: dict, frozen: dict) -> nnx.State:
        """The merged model params: the head, the frozen leaves, and W0 + SCALE A B for each kernel."""
        params = nnx.merge_state(trained["head"], frozen["rest"])
        base = dict(zip(param_paths(frozen["base"]), jax.tree.leaves(frozen["base"])))
        factors = trained["factors"]

        def merged(kp: tuple, leaf: jax.Array) -> jax.Array:
            path = taps.param_path(kp)
            if path not in base:
                return leaf
            f = factors[factor_key(path)]
            w0 = base[path]
            return (w0.astype(jnp.float32) + delta(f["a"], f["b"], w0.shape)).astype(w0.dtype)

        return jax.tree_util.tree_map_with_path(merged, params)

    def updated(self, state: dict, trained: dict) -> dict:
        """"params" re-merged from the updated factors and head; "lora" with the new factors."""
        x = self.step_input(state)
        _, frozen = self.split_input(x)
        return {"params": self.combine(trained, frozen),
                "lora": {"base": x["lora"]["base"], "factors": trained["factors"]}}


__all__ = ["Lora", "adapted_paths", "init_key", "delta", "SCALE", "KERNEL_NAMES"]
