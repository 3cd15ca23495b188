"""DP overhead: dpft's non-private step vs its DP step, side by side, same model/batch/resolution.

    python -m benchmarks.dp_overhead [--models nfnet_tiny nfnet_f0] [--quick] [--json out.json]
        [--batch B --microbatches 4 8 16] [--resolution PX] [--memory-only]

One "step" = `engine.clipped_grad_sum` ("vmap": vmap of per-example grads) or
`bookkeeping.bk_clipped_grad_sum` ("bookkeeping": norms from layer taps) + `noise.privatize`
+ an SGD update, jitted. Non-private = ClippingConfig(mode="none") and sigma = 0: the same code
path (DESIGN.md invariant 6). "nonprivate_plain" = one `jax.grad` of the batch-mean loss on the model
applied to the whole batch (no microbatch loop, no per-example vmap): the fastest non-private step.
`time_ratio_vs_best_nonprivate` divides by the fastest non-private step of the model (plain or
engine, any microbatch size), never only by a scan-wrapped one. For each microbatch size: examples/s, XLA temp memory of the compiled
step (MiB; the working set a microbatch size must fit) and the process max-RSS growth (MiB).
"Largest microbatch that fits" is a GPU notion (device memory); on CPU the memory column is reported.
`working_set_mib` = XLA memory_analysis temp + output bytes of the compiled step. `--memory-only`
compiles every (microbatch, method) and reports only that (no step is run: NFNet-F0 on CPU).
"""
from __future__ import annotations

import argparse
import json
from typing import Any

from benchmarks import common

#: Per model: (physical batch, microbatch sizes, timed iterations), full and --quick.
PLANS = {
    "nfnet_tiny": {"full": (128, (8, 16, 32, 64, 128), 5), "quick": (64, (16, 64), 3)},
    "nfnet_f0": {"full": (16, (8, 16), 2), "quick": (4, (4,), 2)},
    "vit_ti16": {"full": (16, (4, 8, 16), 2), "quick": (4, (4,), 2)},
}
METHODS = ("nonprivate_plain", "nonprivate", "vmap", "bookkeeping")


def make_step(setup: common.Setup, method: str, microbatch_size: int, *, clip_norm: float = 1.0,
              noise_multiplier: float = 1.0, lr: float = 0.1):
    """Jitted `step(params, batch, key) -> (params, losses [B])` for one method."""
    import jax
    if method not in METHODS:
        raise ValueError(f"dp_overhead: unknown method {method!r}; choose from {METHODS}")
    if method == "nonprivate_plain":
        return make_plain_step(setup, lr=lr)
    plan = _plan(setup, method, clip_norm, noise_multiplier)
    noise_base = plan.noise_base_key()

    def step(params, batch, key):
        grad_sum, stats = plan.clipped_sum(setup.loss_fn, params, batch, key, microbatch_size=microbatch_size)
        noisy = plan.noisy_mean(grad_sum, noise_base, 0)
        return jax.tree.map(lambda p, g: p - lr * g, params, noisy), stats["loss"]

    return jax.jit(step)


def _plan(setup: common.Setup, method: str, clip_norm: float, noise_multiplier: float):
    """The production privacy plan of engine `method` ("nonprivate": no clipping, vmap engine), with
    a fresh secret as a run draws: its engine, clipping and noise step."""
    from dpft.privacy import engine, keys
    from dpft.privacy import plan as plan_lib
    private = method != "nonprivate"
    return plan_lib.fixed_plan(
        clipping=engine.ClippingConfig(mode="flat", clip_norm=clip_norm) if private else engine.ClippingConfig("none"),
        noise_multiplier=noise_multiplier, expected_batch_size=float(setup.batch["mask"].shape[0]),
        params=setup.params, secret=keys.RunSecret.generate(), grad_method=method if private else "vmap")


def make_accumulate_step(setup: common.Setup, method: str, microbatch_size: int, *, clip_norm: float = 1.0):
    """Jitted `accumulate(params, batch, key, acc) -> acc + this physical batch's gradient sum`
    (`acc` donated): what a run with gradient accumulation does per physical batch, the noise and
    the update coming once per logical batch. "nonprivate_plain": `jax.grad` of the summed loss on
    the whole batch; "nonprivate" and the DP methods: the production plan's `clipped_sum`, as in
    `make_step`."""
    import jax
    import jax.numpy as jnp
    if method == "nonprivate_plain":
        losses = _plain_losses(setup)

        def grad_sum(params, batch, key):
            return jax.grad(lambda p: jnp.sum(losses(p, batch, key)))(params)
    elif method in ("nonprivate", "vmap", "bookkeeping"):
        plan = _plan(setup, method, clip_norm, 1.0)

        def grad_sum(params, batch, key):
            return plan.clipped_sum(setup.loss_fn, params, batch, key, microbatch_size=microbatch_size)[0]
    else:
        raise ValueError(f"dp_overhead: no accumulate step for method {method!r}")

    def accumulate(params, batch, key, acc):
        return jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grad_sum(params, batch, key))

    return jax.jit(accumulate, donate_argnums=(3,))


def logical_batch_seconds(full_step_s: float, accumulate_s: float, physical_batches: int) -> float:
    """Seconds per logical batch of `physical_batches` physical batches: every batch but the last is
    accumulated, the last one runs the full step (its gradient, the noise once, the update)."""
    if physical_batches < 1:
        raise ValueError(f"physical_batches={physical_batches} must be >= 1")
    return (physical_batches - 1) * accumulate_s + full_step_s


def _plain_losses(setup: common.Setup):
    """`losses(params, batch, key) -> [B]`: mean softmax cross-entropy over each example's K views,
    the model applied to all B*K views at once."""
    import jax
    import jax.numpy as jnp

    def losses(params, batch, key):
        images = batch["image"]  # [B, K, H, W, C]
        b, k = images.shape[:2]
        logits = setup.apply(params, images.reshape((b * k,) + images.shape[2:]), key).astype(jnp.float32)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), batch["label"].reshape(b * k, 1), axis=1)
        return -jnp.mean(logp.reshape(b, k), axis=1)

    return losses


def make_plain_step(setup: common.Setup, *, lr: float = 0.1):
    """Jitted `step(params, batch, key) -> (params, losses [B])`: `jax.grad` of the mean softmax
    cross-entropy of the model applied to all B*K views at once (no microbatch loop, no vmap)."""
    import jax
    import jax.numpy as jnp
    losses = _plain_losses(setup)

    def step(params, batch, key):
        def mean_loss(p):
            per_example = losses(p, batch, key)
            return jnp.mean(per_example), per_example

        (_, per_example), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
        return jax.tree.map(lambda p, g: p - lr * g, params, grads), per_example

    return jax.jit(step)


def bench_model(name: str, batch_size: int, microbatches: tuple[int, ...], iters: int,
                methods: tuple[str, ...] = METHODS, *, resolution: int | None = None,
                memory_only: bool = False) -> list[dict[str, Any]]:
    """One row per (microbatch size, method). `time_ratio_vs_nonprivate`: vs the engine's non-private
    step at the same microbatch size; `time_ratio_vs_best_nonprivate`: vs the fastest non-private step
    of the model (plain `jax.grad` or engine, any microbatch size), filled in once all are timed.

    The methods of one microbatch size are compiled first, then timed round-robin (so load from
    other processes hits all alike); median of `iters` calls each. A method that fails to build (e.g.
    book-keeping refusing a model with untapped layers) gives a row with `error` and no timing.
    memory_only: compile only, rows carry the working set and no timing."""
    import time

    import jax
    setup = common.make_setup(name, batch_size, resolution=resolution)
    key = jax.random.key(0)
    args = (setup.params, setup.batch, key)
    rows = []
    for mb in microbatches:
        if batch_size % mb:
            continue
        compiled, info, errors = {}, {}, {}
        for method in methods:
            rss0 = common.maxrss_mib()
            t0 = time.perf_counter()
            try:
                compiled[method] = make_step(setup, method, mb).lower(*args).compile()
            except ValueError as e:  # an engine refusing the model: recorded, the others still run
                errors[method] = str(e).splitlines()[0][:200]
                continue
            compile_s = time.perf_counter() - t0
            if not memory_only:
                jax.block_until_ready(compiled[method](*args))  # warm-up
            mem = compiled[method].memory_analysis()
            info[method] = {"compile_s": compile_s,
                            "xla_temp_mib": mem.temp_size_in_bytes / 2 ** 20 if mem is not None else None,
                            "working_set_mib": ((mem.temp_size_in_bytes + mem.output_size_in_bytes) / 2 ** 20
                                                if mem is not None else None),
                            "rss_growth_mib": common.maxrss_mib() - rss0}
        if memory_only:
            for method in methods:
                base = {"model": name, "resolution": int(setup.batch["image"].shape[2]), "params": setup.num_params,
                        "batch": batch_size, "microbatch": mb, "method": method}
                rows.append({**base, "error": errors[method]} if method in errors else {**base, **info[method]})
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}),
                      flush=True)
            compiled.clear()
            continue
        times = common.time_round_robin(compiled, args, iters)
        for method in methods:
            base = {"model": name, "resolution": int(setup.batch["image"].shape[2]), "params": setup.num_params,
                    "batch": batch_size, "microbatch": mb, "method": method}
            if method in errors:
                rows.append({**base, "error": errors[method]})
                print(json.dumps(rows[-1]), flush=True)
                continue
            row = {**base, "examples_per_s": batch_size / times[method], "step_s": times[method],
                   **info[method], "device_peak_mib": common.device_peak_mib(),
                   "time_ratio_vs_nonprivate": (times[method] / times["nonprivate"]
                                                if "nonprivate" in times else None)}
            rows.append(row)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}),
                  flush=True)
    add_best_nonprivate_ratio(rows)
    return rows


def add_best_nonprivate_ratio(rows: list[dict[str, Any]]) -> None:
    """Set `time_ratio_vs_best_nonprivate` = step_s / (fastest non-private step_s of the same model and
    batch, plain or engine, any microbatch size) on every timed row, in place."""
    best: dict[tuple, float] = {}
    for r in rows:
        if r["method"].startswith("nonprivate") and "step_s" in r:
            k = (r["model"], r["resolution"], r["batch"])
            best[k] = min(best.get(k, float("inf")), r["step_s"])
    for r in rows:
        k = (r["model"], r["resolution"], r["batch"])
        if "step_s" in r:
            r["time_ratio_vs_best_nonprivate"] = r["step_s"] / best[k] if k in best else None


COLUMNS = ["model", "resolution", "batch", "microbatch", "method", "examples_per_s", "step_s",
           "time_ratio_vs_nonprivate", "time_ratio_vs_best_nonprivate", "xla_temp_mib", "working_set_mib",
           "rss_growth_mib", "compile_s", "error"]
MEMORY_COLUMNS = ["model", "resolution", "batch", "microbatch", "method", "working_set_mib", "xla_temp_mib",
                  "compile_s", "error"]


def run(models: tuple[str, ...], quick: bool, methods: tuple[str, ...] = METHODS, *, batch: int | None = None,
        microbatches: tuple[int, ...] | None = None, iters: int | None = None, resolution: int | None = None,
        memory_only: bool = False) -> list[dict[str, Any]]:
    """Every model's plan (PLANS, full or quick), with batch / microbatches / iters overridden where given."""
    rows = []
    for name in models:
        batch_size, mbs, n = PLANS.get(name, PLANS["nfnet_tiny"])["quick" if quick else "full"]
        rows += bench_model(name, batch or batch_size, microbatches or mbs, iters or n, methods,
                            resolution=resolution, memory_only=memory_only)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(PLANS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None, help="write rows + machine info here")
    ap.add_argument("--batch", type=int, default=None, help="physical batch (default: the model's plan)")
    ap.add_argument("--microbatches", type=int, nargs="+", default=None, help="microbatch sizes dividing --batch")
    ap.add_argument("--iters", type=int, default=None, help="timed calls per method")
    ap.add_argument("--resolution", type=int, default=None, help="image size in pixels (default: the model's)")
    ap.add_argument("--memory-only", action="store_true",
                    help="compile only and report the working set (XLA temp + output); run no step")
    args = ap.parse_args(argv)
    bad = [m for m in args.microbatches or () if m < 1 or (args.batch and args.batch % m)]
    if bad or (args.batch is not None and args.batch < 1) or (args.iters is not None and args.iters < 1):
        ap.error(f"--microbatches {bad} must be >= 1 and divide --batch {args.batch}; --batch, --iters must be >= 1")
    rows = run(tuple(args.models), args.quick, tuple(args.methods), batch=args.batch,
               microbatches=tuple(args.microbatches) if args.microbatches else None, iters=args.iters,
               resolution=args.resolution, memory_only=args.memory_only)
    print(common.markdown_table(rows, MEMORY_COLUMNS if args.memory_only else COLUMNS))
    return common.emit_rows(rows, args.json, echo=False, machine=True)


if __name__ == "__main__":
    raise SystemExit(main())
