"""Peer: jax-privacy's clipped-gradient step (`jax_privacy.clipped_grad`, PyPI jax-privacy 2.0.0) on the
same Flax model, batch and resolution as benchmarks.dp_overhead.

    .venv-bench/bin/python -m benchmarks.peers_jax_privacy [--models nfnet_tiny] [--batch 64]
        [--microbatch 16] [--iters 3] [--json out.json]

DP step: `clipped_grad(loss, l2_clip_norm=1, batch_argnums=1, microbatch_size=mb)` (sum of clipped
per-example gradients) + Gaussian noise N(0, C^2) + SGD on the mean. Non-private: `jax.grad` of the
summed loss + SGD. Needs the `bench` extras (separate venv); never imported by tests.
"""
from __future__ import annotations

import argparse

from benchmarks import common


def make_steps(setup: common.Setup, microbatch: int, lr: float = 0.1) -> dict:
    import jax
    import jax.numpy as jnp
    from jax_privacy import clipping

    batch_size = setup.batch["mask"].shape[0]
    strip = lambda b: {k: v for k, v in b.items() if k not in ("mask", "example_id")}

    def example_loss(params, views, key):
        # keep_batch_dim=True: views leaves are [1, K, ...] for one example.
        return setup.loss_fn(params, jax.tree.map(lambda x: x[0], views), key)[0]

    grad_fn = clipping.clipped_grad(example_loss, l2_clip_norm=1.0, batch_argnums=1, prng_argnum=2,
                                    microbatch_size=microbatch)

    def dp_step(params, batch, key):
        g = grad_fn(params, strip(batch), key)
        leaves, tdef = jax.tree.flatten(g)
        keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
        noisy = [(x + jax.random.normal(k, x.shape, x.dtype)) / batch_size for x, k in zip(leaves, keys)]
        return jax.tree.map(lambda p, u: p - lr * u, params, jax.tree.unflatten(tdef, noisy))

    def plain_step(params, batch, key):
        keys = jax.random.split(key, batch_size)
        total = lambda p: jnp.sum(jax.vmap(lambda v, k: setup.loss_fn(p, v, k)[0])(strip(batch), keys))
        return jax.tree.map(lambda p, u: p - lr * u / batch_size, params, jax.grad(total)(params))

    return {"nonprivate": jax.jit(plain_step), "dp": jax.jit(dp_step)}


def bench(name: str, batch: int, microbatch: int, iters: int) -> list[dict]:
    import importlib.metadata

    import jax
    setup = common.make_setup(name, batch)
    key = jax.random.key(1)
    args = (setup.params, setup.batch, key)
    fns = {}
    for k, step in make_steps(setup, microbatch).items():
        fns[k] = step.lower(*args).compile()
        jax.block_until_ready(fns[k](*args))
    times = common.time_round_robin(fns, args, iters)
    version = importlib.metadata.version("jax-privacy")
    return common.peer_rows("jax_privacy.clipped_grad", f"jax-privacy {version}", setup, microbatch, times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["nfnet_tiny"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--microbatch", type=int, default=16)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = [r for m in args.models for r in bench(m, args.batch, args.microbatch, args.iters)]
    return common.emit_rows(rows, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
