"""How the microbatch loop affects `clipped_grad_sum` alone (jitted), on one model.

    python -m benchmarks.engine_loops [--model nfnet_tiny] [--batch 64] [--json out.json]

Rows: non-private (mode "none") and DP (mode "flat") at several microbatch sizes, with the
engine's `lax.scan` over microbatches, and with the scan fully unrolled. Median of 5 calls
after compilation. See benchmarks/README.md ("Follow-up measurement").
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from benchmarks import common


def measure(loss_fn, params, batch, mode: str, microbatch: int, unroll: bool, iters: int = 5) -> dict:
    from dpft.privacy import engine

    original = jax.lax.scan
    if unroll:  # the same program with the microbatch loop unrolled by XLA
        jax.lax.scan = lambda f, init, xs: original(f, init, xs, unroll=True)
    try:
        clipping = engine.ClippingConfig(mode=mode, clip_norm=1.0)
        fn = jax.jit(lambda p, b, k: engine.clipped_grad_sum(loss_fn, p, b, k, clipping=clipping,
                                                             microbatch_size=microbatch)[0])
        t0 = time.perf_counter()
        jax.block_until_ready(fn(params, batch, jax.random.key(0)))
        compile_s = time.perf_counter() - t0
        times = []
        for i in range(iters):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(params, batch, jax.random.key(i + 1)))
            times.append(time.perf_counter() - t0)
    finally:
        jax.lax.scan = original
    batch_size = batch["mask"].shape[0]
    step = float(np.median(times))
    loop = "no loop" if batch_size == microbatch else (f"unrolled x{batch_size // microbatch}" if unroll
                                                      else f"scan x{batch_size // microbatch}")
    return {"mode": mode, "batch": batch_size, "microbatch": microbatch, "loop": loop,
            "step_s": step, "examples_per_s": batch_size / step, "compile_s": compile_s}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="nfnet_tiny")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    setup = common.make_setup(args.model, args.batch)
    configs = [("none", args.batch, False), ("none", 16, False), ("flat", 16, False), ("flat", 8, False),
               ("flat", 16, True), ("flat", args.batch, False)]
    rows = [measure(setup.loss_fn, setup.params, setup.batch, *c) for c in configs]
    print(common.markdown_table(rows, ["mode", "batch", "microbatch", "loop", "examples_per_s", "step_s",
                                       "compile_s"]))
    return common.emit_rows(rows, args.json, echo=False)


if __name__ == "__main__":
    raise SystemExit(main())
