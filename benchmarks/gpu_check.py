"""GPU check: non-private vs book-keeping vs vmap DP steps, microbatch sweep until out of memory.

    benchmarks/gpu_check.sh [OUT_DIR]                 # the ready script (< 8 minutes on one GPU)
    python -m benchmarks.gpu_check --out DIR [--budget-s 420] [--smoke]

Models (full run): NFNet-F0 at 192 px and ViT-B/16 at 224 px, 10 classes, bf16 compute (float32
params). For each (model, method) one subprocess (so that the device's peak-memory counter
``peak_bytes_in_use``, which never resets, belongs to that method alone) sweeps the batch size
b = start, 4 start, 16 start, ... (x2 in --smoke) until out of memory, the time budget, or ``--max-batch``. One "step" on a
batch of b examples, jitted, with an SGD update:
  * nonprivate:  ``jax.grad`` of the mean loss over the whole batch (no microbatch loop, no
                 per-example work): the fastest non-private step, the denominator of every ratio;
  * bookkeeping: ``bookkeeping.bk_clipped_grad_sum`` (flat clipping, C = 1) + ``noise.privatize``
                 (sigma = 1, a fixed plan: no accountant needed);
  * vmap:        ``engine.clipped_grad_sum`` (vmap of per-example grads) + the same noise step.
DP steps use microbatch = b (one vmapped chunk, no accumulation loop). Reported per row: examples/s
(median of timed calls), step seconds, ratio to the non-private step at the same b and to the best
non-private step of the model, XLA temp memory of the compiled step and the device's peak bytes in
use (None on CPU). Output: DIR/gpu_check.json (machine, rows, summary) and DIR/gpu_check.md.

Imports only jax, flax, numpy and dpft.models / dpft.privacy.{engine,bookkeeping,noise,keys,adapters}
(none of dp-accounting, ml-collections, grain, opacus, orbax); ``--smoke`` runs tiny models on CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback

#: model -> (resolution px, first batch size) for the full run and for --smoke.
FULL = {"nfnet_f0": (192, 16), "vit_b16": (224, 16)}
SMOKE = {"nfnet_micro": (32, 2), "vit_micro": (32, 2)}
#: Batch-size growth factor of the sweep: x4 on the GPU (reaches the memory limit within the
#: budget: 16, 64, 256, 1024, ...), x2 in the smoke run.
GROWTH = {"full": 4, "smoke": 2}
METHODS = ("nonprivate", "bookkeeping", "vmap")
NUM_CLASSES = 10
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM")


# ------------------------------------------------------------------ worker (one model, one method)

def make_step(model_name: str, method: str, resolution: int, dtype_name: str):
    """(jitted step(params, batch, key) -> (params, loss), params, make_batch(b)) for one method."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import dpft.models
    from dpft.privacy import adapters, bookkeeping, engine, keys, noise

    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[dtype_name]
    model = dpft.models.create(model_name, NUM_CLASSES, seed=0, dtype=dtype, head_init="normal")
    loss_fn, params, _ = adapters.nnx_loss_fn(model, adapters.softmax_cross_entropy_loss)
    graphdef = nnx.graphdef(model)
    lr = 0.1

    def make_batch(b: int) -> dict:
        rs = np.random.RandomState(0)
        return {"image": jnp.asarray(rs.randn(b, 1, resolution, resolution, 3), jnp.float32),
                "label": jnp.asarray(rs.randint(0, NUM_CLASSES, (b, 1)), jnp.int32),
                "mask": jnp.ones((b,), jnp.float32), "example_id": jnp.arange(b, dtype=jnp.int32)}

    if method == "nonprivate":
        def batch_loss(p, batch, key):
            logits = nnx.merge(graphdef, p)(batch["image"][:, 0], train=True, key=key)
            logp = jax.nn.log_softmax(logits.astype(jnp.float32))
            return -jnp.mean(jnp.take_along_axis(logp, batch["label"][:, :1], axis=1))

        def step(p, batch, key):
            loss, grads = jax.value_and_grad(batch_loss)(p, batch, key)
            return jax.tree.map(lambda x, g: x - lr * g.astype(x.dtype), p, grads), loss
    else:
        clipped_sum = bookkeeping.bk_clipped_grad_sum if method == "bookkeeping" else engine.clipped_grad_sum
        clipping = engine.ClippingConfig(mode="flat", clip_norm=1.0)
        noise_base = keys.noise_base_key(keys.RunSecret.generate())

        def step(p, batch, key):
            b = batch["mask"].shape[0]
            grad_sum, stats = clipped_sum(loss_fn, p, batch, key, clipping=clipping, microbatch_size=b)
            noisy = noise.privatize(grad_sum, noise.noise_key(noise_base, 0), noise_multiplier=1.0,
                                    clip_norm=engine.sensitivity(clipping, p), expected_batch_size=float(b))
            return jax.tree.map(lambda x, g: x - lr * g.astype(x.dtype), p, noisy), jnp.mean(stats["loss"])

    return jax.jit(step), params, make_batch


def _first_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _is_oom(e: BaseException) -> bool:
    return any(m in str(e) for m in OOM_MARKERS)


def run_worker(args: argparse.Namespace) -> int:
    """Sweep batch sizes for one (model, method); append one JSON line per result to args.rows."""
    import jax

    deadline = time.monotonic() + args.budget_s

    def emit(row: dict) -> None:
        row = {"model": args.model, "method": args.method, "resolution": args.resolution,
               "dtype": args.dtype, **row}
        with open(args.rows, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    try:
        step, params, make_batch = make_step(args.model, args.method, args.resolution, args.dtype)
    except Exception as e:  # noqa: BLE001 - recorded, the check goes on with the next method
        emit({"batch": None, "status": "error", "error": _first_line(e)})
        traceback.print_exc()
        return 0
    key = jax.random.key(0)
    b, last_seconds = args.start, 0.0
    while b <= args.max_batch:
        # Starting a size needs about what the last one took (compile dominates on a GPU), +25 %.
        if time.monotonic() + 1.25 * last_seconds > deadline:
            emit({"batch": b, "status": "time_budget"})
            return 0
        t0 = time.monotonic()
        try:
            batch = make_batch(b)
            compiled = step.lower(params, batch, key).compile()
            compile_s = time.monotonic() - t0
            mem = compiled.memory_analysis()
            jax.block_until_ready(compiled(params, batch, key))  # warm-up
            times = []
            for _ in range(args.iters):
                t = time.perf_counter()
                jax.block_until_ready(compiled(params, batch, key))
                times.append(time.perf_counter() - t)
        except Exception as e:  # noqa: BLE001 - out of memory ends the sweep; anything else is an error row
            emit({"batch": b, "status": "oom" if _is_oom(e) else "error", "error": _first_line(e)})
            if not _is_oom(e):
                traceback.print_exc()
            return 0
        stats = jax.devices()[0].memory_stats() or {}
        median = statistics.median(times)
        emit({"batch": b, "microbatch": b if args.method != "nonprivate" else None, "status": "ok",
              "examples_per_s": b / median, "step_s": median, "compile_s": compile_s, "iters": args.iters,
              "xla_temp_mib": mem.temp_size_in_bytes / 2 ** 20 if mem is not None else None,
              "device_peak_mib": (stats["peak_bytes_in_use"] / 2 ** 20 if "peak_bytes_in_use" in stats else None)})
        last_seconds = time.monotonic() - t0
        del compiled, batch
        b *= args.growth
    emit({"batch": b, "status": "max_batch"})
    return 0


# ------------------------------------------------------------------ driver

def summarise(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(timed rows with ratios filled in, one summary row per (model, method))."""
    ok = [r for r in rows if r.get("status") == "ok"]
    nonprivate = {(r["model"], r["batch"]): r["step_s"] for r in ok if r["method"] == "nonprivate"}
    best_np: dict[str, float] = {}
    for r in ok:
        if r["method"] == "nonprivate":
            best_np[r["model"]] = max(best_np.get(r["model"], 0.0), r["examples_per_s"])
    for r in ok:
        np_s = nonprivate.get((r["model"], r["batch"]))
        r["ratio_vs_nonprivate_same_batch"] = np_s / r["step_s"] if np_s else None
        r["ratio_vs_best_nonprivate"] = r["examples_per_s"] / best_np[r["model"]] if r["model"] in best_np else None
    summary = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for method in METHODS:
            mine = [r for r in rows if r["model"] == model and r["method"] == method]
            if not mine:
                continue
            timed = [r for r in mine if r.get("status") == "ok"]
            best = max(timed, key=lambda r: r["examples_per_s"]) if timed else None
            end = [r for r in mine if r.get("status") != "ok"]
            summary.append({
                "model": model, "method": method,
                "largest_batch_run": max((r["batch"] for r in timed), default=None),
                "stopped_by": end[-1]["status"] if end else "?",
                "stop_detail": end[-1].get("error") if end else None,
                "best_examples_per_s": best["examples_per_s"] if best else None,
                "at_batch": best["batch"] if best else None,
                "ratio_vs_best_nonprivate": (best["examples_per_s"] / best_np[model]
                                             if best and model in best_np else None),
                "device_peak_mib_at_best": best["device_peak_mib"] if best else None,
            })
    return ok, summary


ROW_COLUMNS = ["model", "method", "batch", "examples_per_s", "step_s", "ratio_vs_nonprivate_same_batch",
               "ratio_vs_best_nonprivate", "xla_temp_mib", "device_peak_mib", "compile_s"]
SUMMARY_COLUMNS = ["model", "method", "best_examples_per_s", "at_batch", "ratio_vs_best_nonprivate",
                   "largest_batch_run", "stopped_by", "device_peak_mib_at_best"]


def run_driver(args: argparse.Namespace) -> int:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import common

    import jax
    backend = jax.default_backend()
    if backend == "cpu" and not (args.smoke or args.allow_cpu):
        print("gpu_check: no GPU (jax backend 'cpu'); use --smoke for the CPU smoke run or --allow-cpu",
              file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    plan = SMOKE if args.smoke else FULL
    models = [m for m in (args.models or list(plan))]
    unknown = [m for m in models if m not in FULL and m not in SMOKE]
    if unknown:
        print(f"gpu_check: unknown model {unknown[0]!r}; choose from {', '.join([*FULL, *SMOKE])}", file=sys.stderr)
        return 2
    rows_path = os.path.join(args.out, "gpu_check_rows.jsonl")
    open(rows_path, "w").close()
    # Non-private and book-keeping of every model first, vmap (the baseline DP path) last: if the
    # time runs out, what is lost is the least needed.
    runs = ([(m, meth) for m in models for meth in args.methods if meth != "vmap"]
            + [(m, "vmap") for m in models if "vmap" in args.methods])
    start = time.monotonic()
    machine = {**common.machine_info(), "device": str(jax.devices()[0].device_kind)}
    for i, (model, method) in enumerate(runs):
        left = args.budget_s - (time.monotonic() - start)
        remaining = len(runs) - i
        budget = left / remaining
        # The worker stops starting new sizes at 0.8 x its share; the hard limit leaves >= 20 s to each later run.
        hard = max(min(1.5 * budget, left - 20.0 * (remaining - 1)), 5.0)
        res, first = {**FULL, **SMOKE}[model]
        cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--worker", "--model", model, "--method", method,
               "--resolution", str(res), "--start", str(args.start or first), "--max-batch", str(args.max_batch),
               "--iters", str(args.iters), "--dtype", args.dtype, "--rows", rows_path,
               "--growth", str(args.growth or GROWTH["smoke" if args.smoke else "full"]),
               "--budget-s", str(max(budget * 0.8, 1.0))]
        print(f"gpu_check: {model} {method} (budget {budget:.0f} s, hard limit {hard:.0f} s)", flush=True)
        try:
            proc = subprocess.run(cmd, timeout=hard, capture_output=True, text=True,
                                  cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            if proc.returncode != 0:
                _append(rows_path, {"model": model, "method": method, "batch": None, "status": "error",
                                    "error": f"worker exit {proc.returncode}: "
                                             + (proc.stderr.strip().splitlines() or ["?"])[-1][:300]})
        except subprocess.TimeoutExpired:
            _append(rows_path, {"model": model, "method": method, "batch": None, "status": "timeout"})
        # Reports after every run: if the outer time limit stops the check, what ran is on disk.
        md = write_reports(args, machine, backend, rows_path, time.monotonic() - start)
    print(md)
    return 0


def write_reports(args: argparse.Namespace, machine: dict, backend: str, rows_path: str, wall_s: float) -> str:
    """(Re)write OUT/gpu_check.json and OUT/gpu_check.md from the rows so far; returns the Markdown."""
    from benchmarks import common

    with open(rows_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    timed, summary = summarise(rows)
    doc = {"machine": machine, "args": {k: v for k, v in vars(args).items() if k != "worker"},
           "wall_s": wall_s, "rows": rows, "summary": summary}
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(doc, f, indent=1)
    short = [{**r, "stop_detail": (r["stop_detail"] or "")[:80]} for r in summary]
    md = "\n".join(["# dpft GPU check", "", f"{machine['date']}, {machine['device']} (backend {backend}), "
                    f"jax {machine['jax']}, flax {machine['flax']}, compute {args.dtype}, {wall_s:.0f} s", "",
                    "## Best per method (ratio = examples/s over the best plain `jax.grad` non-private step)", "",
                    common.markdown_table(short, SUMMARY_COLUMNS + ["stop_detail"]), "", "## Every batch size", "",
                    common.markdown_table(timed, ROW_COLUMNS), ""])
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(md)
    return md


def _append(path: str, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_check_out", help="output directory")
    ap.add_argument("--budget-s", type=float, default=420.0, help="seconds for all runs together")
    ap.add_argument("--smoke", action="store_true", help="tiny models (nfnet_micro, vit_micro), runs on CPU")
    ap.add_argument("--allow-cpu", action="store_true", help="run the full models on CPU anyway")
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--start", type=int, default=0, help="first batch size (0: the model's default)")
    ap.add_argument("--max-batch", type=int, default=2048)
    ap.add_argument("--growth", type=int, default=0, help="batch-size factor per sweep step (0: 4, smoke 2)")
    ap.add_argument("--iters", type=int, default=3, help="timed calls per batch size (after one warm-up)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    # worker mode (one model and method; called by the driver)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--resolution", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--rows", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.start < 0 or args.max_batch < 1 or args.iters < 1 or args.budget_s <= 0 or args.growth == 1 \
            or args.growth < 0:
        ap.error("--start >= 0, --max-batch >= 1, --iters >= 1, --budget-s > 0 and --growth 0 or >= 2 are required")
    return run_worker(args) if args.worker else run_driver(args)


if __name__ == "__main__":
    raise SystemExit(main())
