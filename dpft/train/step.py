"""The DP-SGD update, data-parallel over a device mesh with `jax.shard_map`.

One optimizer update is
  1. `accumulate` once per physical batch (fixed shape, padded): on each device,
     the clipped per-example gradient sum of its shard of the batch is added to that
     device's own partial sum (no communication);
  2. `apply` once per update: the per-device partial sums are `psum`med over the
     "data" axis (all devices of all hosts), then the plan's `noisy_mean`
     (`dpft.privacy.noise.privatize`) adds N(0, sigma^2 S^2) ONCE, from
     `noise_key(secret base key, update)` -- the base key is an argument (never compiled in),
     replicated, so every device draws the same noise and applies the same update -- and
     divides by the expected batch size. Then the optax update and the EMA.
     BandMF (`plan.correlated`): the plan's `noisy_mean_correlated` instead, which reads and returns
     the noise state `state["noise_state"]` (the last b-1 correlated noise vectors, float32 leaves
     [b-1, *param.shape], replicated like the params; private: kept only in checkpoints).

With a `dpft.nn.partition.Partition` (`config.train.trainable`), `state["params"]` stays the whole
model (what checkpoints, evaluation and export read) but only its trainable part is differentiated,
clipped, summed, noised, given to the optimizer and averaged (EMA, Polyak); the frozen leaves are
passed through untouched (bit-identical), in the params and in the averages. Without one (None,
"all"), every function below is the code it was before partitions existed.

Every privacy decision (engine, clipping, sigma, sensitivity, B) comes from the run's
`dpft.privacy.plan.PrivacyPlan`. A non-private plan runs the same functions as ordinary SGD,
so the DP overhead is measured on identical code.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dpft.nn.partition import Partition
from dpft.privacy import adapters
from dpft.privacy.plan import PrivacyPlan
from dpft.train import ema as ema_lib
from dpft.distributed import DATA_AXIS, together

PyTree = Any


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static description of one update: the privacy plan plus the non-private knobs."""

    plan: PrivacyPlan
    microbatch_size: int  # examples per chunk of the per-example computation on one device
    ema_decay: float = 0.0  # 0 = no EMA
    polyak: bool = False
    #: None: every parameter is trained ("all"); a `Partition` or a `dpft.nn.lora.Lora` (same protocol).
    partition: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.plan, PrivacyPlan):
            raise TypeError("StepConfig.plan must be a dpft.privacy.plan.PrivacyPlan")
        if int(self.microbatch_size) < 1:
            raise ValueError(f"StepConfig.microbatch_size={self.microbatch_size!r} must be >= 1")


#: The train state's item of BandMF's noise state (present iff the plan is `correlated`).
NOISE_STATE = "noise_state"


def step_input(state: dict, cfg: StepConfig) -> PyTree:
    """What `accumulate` receives from the train state: its params (with LoRA also its factors)."""
    return state["params"] if cfg.partition is None else cfg.partition.step_input(state)


def trainable_part(state: dict, cfg: StepConfig) -> PyTree:
    """The trained tree of a train state (its params without a partition): what is clipped, noised and
    given to the optimizer; the accumulator has its structure."""
    if cfg.partition is None:
        return state["params"]
    return cfg.partition.split_input(cfg.partition.step_input(state))[0]


def trained_tree(params: PyTree, partition: Any) -> PyTree:
    """The trained tree of a fresh run with `params` and `partition` (None: params)."""
    if partition is None:
        return params
    return partition.split_input(partition.step_input({"params": params, **partition.init_items(params)}))[0]


def _through_averaged(fn: Callable, cfg: StepConfig, *trees: PyTree) -> PyTree:
    """`fn(*averaged parts)` combined with the other leaves of the first tree (untouched); `fn(*trees)`
    without a partition."""
    if cfg.partition is None:
        return fn(*trees)
    parts = [cfg.partition.averaged.split(t) for t in trees]
    return Partition.combine(fn(*(t for t, _ in parts)), parts[0][1])


def init_state(params: PyTree, optimizer: optax.GradientTransformation, cfg: StepConfig) -> dict:
    """The train state: params, opt_state (of the trained tree), EMA (float32), Polyak average, update
    index, a partition's own items (LoRA: "lora"), and with BandMF (b > 1) the noise state of the trained
    tree (`plan.init_noise_state`, zeros)."""
    extra = {} if cfg.partition is None else cfg.partition.init_items(params)
    state = {
        "params": params,
        **extra,
        "opt_state": optimizer.init(trainable_part({"params": params, **extra}, cfg)),
        "update": jnp.zeros((), jnp.int32),
    }
    state["ema"] = ema_lib.ema_init(params) if cfg.ema_decay > 0 else {}
    state["polyak"] = ema_lib.polyak_init(params) if cfg.polyak else {}
    if cfg.plan.correlated:
        state[NOISE_STATE] = cfg.plan.init_noise_state(trainable_part(state, cfg))
    # Own buffer per leaf: the EMA of float32 params may alias them, and apply() donates state.
    return jax.tree.map(lambda x: jnp.array(x, copy=True), state)


def zeros_accumulator(params: PyTree, mesh: Mesh) -> PyTree:
    """Per-device partial gradient sums: leaves float32 [D, *param.shape], sharded over D. One
    compiled program per (parameter structure, mesh), not one zeros-and-transfer per leaf and update."""
    d = mesh.shape[DATA_AXIS]
    leaves, treedef = jax.tree.flatten(params)
    return _zeros_fn(treedef, tuple((d,) + tuple(p.shape) for p in leaves), NamedSharding(mesh, P(DATA_AXIS)))()


@functools.lru_cache(maxsize=16)
def _zeros_fn(treedef: Any, shapes: tuple[tuple[int, ...], ...], sharding: NamedSharding) -> Callable[[], PyTree]:
    """A jitted `() -> pytree of float32 zeros of `shapes`, placed with `sharding`` (memoised per arguments)."""
    return jax.jit(lambda: jax.tree.unflatten(treedef, [jnp.zeros(s, jnp.float32) for s in shapes]),
                   out_shardings=sharding)


def make_accumulate_fn(loss_fn: Callable, cfg: StepConfig, mesh: Mesh) -> Callable:
    """Returns jitted `accumulate(params, acc, batch, key) -> (acc, stats)`.

    params: replicated `step_input(state)` (the whole model); acc: per-device sums [D, ...] of the
    trained tree (`trainable_part`; donated); batch: the
    training-batch dict sharded over its leading axis; key: replicated key.
    stats: dict of [B_global] arrays (norms, loss, mask, aux), sharded like the batch.
    """

    plan = cfg.plan

    def per_device(params, acc, batch, key):
        # Each example's key is fold_in(key, its example_id) (engine.example_key_ids): the same on
        # any device layout, so no device index is folded in here.
        loss = loss_fn
        if cfg.partition is not None:  # the engine sees the trainable part only
            params, frozen = cfg.partition.split_input(params)
            loss = adapters.restrict_loss(loss_fn, frozen, cfg.partition.combine, cfg.partition.frozen)
        grad_sum, stats = plan.clipped_sum(loss, params, batch, key, microbatch_size=cfg.microbatch_size)
        acc = jax.tree.map(lambda a, g: a + g[None].astype(jnp.float32), acc, grad_sum)
        return acc, stats

    sharded = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(P(), P(DATA_AXIS), P(DATA_AXIS), P()),
        out_specs=(P(DATA_AXIS), P(DATA_AXIS)),
    )
    return jax.jit(sharded, donate_argnums=(1,))


def global_sum(acc: PyTree, mesh: Mesh) -> PyTree:
    """psum of the per-device partial sums over all devices of all hosts -> replicated."""
    return jax.shard_map(
        lambda a: jax.tree.map(lambda x: jax.lax.psum(x[0], DATA_AXIS), a),
        mesh=mesh,
        in_specs=P(DATA_AXIS),
        out_specs=P(),
    )(acc)


def make_apply_fn(
    optimizer: optax.GradientTransformation,
    cfg: StepConfig,
    mesh: Mesh,
) -> Callable:
    """Returns jitted `apply(state, acc, noise_base_key) -> (state, info)`: psum, noise once,
    optax, EMA. `noise_base_key` is `plan.noise_base_key()` (the run's secret stream).

    info: {"grad_norm": norm of the noisy mean gradient, "update": the index used}.
    sigma and the secret key enter the compiled program as arguments (not constants): runs that
    differ only in epsilon share one compilation, and no secret lands in a compilation cache.
    """
    plan = cfg.plan

    def apply(state, acc, noise_base_key, noise_multiplier):
        total = global_sum(acc, mesh)
        update = state["update"]
        trained = trainable_part(state, cfg)  # the noise has the trained tree's coordinates only
        extra = {}
        if plan.correlated:  # BandMF: the noise of this update depends on the last b-1 (the noise state)
            grad, extra[NOISE_STATE] = plan.noisy_mean_correlated(total, noise_base_key, update, state[NOISE_STATE],
                                                                  noise_multiplier)
        else:
            grad = plan.noisy_mean(total, noise_base_key, update, noise_multiplier)
        grad = jax.tree.map(lambda g, p: g.astype(p.dtype), grad, trained)
        updates, opt_state = optimizer.update(grad, state["opt_state"], trained)
        trained = optax.apply_updates(trained, updates)
        new = dict(state, opt_state=opt_state, update=update + 1, **extra)
        new.update({"params": trained} if cfg.partition is None else cfg.partition.updated(state, trained))
        params = new["params"]
        if cfg.ema_decay > 0:
            new["ema"] = _through_averaged(lambda e, p: ema_lib.ema_update(e, p, cfg.ema_decay, update), cfg,
                                           state["ema"], params)
        if cfg.polyak:
            new["polyak"] = _through_averaged(lambda a, p: ema_lib.polyak_update(a, p, update), cfg,
                                              state["polyak"], params)
        info = {"grad_norm": optax.global_norm(grad), "update": update}
        return new, info

    # The psum is a cross-process collective: its first run waits for every process (distributed.together).
    compiled = together(jax.jit(apply, donate_argnums=(0,)), "apply")
    if not plan.enabled:
        return together(jax.jit(lambda state, acc, key: apply(state, acc, key, 0.0), donate_argnums=(0,)), "apply")
    sigma = jnp.asarray(plan.noise_multiplier, jnp.float32)
    return lambda state, acc, key: compiled(state, acc, key, sigma)
