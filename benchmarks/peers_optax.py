"""Peer: optax's contrib DP aggregator (`optax.contrib.differentially_private_aggregate`) on the
same Flax model, batch and resolution as benchmarks.dp_overhead.

    python -m benchmarks.peers_optax [--models nfnet_tiny] [--batch 64] [--iters 3] [--json out.json]

The aggregator takes per-example gradients [B, ...] (computed here with one `vmap(grad)` over the
whole batch: no microbatching, optax has none), clips each to C=1, sums, adds N(0, sigma^2 C^2) and
divides by B. Non-private reference: one `jax.grad` of the mean loss + SGD. Both jitted.
"""
from __future__ import annotations

import argparse

from benchmarks import common


def make_steps(setup: common.Setup, lr: float = 0.1) -> dict:
    """{"nonprivate": step, "dp": step}, each jitted `step(params, opt_state, batch, key) -> (params, state)`."""
    import jax
    import jax.numpy as jnp
    import optax
    from optax import contrib

    views = lambda b: {k: v for k, v in b.items() if k not in ("mask", "example_id")}
    dp_tx = optax.chain(contrib.differentially_private_aggregate(1.0, 1.0, key=jax.random.key(0)), optax.sgd(lr))
    sgd = optax.sgd(lr)

    def dp_step(params, state, batch, key):
        keys = jax.random.split(key, batch["mask"].shape[0])
        grads = jax.vmap(jax.grad(lambda p, v, k: setup.loss_fn(p, v, k)[0]), in_axes=(None, 0, 0))(
            params, views(batch), keys)
        updates, state = dp_tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    def plain_step(params, state, batch, key):
        keys = jax.random.split(key, batch["mask"].shape[0])
        mean_loss = lambda p: jnp.mean(jax.vmap(lambda v, k: setup.loss_fn(p, v, k)[0])(views(batch), keys))
        updates, state = sgd.update(jax.grad(mean_loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    return {"nonprivate": (jax.jit(plain_step), sgd.init(setup.params)),
            "dp": (jax.jit(dp_step), dp_tx.init(setup.params))}


def bench(name: str, batch: int, iters: int) -> list[dict]:
    import jax
    import optax
    setup = common.make_setup(name, batch)
    key = jax.random.key(1)
    fns = {}
    for k, (step, state) in make_steps(setup).items():
        compiled = step.lower(setup.params, state, setup.batch, key).compile()
        fns[k] = (lambda c, s: (lambda p, b, kk: c(p, s, b, kk)))(compiled, state)
        jax.block_until_ready(fns[k](setup.params, setup.batch, key))
    times = common.time_round_robin(fns, (setup.params, setup.batch, key), iters)
    return common.peer_rows("optax.contrib.differentially_private_aggregate", f"optax {optax.__version__}",
                            setup, batch, times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["nfnet_tiny"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = [r for m in args.models for r in bench(m, args.batch, args.iters)]
    return common.emit_rows(rows, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
