"""DP overhead on small conv nets: examples/s of the DP step vs the non-private step (CPU).

  python -m benchmarks.small_convnet [--models small_convnet,gn_convnet] [--batch-size 64]
         [--microbatch-sizes 8,16,32,64] [--augmult 1] [--repeats 10] [--grad-method vmap]
         [--memory] [--json out.json]

DP step:          clipped_grad_sum(mode="flat") + privatize(sigma=1), by --grad-method
                  ("vmap": per-example grads; "bookkeeping": dpft.privacy.bookkeeping)
non-private step: clipped_grad_sum(mode="none") + privatize(sigma=0)   (one backward of the sum)
plain step:       jax.grad of the batch's mean loss, no microbatch loop, no privatize (the
                  fastest non-private step); the ratio divides by the faster of the two.
--memory adds the compiled working set (XLA memory_analysis: temp + output bytes) of each step.
Both jitted and timed after a warm-up call (compilation excluded), interleaved round-robin so
that load from other processes hits both alike; median of `repeats` runs. The optimizer
update is left out (identical in both). Add models to MODELS. (`benchmarks.dp_overhead` is the
NFNet-scale benchmark; this one needs nothing but dpft.privacy.)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpft.privacy import adapters, bookkeeping, engine, keys, noise
NOISE_BASE = keys.noise_base_key(keys.RunSecret.generate())  # a fresh secret, as a run draws
from dpft.testing.models import GroupNormConvNet, SmallConvNet

# name -> (make_model(seed) -> nnx.Module, image shape (H, W, C), num_classes)
MODELS: dict[str, tuple[Callable[[int], nnx.Module], tuple[int, int, int], int]] = {
    "small_convnet": (lambda seed: SmallConvNet(3, 10, channels=(16, 32), seed=seed), (32, 32, 3), 10),
    "tiny_convnet": (lambda seed: SmallConvNet(1, 10, channels=(4, 8), seed=seed), (16, 16, 1), 10),
    "gn_convnet": (lambda seed: GroupNormConvNet(3, 10, seed=seed), (32, 32, 3), 10),
}
GRAD_METHODS = {"vmap": engine.clipped_grad_sum, "bookkeeping": bookkeeping.bk_clipped_grad_sum}


def make_batch(batch_size: int, augmult: int, image_shape: tuple[int, int, int], num_classes: int,
               seed: int = 0) -> dict[str, jax.Array]:
    """A random training batch in the engine's format (docs/interfaces.md), no padding."""
    rs = np.random.RandomState(seed)
    labels = rs.randint(0, num_classes, (batch_size, 1))
    return {"image": jnp.asarray(rs.randn(batch_size, augmult, *image_shape), jnp.float32),
            "label": jnp.asarray(np.repeat(labels, augmult, axis=1), jnp.int32),
            "mask": jnp.ones((batch_size,), jnp.float32),
            "example_id": jnp.arange(batch_size, dtype=jnp.int32)}


def make_plain_step(loss_fn):
    """Jitted step(params, batch, update_index) -> mean gradient: jax.grad of the batch's mean
    loss (the per-example loss vmapped), no microbatch loop."""
    @jax.jit
    def step(params, batch, update_index):
        rng = jax.random.fold_in(jax.random.key(1), update_index)
        views = {k: v for k, v in batch.items() if k not in ("mask", "example_id")}

        def mean_loss(p):
            keys_ = jax.random.split(rng, batch["mask"].shape[0])
            return jnp.mean(jax.vmap(lambda v, k: loss_fn(p, v, k)[0])(views, keys_))
        return jax.grad(mean_loss)(params)

    return step


def make_step(loss_fn, mode: str, microbatch_size: int, batch_size: int, grad_method: str = "vmap"):
    """Jitted step(params, batch, update_index) -> noisy mean gradient."""
    clipping = engine.ClippingConfig(mode, clip_norm=1.0)
    sigma = 0.0 if mode == "none" else 1.0
    clipped_grad_sum = GRAD_METHODS[grad_method] if mode != "none" else engine.clipped_grad_sum

    @jax.jit
    def step(params, batch, update_index):
        rng = jax.random.fold_in(jax.random.key(1), update_index)
        grad_sum, _ = clipped_grad_sum(loss_fn, params, batch, rng, clipping=clipping,
                                       microbatch_size=microbatch_size)
        return noise.privatize(grad_sum, noise.noise_key(NOISE_BASE, update_index), noise_multiplier=sigma, clip_norm=1.0,
                               expected_batch_size=float(batch_size))

    return step


def time_steps(steps: dict[str, Callable], params, batch, repeats: int) -> dict[str, tuple[float, float]]:
    """{label: (compile + first run seconds, median seconds per step)}, steps run interleaved."""
    first, times = {}, {label: [] for label in steps}
    for label, step in steps.items():
        t0 = time.perf_counter()
        jax.block_until_ready(step(params, batch, 0))
        first[label] = time.perf_counter() - t0
    for i in range(repeats):
        for label, step in steps.items():
            t0 = time.perf_counter()
            jax.block_until_ready(step(params, batch, i + 1))
            times[label].append(time.perf_counter() - t0)
    return {label: (first[label], statistics.median(times[label])) for label in steps}


def working_set_mib(step: Callable, params, batch) -> float:
    """Compiled working set of ``step`` in MiB: XLA's temp + output bytes (memory_analysis)."""
    mem = step.lower(params, batch, 0).compile().memory_analysis()
    return (mem.temp_size_in_bytes + mem.output_size_in_bytes) / 2**20


def run_benchmark(models: list[str], batch_size: int, microbatch_sizes: list[int], augmult: int,
                  repeats: int, grad_method: str = "vmap", memory: bool = False) -> list[dict]:
    rows = []
    for name in models:
        make_model, image_shape, num_classes = MODELS[name]
        loss_fn, params, _ = adapters.nnx_loss_fn(make_model(0), adapters.softmax_cross_entropy_loss)
        batch = make_batch(batch_size, augmult, image_shape, num_classes)
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
        for mb in microbatch_sizes:
            row = {"model": name, "params": n_params, "batch_size": batch_size, "microbatch_size": mb,
                   "augmult": augmult, "repeats": repeats, "grad_method": grad_method}
            steps = {"dp": make_step(loss_fn, "flat", mb, batch_size, grad_method),
                     "nonprivate": make_step(loss_fn, "none", mb, batch_size),
                     "plain": make_plain_step(loss_fn)}
            for label, (compile_s, step_s) in time_steps(steps, params, batch, repeats).items():
                row[f"{label}_compile_s"] = compile_s
                row[f"{label}_step_s"] = step_s
                row[f"{label}_examples_per_s"] = batch_size / step_s
                if memory:
                    row[f"{label}_working_set_mib"] = working_set_mib(steps[label], params, batch)
            best = max(row["nonprivate_examples_per_s"], row["plain_examples_per_s"])
            row["ratio_dp_over_nonprivate"] = row["dp_examples_per_s"] / best
            rows.append(row)
            print_row(row)
    return rows


HEADER = (f"{'model':<14} {'method':<11} {'B':>4} {'mb':>4} {'K':>2} {'DP ex/s':>10} {'non-DP ex/s':>12} "
          f"{'plain ex/s':>11} {'DP/best':>8} {'DP MiB':>8} {'plain MiB':>9}")


def print_row(row: dict) -> None:
    mem = (f"{row['dp_working_set_mib']:>8.1f} {row['plain_working_set_mib']:>9.1f}"
           if "dp_working_set_mib" in row else f"{'-':>8} {'-':>9}")
    print(f"{row['model']:<14} {row['grad_method']:<11} {row['batch_size']:>4} {row['microbatch_size']:>4} "
          f"{row['augmult']:>2} {row['dp_examples_per_s']:>10.1f} {row['nonprivate_examples_per_s']:>12.1f} "
          f"{row['plain_examples_per_s']:>11.1f} {row['ratio_dp_over_nonprivate']:>8.3f} {mem}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.small_convnet", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="small_convnet", help=f"comma-separated, from {sorted(MODELS)}")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--microbatch-sizes", default="8,16,32,64")
    parser.add_argument("--augmult", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--grad-method", default="vmap", help="DP engine(s), comma-separated: vmap,bookkeeping")
    parser.add_argument("--memory", action="store_true", help="also report the compiled working set per step")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    microbatch_sizes = [int(x) for x in args.microbatch_sizes.split(",") if x]
    bad = [m for m in microbatch_sizes if m < 1 or args.batch_size % m]
    methods = [m for m in args.grad_method.split(",") if m]
    unknown += [m for m in methods if m not in GRAD_METHODS]
    if unknown or bad or args.repeats < 1 or args.augmult < 1:
        print(f"small_convnet: error: unknown models {unknown} / microbatch sizes {bad} not dividing "
              f"--batch-size {args.batch_size} / --repeats, --augmult must be >= 1", file=sys.stderr)
        return 2
    env = {"jax": jax.__version__, "backend": jax.default_backend(), "device": str(jax.devices()[0]),
           "cpu_count": os.cpu_count(), "python": platform.python_version(),
           "load_avg_1min": round(os.getloadavg()[0], 2)}
    print(f"# {env}\n# ratio = DP examples/s / non-private examples/s (1.0 = no overhead)")
    print(HEADER)
    rows = [r for method in methods for r in run_benchmark(models, args.batch_size, microbatch_sizes, args.augmult,
                                                           args.repeats, method, args.memory)]
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"env": env, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
