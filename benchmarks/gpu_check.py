"""GPU check: non-private vs book-keeping vs vmap DP steps; compile in parallel, time one at a time.

    benchmarks/gpu_check.sh [OUT_DIR]                 # the ready script (< 8 minutes on one GPU)
    python -m benchmarks.gpu_check --out DIR [--budget-s 450 --compile-s 330] [--batches 128 512 2048] [--smoke]

Models (full run): NFNet-F0 at 192 px and ViT-B/16 at 224 px, 10 classes, bf16 compute (float32
params). One "step" on a batch of b examples, jitted, with an SGD update:
  * nonprivate:  ``jax.grad`` of the mean loss over the whole batch (no microbatch loop, no
                 per-example work): the fastest non-private step, the denominator of every ratio;
  * bookkeeping: ``bookkeeping.bk_clipped_grad_sum`` (flat clipping, C = 1) + ``noise.privatize``
                 (sigma = 1, a fixed plan: no accountant needed);
  * vmap:        ``engine.clipped_grad_sum`` (vmap of per-example grads) + the same noise step.
DP steps use microbatch = b (one vmapped chunk, no accumulation loop).

Protocol (XLA's GPU compile autotunes by running kernels on the GPU, and compiling dominates):
  1. The driver starts one worker process per (model, method) at once. Each lowers its step for every
     batch size (main thread) and compiles them in a thread pool (``.compile()`` releases the GIL),
     records ``compiled.memory_analysis()`` per size (predicted device bytes = arguments + outputs +
     temp + generated code - aliased), marks a size ``oom_predicted`` if that exceeds the memory limit
     (``memory_stats()["bytes_limit"]`` or ``--memory-limit-mib``), and writes ``ready.json``.
  2. When every worker is ready, or at the compile deadline (``--compile-s`` after the start), the driver
     kills the workers still compiling (their sizes: ``compile_time_budget``, or ``not_timed`` if one
     size had compiled) and then lets the ready workers time one at a time (a ``go.json`` file with the
     worker's time allowance), non-private first; it waits for each to exit (freeing its device
     memory) before the next. So no timing overlaps any compile or other timing. One process per
     (model, method): the device's never-resetting ``peak_bytes_in_use`` is that method's.
Every row records its compile and timed intervals (wall-clock ``time.time()`` seconds). Reports
(OUT/gpu_check.json, OUT/gpu_check.md) are rewritten after every timed worker. Per (model, method)
the summary gives an *estimate* of the largest microbatch that fits: the memory limit interpolated on
the predicted bytes (linear between the two compiled sizes around it, extrapolated from the two
nearest outside them).

Imports only jax, flax, numpy and dpft.models / dpft.privacy.{engine,bookkeeping,noise,keys,adapters}
(none of dp-accounting, ml-collections, grain, opacus, orbax); ``--smoke`` runs tiny models on CPU.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
from typing import Any

#: model -> resolution (px) for the full run and for --smoke.
FULL = {"nfnet_f0": 192, "vit_b16": 224}
SMOKE = {"nfnet_micro": 32, "vit_micro": 32}
#: Default batch sizes (also the DP microbatch). H200, bf16: NFNet-F0 non-private b=128 used 8.0 GiB
#: peak, book-keeping 10.8 GiB, ViT-B/16 non-private 13.7 GiB; x4 steps reach the memory limit in 3 sizes.
BATCHES = {"full": (128, 512, 2048), "smoke": (2, 4)}
METHODS = ("nonprivate", "bookkeeping", "vmap")
NUM_CLASSES = 10
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM")
MIB = 2.0 ** 20
#: Seconds the driver keeps for writing reports at the end of the budget.
REPORT_RESERVE_S = 3.0


# ------------------------------------------------------------------ the step (one model, one method)

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
        # 16 random examples tiled to b (randn of b x 224 x 224 x 3 would take seconds at b = 2048).
        rs = np.random.RandomState(0)
        block = rs.randn(min(b, 16), 1, resolution, resolution, 3).astype(np.float32)
        return {"image": jnp.asarray(np.resize(block, (b, 1, resolution, resolution, 3))),
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


def batch_spec(b: int, resolution: int) -> dict:
    """Shapes and dtypes of make_batch(b), for lowering without allocating the batch."""
    import jax
    import jax.numpy as jnp
    return {"image": jax.ShapeDtypeStruct((b, 1, resolution, resolution, 3), jnp.float32),
            "label": jax.ShapeDtypeStruct((b, 1), jnp.int32), "mask": jax.ShapeDtypeStruct((b,), jnp.float32),
            "example_id": jax.ShapeDtypeStruct((b,), jnp.int32)}


def _first_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _is_oom(e: BaseException) -> bool:
    return any(m in str(e) for m in OOM_MARKERS)


def predicted_bytes(mem: Any) -> int:
    """Device bytes one call of a compiled step needs, from ``compiled.memory_analysis()``:
    arguments + outputs + temp + generated code - bytes of outputs aliased to arguments."""
    return int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
               + mem.generated_code_size_in_bytes - mem.alias_size_in_bytes)


# ------------------------------------------------------------------ worker files (OUT/ctl/<model>__<method>/)

def _write_atomic(path: str, obj: Any) -> None:
    """Write JSON to path via a temporary file and rename, so a reader never sees half of it. Not
    `dpft.atomic_io`: the driver must still write its error rows where dpft cannot be imported."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def _append(path: str, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_json(path: str) -> Any:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


# ------------------------------------------------------------------ worker phase 1: compile

def _compile_one(lowered: Any, b: int, lower_start: float, lower_s: float,
                 limit: int | None) -> tuple[dict, Any]:
    """Compile one lowered step; returns (record, executable or None). Times are wall seconds since
    the epoch (``compile_start`` is the lowering's start); sizes in MiB."""
    start = time.time()
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - recorded as the size's status
        return {"batch": b, "status": "oom" if _is_oom(e) else "error", "cause": f"at compile: {_first_line(e)}",
                "compile_start": lower_start, "compile_end": time.time(), "lower_s": lower_s}, None
    end = time.time()
    rec = {"batch": b, "status": "compiled", "compile_start": lower_start, "compile_end": end,
           "lower_s": lower_s, "xla_compile_s": end - start, "compile_s": end - lower_start}
    mem = compiled.memory_analysis()
    if mem is not None:
        pred = predicted_bytes(mem)
        rec.update(predicted_mib=pred / MIB, xla_temp_mib=mem.temp_size_in_bytes / MIB,
                   xla_argument_mib=mem.argument_size_in_bytes / MIB, xla_output_mib=mem.output_size_in_bytes / MIB,
                   xla_code_mib=mem.generated_code_size_in_bytes / MIB, xla_alias_mib=mem.alias_size_in_bytes / MIB)
        if limit is not None and pred > limit:
            rec.update(status="oom_predicted",
                       cause=f"predicted {pred / MIB:.0f} MiB > memory limit {limit / MIB:.0f} MiB; not run")
            return rec, None
    return rec, compiled


def memory_limit_bytes(limit_mib: float | None) -> int | None:
    """--memory-limit-mib in bytes, else the device's ``bytes_limit`` (None on CPU)."""
    import jax
    if limit_mib:
        return int(limit_mib * MIB)
    stats = jax.devices()[0].memory_stats() or {}
    return int(stats["bytes_limit"]) if "bytes_limit" in stats else None


def compile_phase(args: argparse.Namespace, step: Any, params: Any) -> dict[int, Any]:
    """Lower every batch size (main thread, holds the GIL) and compile them in a thread pool; append one
    record per size to ctl/compiled.jsonl as it finishes. Returns {batch: executable} of runnable sizes."""
    import jax
    key = jax.random.key(0)
    limit = memory_limit_bytes(args.memory_limit_mib)
    threads = args.compile_threads or len(args.batches)
    executables: dict[int, Any] = {}
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        futures = []
        for b in args.batches:
            t0 = time.time()
            try:
                lowered = step.lower(params, batch_spec(b, args.resolution), key)
            except Exception as e:  # noqa: BLE001 - recorded as the size's status
                _append(os.path.join(args.ctl, "compiled.jsonl"),
                        {"batch": b, "status": "error", "cause": f"at lowering: {_first_line(e)}",
                         "compile_start": t0, "compile_end": time.time()})
                continue
            futures.append(pool.submit(_compile_one, lowered, b, t0, time.time() - t0, limit))
        for fut in concurrent.futures.as_completed(futures):
            rec, compiled = fut.result()
            rec["memory_limit_mib"] = limit / MIB if limit is not None else None
            _append(os.path.join(args.ctl, "compiled.jsonl"), rec)
            if compiled is not None:
                executables[rec["batch"]] = compiled
    return executables


# ------------------------------------------------------------------ worker phase 2: time

def wait_for_go(ctl: str, parent: int) -> dict | None:
    """Block until the driver writes ctl/go.json (returns it) or the driver is gone (returns None)."""
    path = os.path.join(ctl, "go.json")
    while not os.path.exists(path):
        if os.getppid() != parent:
            return None
        time.sleep(0.02)
    return _read_json(path)


def time_one(compiled: Any, params: Any, batch: dict, iters: int) -> list[float]:
    """One warm-up call, then `iters` timed calls; seconds per call."""
    import jax
    key = jax.random.key(0)
    jax.block_until_ready(compiled(params, batch, key))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(compiled(params, batch, key))
        times.append(time.perf_counter() - t)
    return times


def timing_phase(args: argparse.Namespace, executables: dict[int, Any], params: Any, make_batch: Any,
                 allowance_s: float) -> None:
    """Time the runnable sizes in increasing order within `allowance_s` seconds; one record per size
    to ctl/timed.jsonl. A size is not started when ~1.25x its expected time (the last size's time
    scaled by the batch ratio) is not left."""
    import jax
    go, last = time.time(), None
    oom_at = None
    for b in sorted(executables):
        out = os.path.join(args.ctl, "timed.jsonl")
        if oom_at is not None:
            _append(out, {"batch": b, "status": "oom", "cause": f"not run: b={oom_at} ran out of memory"})
            continue
        need = last[1] * b / last[0] if last else 0.0
        left = go + allowance_s - time.time()
        if 1.25 * need > left:
            _append(out, {"batch": b, "status": "time_budget",
                          "cause": f"needs ~{need:.1f} s, {left:.1f} s of the worker's timing allowance left"})
            continue
        start = time.time()
        try:
            batch = make_batch(b)
            times = time_one(executables[b], params, batch, args.iters)
        except Exception as e:  # noqa: BLE001 - out of memory or error: a row, the next sizes go on
            _append(out, {"batch": b, "status": "oom" if _is_oom(e) else "error", "cause": _first_line(e),
                          "timed_start": start, "timed_end": time.time()})
            oom_at = b if _is_oom(e) else None
            if not _is_oom(e):
                traceback.print_exc()
            continue
        end = time.time()
        del batch
        stats = jax.devices()[0].memory_stats() or {}
        median = statistics.median(times)
        _append(out, {"batch": b, "status": "ok", "examples_per_s": b / median, "step_s": median,
                      "step_s_min": min(times), "iters": args.iters, "timed_start": start, "timed_end": end,
                      "device_peak_mib": (stats["peak_bytes_in_use"] / MIB if "peak_bytes_in_use" in stats
                                          else None)})
        last = (b, end - start)


def run_worker(args: argparse.Namespace) -> int:
    """One (model, method): compile every size, write ctl/ready.json, wait for go.json, time, exit."""
    parent = os.getppid()
    import jax
    try:
        step, params, make_batch = make_step(args.model, args.method, args.resolution, args.dtype)
        executables = compile_phase(args, step, params)
    except Exception as e:  # noqa: BLE001 - the driver turns this into error rows
        _write_atomic(os.path.join(args.ctl, "ready.json"), {"error": _first_line(e)})
        traceback.print_exc()
        return 0
    stats = jax.devices()[0].memory_stats() or {}
    _write_atomic(os.path.join(args.ctl, "ready.json"),
                  {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
                   "memory_stats_after_compile": {k: v for k, v in stats.items()
                                                  if k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit",
                                                           "bytes_reserved", "pool_bytes")}})
    go = wait_for_go(args.ctl, parent)
    if go is None:
        return 0
    timing_phase(args, executables, params, make_batch, go["allowance_s"])
    return 0


# ------------------------------------------------------------------ driver

class Worker:
    """One (model, method) worker process and its control directory."""

    def __init__(self, args: argparse.Namespace, model: str, method: str, root: str):
        self.model, self.method, self.resolution = model, method, {**FULL, **SMOKE}[model]
        self.ctl = os.path.join(args.out, "ctl", f"{model}__{method}")
        os.makedirs(self.ctl, exist_ok=True)
        for name in ("compiled.jsonl", "timed.jsonl", "ready.json", "go.json"):
            if os.path.exists(os.path.join(self.ctl, name)):
                os.remove(os.path.join(self.ctl, name))
        cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--worker", "--model", model, "--method", method,
               "--resolution", str(self.resolution), "--batches", *map(str, args.batches),
               "--iters", str(args.iters), "--dtype", args.dtype, "--ctl", self.ctl,
               "--compile-threads", str(args.compile_threads)]
        if args.memory_limit_mib:
            cmd += ["--memory-limit-mib", str(args.memory_limit_mib)]
        self.log = open(os.path.join(self.ctl, "log.txt"), "w")
        self.proc = subprocess.Popen(cmd, cwd=root, stdout=self.log, stderr=subprocess.STDOUT)
        #: why the driver stopped or skipped this worker (a status and a cause), if it did.
        self.fate: tuple[str, str] | None = None
        self.go_at: float | None = None
        self.end_at: float | None = None
        #: device memory (MiB) the other live workers held (their pools after compiling) while this one timed.
        self.others_hold_mib: float | None = None

    def ready(self) -> bool:
        return os.path.exists(os.path.join(self.ctl, "ready.json"))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.log.close()

    def held_mib(self) -> float:
        """Device memory this worker's allocator holds after compiling, MiB (0 on CPU or if unknown)."""
        stats = (_read_json(os.path.join(self.ctl, "ready.json")) or {}).get("memory_stats_after_compile") or {}
        for k in ("pool_bytes", "bytes_reserved", "bytes_in_use"):
            if stats.get(k):
                return stats[k] / MIB
        return 0.0

    def last_log_line(self) -> str:
        with open(os.path.join(self.ctl, "log.txt")) as f:
            lines = [ln.strip() for ln in f if ln.strip()]
        return lines[-1][:300] if lines else "(no output)"


def worker_rows(w: Worker, batches: list[int], dtype: str) -> list[dict]:
    """One row per batch size of a worker, merged from its compile and timing records and its fate."""
    compiled = {r["batch"]: r for r in _read_jsonl(os.path.join(w.ctl, "compiled.jsonl"))}
    timed = {r["batch"]: r for r in _read_jsonl(os.path.join(w.ctl, "timed.jsonl"))}
    ready = _read_json(os.path.join(w.ctl, "ready.json")) or {}
    rows = []
    for b in batches:
        row = {"model": w.model, "method": w.method, "resolution": w.resolution, "dtype": dtype, "batch": b,
               "microbatch": b if w.method != "nonprivate" else None,
               **compiled.get(b, {}), **timed.get(b, {})}
        row.update(worker_timing_start=w.go_at, worker_timing_end=w.end_at, others_hold_mib=w.others_hold_mib)
        if b in timed or (b in compiled and compiled[b]["status"] != "compiled"):
            pass  # the worker's own status
        elif "error" in ready:
            row.update(status="error", cause=f"worker failed: {ready['error']}")
        elif w.fate is not None:
            status, cause = w.fate
            if b not in compiled and status == "compile_time_budget":
                row.update(status=status, cause=cause)
            elif status == "compile_time_budget":
                row.update(status="not_timed", cause=cause + " (this size had compiled)")
            else:
                row.update(status=status, cause=cause)
        else:
            row.update(status="error", cause="no result recorded for this size")
        rows.append(row)
    return rows


def estimate_max_batch(points: dict[int, float], limit: float) -> tuple[int | None, float | None, float | None]:
    """Estimated largest batch whose predicted bytes fit `limit`, from {batch: predicted bytes} at >= 2
    sizes: bytes = a + c * b through the two sizes around the limit (or the two nearest outside them).
    Returns (batch, a, c) with a, c in the units of `points` (None if fewer than 2 sizes or c <= 0)."""
    bs = sorted(points)
    if len(bs) < 2:
        return None, None, None
    i = next((k for k in range(1, len(bs)) if points[bs[k]] > limit), len(bs) - 1)
    b0, b1 = bs[i - 1], bs[i]
    c = (points[b1] - points[b0]) / (b1 - b0)
    if c <= 0:
        return None, None, None
    a = points[b0] - c * b0
    return max(int((limit - a) // c), 0), a, c


def summarise(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(rows with ratios filled in, one summary row per (model, method))."""
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
            if mine:
                summary.append(summary_row(mine, best_np.get(model)))
    return rows, summary


def summary_row(mine: list[dict], best_np: float | None) -> dict:
    """Summary of one (model, method) from its rows; `best_np` is the model's best non-private examples/s."""
    timed = [r for r in mine if r.get("status") == "ok"]
    best = max(timed, key=lambda r: r["examples_per_s"]) if timed else None
    limits = [r["memory_limit_mib"] for r in mine if r.get("memory_limit_mib")]
    points = {r["batch"]: r["predicted_mib"] for r in mine if r.get("predicted_mib") is not None}
    est, a, c = estimate_max_batch(points, limits[0]) if limits else (None, None, None)
    compile_s = [r["compile_s"] for r in mine if r.get("compile_s") is not None]
    return {
        "model": mine[0]["model"], "method": mine[0]["method"],
        "best_examples_per_s": best["examples_per_s"] if best else None,
        "at_batch": best["batch"] if best else None,
        "ratio_vs_best_nonprivate": best["examples_per_s"] / best_np if best and best_np else None,
        "largest_batch_timed": max((r["batch"] for r in timed), default=None),
        "device_peak_mib_at_best": best["device_peak_mib"] if best else None,
        "memory_limit_mib": limits[0] if limits else None,
        "est_max_microbatch": est, "est_fit_mib": a, "est_fit_mib_per_example": c,
        "compile_s_max": max(compile_s, default=None),
        "not_timed": "; ".join(f"{r['batch']}: {r['status']}" for r in mine if r.get("status") != "ok") or None,
    }


ROW_COLUMNS = ["model", "method", "batch", "status", "examples_per_s", "step_s", "ratio_vs_nonprivate_same_batch",
               "ratio_vs_best_nonprivate", "predicted_mib", "xla_temp_mib", "device_peak_mib", "compile_s", "cause"]
SUMMARY_COLUMNS = ["model", "method", "best_examples_per_s", "at_batch", "ratio_vs_best_nonprivate",
                   "device_peak_mib_at_best", "est_max_microbatch", "memory_limit_mib", "compile_s_max", "not_timed"]


def write_reports(args: argparse.Namespace, machine: dict, workers: list[Worker], phases: dict) -> str:
    """(Re)write OUT/gpu_check.json and OUT/gpu_check.md from the workers' records; returns the Markdown."""
    from benchmarks import common

    rows = [r for w in workers for r in worker_rows(w, args.batches, args.dtype)]
    rows, summary = summarise(rows)
    doc = {"machine": machine, "args": {k: v for k, v in vars(args).items() if k != "worker"},
           "phases": phases, "rows": rows, "summary": summary,
           "workers": {f"{w.model}/{w.method}": _read_json(os.path.join(w.ctl, "ready.json")) for w in workers}}
    _write_atomic(os.path.join(args.out, "gpu_check.json"), doc)
    short = [{**r, "cause": (r.get("cause") or "")[:100]} for r in rows]
    md = "\n".join([
        "# dpft GPU check", "",
        f"{machine['date']}, {machine.get('device', '?')} (backend {machine['backend']}), jax {machine['jax']}, "
        f"flax {machine['flax']}, compute {args.dtype}; compile phase {phases.get('compile_s', 0):.0f} s "
        f"(deadline {args.compile_s:.0f} s), timing phase {phases.get('timing_s', 0):.0f} s, "
        f"total {phases.get('wall_s', 0):.0f} s", "",
        "## Best per method (ratio = examples/s over the best plain `jax.grad` non-private step)", "",
        "`est_max_microbatch` is an estimate: the memory limit interpolated on XLA's predicted bytes of the "
        "compiled sizes, not a run.", "",
        common.markdown_table(summary, SUMMARY_COLUMNS), "", "## Every batch size", "",
        common.markdown_table(short, ROW_COLUMNS), ""])
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(md)
    return md


def compile_wait(workers: list[Worker], deadline: float) -> None:
    """Wait until every worker is ready or has exited, or the deadline (time.monotonic()) passes; kill
    the workers still compiling then, and the ones that exited without ready.json get their fate."""
    while time.monotonic() < deadline and not all(w.ready() or w.proc.poll() is not None for w in workers):
        time.sleep(0.1)
    for w in workers:
        if w.ready():
            continue
        if w.proc.poll() is None:
            w.kill()
            w.fate = ("compile_time_budget", "not compiled before the compile deadline; worker stopped")
        else:
            w.kill()
            w.fate = ("error", f"worker exit {w.proc.returncode} before compiling: {w.last_log_line()}")


def time_workers(args: argparse.Namespace, workers: list[Worker], end: float, report: Any) -> None:
    """Let the ready workers time one at a time (non-private first), each within an equal share of
    the time left before `end` (time.monotonic()); reports after every worker."""
    queue = [w for m in METHODS for w in workers if w.method == m and w.fate is None]
    for i, w in enumerate(queue):
        left = end - time.monotonic()
        if "error" in (_read_json(os.path.join(w.ctl, "ready.json")) or {}):
            w.kill()
            continue
        if left < 1.0:
            w.kill()
            w.fate = ("time_budget", "the timing phase ran out before this worker's turn")
            continue
        allowance = left / (len(queue) - i)
        w.others_hold_mib = sum(o.held_mib() for o in queue[i + 1:] if o.proc.poll() is None)
        w.go_at = time.time()
        _write_atomic(os.path.join(w.ctl, "go.json"), {"allowance_s": allowance})
        try:
            # The worker stops starting sizes at its allowance; one size in progress may overrun it.
            w.proc.wait(timeout=max(min(1.5 * allowance + 5.0, left), 1.0))
        except subprocess.TimeoutExpired:
            w.fate = ("timeout", f"worker still timing after its hard limit ({1.5 * allowance + 5.0:.0f} s)")
        except BaseException:  # SIGTERM (the outer `timeout`) or Ctrl-C: rows say so, then the driver stops
            w.fate = ("timeout", "the check was stopped while this worker was timing")
            w.kill()
            w.end_at = time.time()
            raise
        w.kill()
        w.end_at = time.time()
        if w.fate is None and w.proc.returncode != 0:
            w.fate = ("error", f"worker exit {w.proc.returncode} while timing: {w.last_log_line()}")
        report()


def run_driver(args: argparse.Namespace) -> int:
    """Start every worker, wait for the compile phase, time workers one at a time, write reports."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    start = time.monotonic()
    os.makedirs(args.out, exist_ok=True)
    plan = SMOKE if args.smoke else FULL
    models = args.models or list(plan)
    unknown = [m for m in models if m not in FULL and m not in SMOKE]
    if unknown:
        print(f"gpu_check: unknown model {unknown[0]!r}; choose from {', '.join([*FULL, *SMOKE])}", file=sys.stderr)
        return 2
    args.batches = sorted(set(args.batches or BATCHES["smoke" if args.smoke else "full"]))
    # Workers start first (each needs seconds to import jax and build its model), then the driver's checks.
    workers = [Worker(args, m, meth, root) for m in models for meth in args.methods]
    try:
        return drive(args, workers, start)
    finally:
        for w in workers:
            w.kill()


def drive(args: argparse.Namespace, workers: list[Worker], start: float) -> int:
    """The driver's two phases after the workers started; returns the exit code."""
    from benchmarks import common

    import jax
    backend = jax.default_backend()
    if backend == "cpu" and not (args.smoke or args.allow_cpu):
        print("gpu_check: no GPU (jax backend 'cpu'); use --smoke for the CPU smoke run or --allow-cpu",
              file=sys.stderr)
        return 2
    machine = {**common.machine_info(), "device": str(jax.devices()[0].device_kind)}
    phases: dict[str, float] = {}
    compile_wait(workers, start + args.compile_s)
    phases["compile_s"] = time.monotonic() - start
    phases["timing_start_time"] = time.time()

    def report() -> str:
        phases["timing_s"] = time.monotonic() - start - phases["compile_s"]
        phases["wall_s"] = time.monotonic() - start
        return write_reports(args, machine, workers, phases)

    report()
    try:
        time_workers(args, workers, start + args.budget_s - REPORT_RESERVE_S, report)
    finally:
        for w in workers:
            if w.fate is None and w.go_at is None and w.ready():
                w.fate = ("timeout", "the check was stopped before this worker's turn")
        md = report()
    print(md)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_check_out", help="output directory")
    ap.add_argument("--budget-s", type=float, default=450.0, help="seconds for the whole check (compile + timing)")
    ap.add_argument("--compile-s", type=float, default=330.0,
                    help="compile deadline, seconds after the start; the timing phase gets the rest of --budget-s")
    ap.add_argument("--smoke", action="store_true", help="tiny models (nfnet_micro, vit_micro), runs on CPU")
    ap.add_argument("--allow-cpu", action="store_true", help="run the full models on CPU anyway")
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--batches", nargs="+", type=int, default=None,
                    help=f"batch sizes (= DP microbatch) of every model and method (default {BATCHES['full']}, "
                         f"--smoke {BATCHES['smoke']})")
    ap.add_argument("--iters", type=int, default=3, help="timed calls per batch size (after one warm-up)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--memory-limit-mib", type=float, default=None,
                    help="device memory limit for the out-of-memory prediction (default: the device's bytes_limit)")
    ap.add_argument("--compile-threads", type=int, default=0,
                    help="compile threads per worker (0: one per batch size)")
    # worker mode (one model and method; started by the driver)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--resolution", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--ctl", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if (args.iters < 1 or args.budget_s <= 0 or not 0 < args.compile_s < args.budget_s or args.compile_threads < 0
            or any(b < 1 for b in args.batches or [])
            or (args.memory_limit_mib is not None and args.memory_limit_mib <= 0)):
        ap.error("--iters >= 1, 0 < --compile-s < --budget-s, --batches >= 1, --compile-threads >= 0 and "
                 "--memory-limit-mib > 0 are required")
    if args.worker:
        return run_worker(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` -> finally: kill the workers
    return run_driver(args)


if __name__ == "__main__":
    raise SystemExit(main())
