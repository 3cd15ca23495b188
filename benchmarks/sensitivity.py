"""Measured sensitivity of the clipped sum per engine, ghost route and compute dtype.

For a batch of B nearly identical examples (aligned gradients, the worst case for rounding),
prints max_i ||S - S_{-i}|| / C over removed examples i, where S is the clipped gradient sum and
S_{-i} the same batch with example i as padding. The accountant assumes <= 1.

    python -m benchmarks.sensitivity [--model nfnet_micro] [--batch 64] [--resolution 16] [--out DIR]

On a GPU with bfloat16 compute the book-keeping engine takes its "native" route (bfloat16
operands, float32 accumulation, `dpft.privacy.bk_layers.native_operands`), which CPU tests reach
only when forced: this script measures the route a GPU user actually gets.
"""
from __future__ import annotations

import argparse
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np


def measure(model_name: str, batch_size: int, clip_norm: float, indices: list[int], resolution: int = 16,
            matmul: str = "auto") -> list[dict]:
    from dpft import models
    from dpft.privacy import adapters, bookkeeping, engine
    from dpft.privacy.sensitivity import aligned_batch, removal_distances

    rows = []
    rng = np.random.default_rng(0)
    base = {"image": rng.standard_normal([1, resolution, resolution, 3]).astype(np.float32), "label": np.zeros([1], np.int32)}
    batch = aligned_batch(base, batch_size)
    for dtype_name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        model = models.create(model_name, 10, seed=0, dtype=dtype)
        loss_fn, params, _ = adapters.nnx_loss_fn(model, adapters.softmax_cross_entropy_loss)
        clipping = engine.ClippingConfig(mode="flat", clip_norm=clip_norm)
        variants = {"vmap": functools.partial(engine.clipped_grad_sum, loss_fn)}
        for ghost in bookkeeping.GHOST_CHOICES:
            variants[f"bookkeeping/ghost={ghost}"] = functools.partial(bookkeeping.bk_clipped_grad_sum, loss_fn,
                                                                       ghost=ghost, matmul=matmul)
        for name, fn in variants.items():
            jitted = jax.jit(lambda b, fn=fn: fn(params, b, jax.random.key(0), clipping=clipping,
                                                 microbatch_size=batch_size)[0])
            d = removal_distances(jitted, batch, indices)
            rows.append({"model": model_name, "backend": jax.default_backend(), "resolution": resolution,
                         "dtype": dtype_name, "engine": name, "matmul": matmul, "batch": batch_size,
                         "clip_norm": clip_norm, "max_ratio": float(d.max() / clip_norm),
                         "ratios": (d / clip_norm).round(6).tolist()})
            print(f"{dtype_name:9s} {name:28s} max ||S - S_-i|| / C = {d.max() / clip_norm:.8f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="nfnet_micro")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--clip-norm", type=float, default=0.01)
    parser.add_argument("--matmul", default="auto", choices=("auto", "native", "float32"),
                        help="book-keeping contraction operands (bk_layers.native_operands)")
    parser.add_argument("--resolution", type=int, default=16, help="image side in px (vit_micro: 32)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    idx = sorted({0, 1, args.batch // 2, args.batch - 1})
    rows = measure(args.model, args.batch, args.clip_norm, idx, args.resolution, args.matmul)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "sensitivity.json"), "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
