"""Compile and run time of the DP noise: one draw per parameter leaf vs one draw for all leaves.

`dpft.privacy.noise.standard_normals` draws the noise of every parameter in one call per key
stream and cuts it into the leaves; before 2026-12-07 it drew once per leaf, and XLA compiles a
threefry hash per call (the draw of each update is a few hundred hashes for a real model). Both
formulations are compiled side by side here, in this process, on the model's real leaf shapes
(`jax.jit(...).lower(...).compile()`: shapes only, no model is run).

    python -m benchmarks.noise_draw [--models nfnet_micro nfnet_tiny] [--iters 5] [--json OUT]

Rows: model, leaves, parameters, formulation ("per_leaf" | "one_draw"), compile_s, run_ms
(median of --iters calls after one warm-up).
"""
from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp

from benchmarks import common


def per_leaf(key: jax.Array, shapes: list[tuple[int, ...]]) -> list[jax.Array]:
    """The former draw: leaf i is the sum over streams s of N(split(key[s], n)[i]), divided by
    sqrt(NOISE_STREAMS) (`keys.NOISE_STREAMS` streams, 3 since issue 31; 2 when this was measured)."""
    splits = [jax.random.split(k, len(shapes)) for k in key]
    scale = 1.0 / math.sqrt(len(splits))
    return [scale * sum(jax.random.normal(ks[i], shape, jnp.float32) for ks in splits)
            for i, shape in enumerate(shapes)]


def leaf_shapes(model_name: str) -> list[tuple[int, ...]]:
    """Shapes of the model's trainable parameters, in `jax.tree.leaves` order (nothing allocated)."""
    from flax import nnx

    import dpft.models

    abstract = nnx.eval_shape(lambda: dpft.models.create(model_name, 10, seed=0))
    return [tuple(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))]


def measure(model_name: str, iters: int) -> list[dict]:
    from dpft.privacy import keys, noise

    shapes = leaf_shapes(model_name)
    base = keys.noise_base_key(keys.RunSecret.insecure_fixed(0))
    rows = []
    for name, draw in (("per_leaf", per_leaf), ("one_draw", noise.standard_normals)):
        fn = jax.jit(lambda b, u, draw=draw: draw(noise.noise_key(b, u), shapes))
        start = time.perf_counter()
        compiled = fn.lower(base, jnp.uint32(1)).compile()
        compile_s = time.perf_counter() - start
        times = common.time_fn(compiled, base, jnp.uint32(1), iters=iters)
        rows.append({"model": model_name, "leaves": len(shapes), "parameters": sum(math.prod(s) for s in shapes),
                     "formulation": name, "compile_s": round(compile_s, 3),
                     "run_ms": round(1e3 * times["median_s"], 3), "backend": jax.default_backend()})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["nfnet_micro", "nfnet_tiny"])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = [r for m in args.models for r in measure(m, args.iters)]
    return common.emit_rows(rows, args.json, machine=True)


if __name__ == "__main__":
    raise SystemExit(main())
