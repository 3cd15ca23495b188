"""GPU check: non-private vs book-keeping vs vmap DP steps; compile in parallel, time one at a time.

    benchmarks/gpu_check.sh [OUT_DIR]                 # the ready script (< 8 minutes on one GPU)
    python -m benchmarks.gpu_check --out DIR [--budget-s 450 --compile-s 330] [--batches 128 512 2048] [--smoke]

Models (full run): NFNet-F0 at 192 px and ViT-B/16 at 224 px, 10 classes, bf16 compute (float32
params). One "step" on a batch of b examples, jitted, with an SGD update:
  * nonprivate:  ``jax.grad`` of the mean loss over the whole batch (no microbatch loop, no
                 per-example work): the fastest non-private step, the denominator of every ratio;
  * bookkeeping: ``bookkeeping.bk_clipped_grad_sum`` (flat clipping, C = 1) + ``noise.privatize``
                 (sigma = 1, a fixed plan: no accountant needed);
  * vmap:        ``engine.clipped_grad_sum`` (vmap of per-example grads) + the same noise step;
  * bookkeeping_ghost (only if --methods names it): book-keeping with ghost norms for every layer;
  * bookkeeping_bytes (only if --methods names it): book-keeping with each layer's route by fewer
                 bytes written (`bk_layers.use_ghost` "bytes") instead of fewer flops.
DP steps use microbatch = b (one vmapped chunk, no accumulation loop).

Protocol (XLA's GPU compile autotunes by running kernels on the GPU, and compiling dominates: on an
H200, 2026-11-30, 41 s to 290 s per step and size against 12-95 ms per step):
  1. Compile. The driver starts one compile worker per (model, method) at once. Each compiles its
     sizes one after another, smallest first, into a persistent XLA compilation cache shared by the
     run (``OUT/ctl/xla_cache``), records ``compiled.memory_analysis()`` per size (predicted device
     bytes = arguments + outputs + temp + generated code - aliased), and marks a size
     ``oom_predicted`` if that exceeds the memory limit (the device's ``memory_stats()["bytes_limit"]``,
     read by the driver, or ``--memory-limit-mib``), or, without compiling it, if the line through the two previous sizes'
     predictions does. Compile workers free device memory at once (``XLA_PYTHON_CLIENT_ALLOCATOR=platform``:
     autotuning's buffers are not kept in a pool) and exit when done. At the compile deadline
     (``--compile-s`` after the start) the driver kills those still compiling: the sizes they compiled
     stay timeable, the others are ``compile_time_budget``.
  2. Time. For each (model, method) with a compiled size, non-private first, the driver starts a fresh
     timing worker, alone on the device, with an equal share of the time left; it loads its
     executables from the cache (``load_s``, ``cache_hit`` per size), times the sizes in increasing
     order and exits before the next starts. So no timing overlaps a compile, another timing or another
     process's device memory, and the device's never-resetting ``peak_bytes_in_use`` is that method's.
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
import functools
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
SMOKE = {"nfnet_nano": 32, "vit_micro": 32}
#: Default batch sizes (also the DP microbatch). H200, bf16: NFNet-F0 non-private b=128 used 8.0 GiB
#: peak, book-keeping 10.8 GiB, ViT-B/16 non-private 13.7 GiB; x4 steps reach the memory limit in 3 sizes.
BATCHES = {"full": (128, 512, 2048), "smoke": (2, 4)}
#: Every method, in timing order; the check runs DEFAULT_METHODS unless --methods names others.
#: bookkeeping_ghost: book-keeping with ghost norms for every layer (ghost="always"), to compare
#: with the flop-based per-layer rule of "bookkeeping" on a device where bytes may matter more;
#: bookkeeping_bytes: the per-layer rule by bytes written (ghost="bytes").
METHODS = ("nonprivate", "bookkeeping", "vmap", "bookkeeping_ghost", "bookkeeping_bytes")
#: The route rule (`bk_layers.use_ghost`) of each book-keeping method.
GHOST_RULE = {"bookkeeping": "auto", "bookkeeping_ghost": "always", "bookkeeping_bytes": "bytes"}
DEFAULT_METHODS = METHODS[:3]
NUM_CLASSES = 10
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM")
MIB = 2.0 ** 20
#: Seconds the driver keeps for writing reports at the end of the budget.
REPORT_RESERVE_S = 3.0


# ------------------------------------------------------------------ the step (one model, one method)

def make_step(model_name: str, method: str, resolution: int, dtype_name: str):
    """(jitted step(params, batch, keys) -> (params, loss), params, make_batch(b), keys) for one method.

    keys {"data": key, "noise": the run's noise base key} are arguments, not constants of the
    program: a fresh secret per process would otherwise make every process's program different
    (and the timing worker's compilation-cache lookup miss)."""
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

        def step(p, batch, ks):
            loss, grads = jax.value_and_grad(batch_loss)(p, batch, ks["data"])
            return jax.tree.map(lambda x, g: x - lr * g.astype(x.dtype), p, grads), loss
    else:
        clipped_sum = (functools.partial(bookkeeping.bk_clipped_grad_sum, ghost=GHOST_RULE[method])
                       if method in GHOST_RULE else engine.clipped_grad_sum)
        clipping = engine.ClippingConfig(mode="flat", clip_norm=1.0)
        def step(p, batch, ks):
            b = batch["mask"].shape[0]
            grad_sum, stats = clipped_sum(loss_fn, p, batch, ks["data"], clipping=clipping, microbatch_size=b)
            noisy = noise.privatize(grad_sum, noise.noise_key(ks["noise"], 0), noise_multiplier=1.0,
                                    clip_norm=engine.sensitivity(clipping, p), expected_batch_size=float(b))
            return jax.tree.map(lambda x, g: x - lr * g.astype(x.dtype), p, noisy), jnp.mean(stats["loss"])

    step_keys = {"data": jax.random.key(0), "noise": keys.noise_base_key(keys.RunSecret.generate())}
    return jax.jit(step), params, make_batch, step_keys


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


# ------------------------------------------------------------------ workers: the compilation cache

#: jax.monitoring event of a persistent-cache hit (jax/_src/compiler.py, jax 0.10 and 0.11).
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


def use_compilation_cache(path: str) -> list[int]:
    """Point this process's persistent XLA compilation cache at `path`, caching every executable;
    returns a one-element list that counts the cache hits from now on."""
    import jax
    import jax.monitoring

    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    hits = [0]

    def listener(event: str, **_: Any) -> None:
        if event == CACHE_HIT_EVENT:
            hits[0] += 1
    jax.monitoring.register_event_listener(listener)
    return hits


# ------------------------------------------------------------------ compile worker

def _compile_one(step: Any, params: Any, step_keys: dict, b: int, resolution: int, limit: int | None
                 ) -> tuple[dict, Any]:
    """Lower and compile the step at batch size b; returns (record, executable or None). Times are
    wall seconds since the epoch (``compile_start`` is the lowering's start); sizes in MiB."""
    start = time.time()
    try:
        lowered = step.lower(params, batch_spec(b, resolution), step_keys)
    except Exception as e:  # noqa: BLE001 - recorded as the size's status
        return {"batch": b, "status": "error", "cause": f"at lowering: {_first_line(e)}",
                "compile_start": start, "compile_end": time.time()}, None
    lowered_at = time.time()
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - recorded as the size's status
        return {"batch": b, "status": "oom" if _is_oom(e) else "error", "cause": f"at compile: {_first_line(e)}",
                "compile_start": start, "compile_end": time.time(), "lower_s": lowered_at - start}, None
    end = time.time()
    rec = {"batch": b, "status": "compiled", "compile_start": start, "compile_end": end,
           "lower_s": lowered_at - start, "xla_compile_s": end - lowered_at, "compile_s": end - start}
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


def compile_sizes(args: argparse.Namespace, step: Any, params: Any, step_keys: dict) -> None:
    """Compile every batch size, smallest first, into the cache; one record per size appended to
    ctl/compiled.jsonl as it finishes. A size whose bytes, extrapolated from the two previous
    sizes' predictions, exceed the limit is not compiled (``oom_predicted``), nor are larger ones;
    after a size out of memory at compile, neither are larger ones."""
    limit = memory_limit_bytes(args.memory_limit_mib)
    out = os.path.join(args.ctl, "compiled.jsonl")
    points: dict[int, float] = {}
    stop: str | None = None
    for b in sorted(args.batches):
        base = {"batch": b, "memory_limit_mib": limit / MIB if limit is not None else None}
        # the summary's estimate, made from the sizes compiled so far (all below the limit)
        est, a, c = estimate_max_batch(points, limit) if limit is not None else (None, None, None)
        if stop is None and est is not None and b > est:
            stop = (f"extrapolated {(a + c * b) / MIB:.0f} MiB (line through b={sorted(points)[-2]} and "
                    f"b={sorted(points)[-1]}) > memory limit {limit / MIB:.0f} MiB; not compiled")
        if stop is not None:
            _append(out, {**base, "status": "oom_predicted", "cause": stop})
            continue
        rec, _ = _compile_one(step, params, step_keys, b, args.resolution, limit)
        _append(out, {**base, **rec})
        if "predicted_mib" in rec:
            points[b] = rec["predicted_mib"] * MIB
        if rec["status"] in ("oom", "oom_predicted"):
            stop = f"not compiled: b={b} was {rec['status']}"


def run_compile_worker(args: argparse.Namespace) -> int:
    """One (model, method): compile every size into the cache, write ctl/ready.json, exit."""
    import jax
    use_compilation_cache(args.cache)
    try:
        step, params, _, step_keys = make_step(args.model, args.method, args.resolution, args.dtype)
        compile_sizes(args, step, params, step_keys)
    except Exception as e:  # noqa: BLE001 - the driver turns this into error rows
        _write_atomic(os.path.join(args.ctl, "ready.json"), {"error": _first_line(e)})
        traceback.print_exc()
        return 0
    _write_atomic(os.path.join(args.ctl, "ready.json"),
                  {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind)})
    return 0


# ------------------------------------------------------------------ timing worker

def time_one(compiled: Any, params: Any, batch: dict, step_keys: dict, iters: int) -> list[float]:
    """One warm-up call, then `iters` timed calls; seconds per call."""
    import jax
    jax.block_until_ready(compiled(params, batch, step_keys))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(compiled(params, batch, step_keys))
        times.append(time.perf_counter() - t)
    return times


def run_timing_worker(args: argparse.Namespace) -> int:
    """One (model, method), alone on the device: per size (increasing), load the executable from the
    cache (lower + compile; ``cache_hit`` says whether XLA's compile was skipped) and time it within
    ``--allowance-s`` seconds of the start; one record per size to ctl/timed.jsonl. A size is not
    started when ~1.25x its expected time (the last size's load + timing scaled by the batch ratio)
    is not left; after an out-of-memory size, larger ones are not run."""
    import jax
    begin = time.time()
    hits = use_compilation_cache(args.cache)
    out = os.path.join(args.ctl, "timed.jsonl")
    try:
        step, params, make_batch, step_keys = make_step(args.model, args.method, args.resolution, args.dtype)
    except Exception as e:  # noqa: BLE001 - one error row per size
        for b in args.batches:
            _append(out, {"batch": b, "status": "error", "cause": f"timing worker failed: {_first_line(e)}"})
        traceback.print_exc()
        return 0
    last, oom_at = None, None
    for b in sorted(args.batches):
        if oom_at is not None:
            _append(out, {"batch": b, "status": "oom", "cause": f"not run: b={oom_at} ran out of memory"})
            continue
        need = last[1] * b / last[0] if last else 0.0
        left = begin + args.allowance_s - time.time()
        if 1.25 * need > left:
            _append(out, {"batch": b, "status": "time_budget",
                          "cause": f"needs ~{need:.1f} s, {left:.1f} s of the worker's timing allowance left"})
            continue
        start = time.time()
        try:
            lowered = step.lower(params, batch_spec(b, args.resolution), step_keys)
            hits0 = hits[0]  # hits of this executable alone (lowering may compile small helpers)
            compiled = lowered.compile()
            hit = hits[0] > hits0
            loaded = time.time()
            batch = make_batch(b)
            times = time_one(compiled, params, batch, step_keys, args.iters)
        except Exception as e:  # noqa: BLE001 - out of memory or error: a row, the next sizes go on
            _append(out, {"batch": b, "status": "oom" if _is_oom(e) else "error", "cause": _first_line(e),
                          "timed_start": start, "timed_end": time.time()})
            oom_at = b if _is_oom(e) else None
            if not _is_oom(e):
                traceback.print_exc()
            continue
        end = time.time()
        del batch, compiled
        stats = jax.devices()[0].memory_stats() or {}
        median = statistics.median(times)
        _append(out, {"batch": b, "status": "ok", "examples_per_s": b / median, "step_s": median,
                      "step_s_min": min(times), "iters": args.iters, "load_s": loaded - start,
                      "cache_hit": hit, "timed_start": loaded, "timed_end": end,
                      "device_peak_mib": (stats["peak_bytes_in_use"] / MIB if "peak_bytes_in_use" in stats
                                          else None)})
        last = (b, end - start)
    return 0


# ------------------------------------------------------------------ driver

class Worker:
    """One (model, method): its control directory and its compile, then timing, worker process."""

    def __init__(self, args: argparse.Namespace, model: str, method: str, root: str):
        self.model, self.method, self.resolution = model, method, {**FULL, **SMOKE}[model]
        self.args, self.root = args, root
        self.ctl = os.path.join(args.out, "ctl", f"{model}__{method}")
        os.makedirs(self.ctl, exist_ok=True)
        for name in ("compiled.jsonl", "timed.jsonl", "ready.json", "log_compile.txt", "log_time.txt"):
            if os.path.exists(os.path.join(self.ctl, name)):
                os.remove(os.path.join(self.ctl, name))
        self.proc: subprocess.Popen | None = None
        self.log: Any = None
        self.log_path = ""
        #: why the driver stopped the compile worker, or why it failed (a status and a cause): the
        #: status of the sizes it did not compile.
        self.compile_fate: tuple[str, str] | None = None
        #: why the driver stopped or skipped the timing worker (a status and a cause), if it did:
        #: the status of the compiled sizes it did not time.
        self.fate: tuple[str, str] | None = None
        self.go_at: float | None = None
        self.end_at: float | None = None

    def start(self, phase: str, batches: list[int], allowance_s: float = 0.0) -> None:
        """Start the worker process of `phase` ("compile" or "time") for `batches`."""
        a = self.args
        cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--worker", phase, "--model", self.model,
               "--method", self.method, "--resolution", str(self.resolution), "--batches", *map(str, batches),
               "--iters", str(a.iters), "--dtype", a.dtype, "--ctl", self.ctl,
               "--cache", os.path.join(a.out, "ctl", "xla_cache"), "--allowance-s", repr(allowance_s)]
        if a.memory_limit_mib:
            cmd += ["--memory-limit-mib", str(a.memory_limit_mib)]
        env = dict(os.environ)
        if phase == "compile":  # autotuning's device buffers freed at once, not pooled while others work
            env["XLA_PYTHON_CLIENT_ALLOCATOR"] = "platform"
        self.log_path = os.path.join(self.ctl, f"log_{phase}.txt")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ready(self) -> bool:
        return os.path.exists(os.path.join(self.ctl, "ready.json"))

    def kill(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.log.close()

    def runnable(self) -> list[int]:
        """The sizes compiled and within the memory limit."""
        return [r["batch"] for r in _read_jsonl(os.path.join(self.ctl, "compiled.jsonl"))
                if r["status"] == "compiled"]

    def last_log_line(self) -> str:
        with open(self.log_path) as f:
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
        row.update(worker_timing_start=w.go_at, worker_timing_end=w.end_at)
        if b in timed or (b in compiled and compiled[b]["status"] != "compiled"):
            pass  # the worker's own status
        elif "error" in ready:
            row.update(status="error", cause=f"worker failed: {ready['error']}")
        elif b not in compiled:
            status, cause = w.compile_fate or ("error", "the compile worker recorded nothing for this size")
            row.update(status=status, cause=cause)
        else:
            status, cause = w.fate or ("error", "the timing worker recorded nothing for this size")
            row.update(status=status, cause=cause)
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
               "ratio_vs_best_nonprivate", "predicted_mib", "xla_temp_mib", "device_peak_mib", "compile_s", "load_s",
               "cache_hit", "cause"]
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
    """Wait until every compile worker has exited or the deadline (time.monotonic()) passes; kill
    those still compiling then (the sizes they compiled stay timeable); a worker that exited
    without ready.json gets its fate."""
    while time.monotonic() < deadline and any(w.running() for w in workers):
        time.sleep(0.1)
    for w in workers:
        still = w.running()
        w.kill()
        if still:
            w.compile_fate = ("compile_time_budget", "not compiled before the compile deadline; compile worker stopped")
        elif not w.ready():
            w.compile_fate = ("error", f"compile worker exit {w.proc.returncode}: {w.last_log_line()}")


def time_workers(args: argparse.Namespace, workers: list[Worker], end: float, report: Any) -> None:
    """Start one timing worker at a time (non-private first) for each worker with compiled sizes,
    each with an equal share of the time left before `end` (time.monotonic()); reports after each."""
    queue = [w for m in METHODS for w in workers if w.method == m and w.runnable()
             and "error" not in (_read_json(os.path.join(w.ctl, "ready.json")) or {})]
    for i, w in enumerate(queue):
        left = end - time.monotonic()
        if left < 1.0:
            w.fate = ("time_budget", "the timing phase ran out before this worker's turn")
            continue
        allowance = left / (len(queue) - i)
        w.go_at = time.time()
        w.start("time", w.runnable(), allowance)
        try:
            # The worker stops starting sizes at its allowance; one size in progress may overrun it.
            w.proc.wait(timeout=max(min(1.5 * allowance + 5.0, left), 1.0))
        except subprocess.TimeoutExpired:
            w.fate = ("timeout", f"timing worker still running after its hard limit ({1.5 * allowance + 5.0:.0f} s)")
        except BaseException:  # SIGTERM (the outer `timeout`) or Ctrl-C: rows say so, then the driver stops
            w.fate = ("timeout", "the check was stopped while this worker was timing")
            w.kill()
            w.end_at = time.time()
            raise
        w.kill()
        w.end_at = time.time()
        if w.fate is None and w.proc.returncode != 0:
            w.fate = ("error", f"timing worker exit {w.proc.returncode}: {w.last_log_line()}")
        report()


def run_driver(args: argparse.Namespace) -> int:
    """Start every compile worker, wait for the compile phase, time workers one at a time, write reports."""
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
    if not args.memory_limit_mib:
        # The device's bytes_limit as the timing workers' (pooling) allocator sees it; the compile
        # workers' platform allocator may not report one.
        limit = memory_limit_bytes(None)
        args.memory_limit_mib = limit / MIB if limit is not None else None
    workers = [Worker(args, m, meth, root) for m in models for meth in args.methods]
    for w in workers:
        w.start("compile", args.batches)
    try:
        return drive(args, workers, start)
    finally:
        for w in workers:
            w.kill()


def drive(args: argparse.Namespace, workers: list[Worker], start: float) -> int:
    """The driver's two phases after the compile workers started; returns the exit code."""
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
            if w.fate is None and w.go_at is None and w.runnable():
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
    ap.add_argument("--smoke", action="store_true", help="tiny models (nfnet_nano, vit_micro), runs on CPU")
    ap.add_argument("--allow-cpu", action="store_true", help="run the full models on CPU anyway")
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS,
                    help=f"default {' '.join(DEFAULT_METHODS)}; also bookkeeping_ghost (ghost norms for every layer), "
                         "bookkeeping_bytes (routes by bytes written)")
    ap.add_argument("--batches", nargs="+", type=int, default=None,
                    help=f"batch sizes (= DP microbatch) of every model and method (default {BATCHES['full']}, "
                         f"--smoke {BATCHES['smoke']})")
    ap.add_argument("--iters", type=int, default=3, help="timed calls per batch size (after one warm-up)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--memory-limit-mib", type=float, default=None,
                    help="device memory limit for the out-of-memory prediction (default: the device's bytes_limit)")
    # worker mode (one model and method; started by the driver)
    ap.add_argument("--worker", choices=("compile", "time"), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--resolution", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--ctl", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    ap.add_argument("--allowance-s", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if (args.iters < 1 or args.budget_s <= 0 or not 0 < args.compile_s < args.budget_s
            or any(b < 1 for b in args.batches or [])
            or (args.memory_limit_mib is not None and args.memory_limit_mib <= 0)):
        ap.error("--iters >= 1, 0 < --compile-s < --budget-s, --batches >= 1 and --memory-limit-mib > 0 are required")
    if args.worker == "compile":
        return run_compile_worker(args)
    if args.worker == "time":
        return run_timing_worker(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` -> finally: kill the workers
    return run_driver(args)


if __name__ == "__main__":
    raise SystemExit(main())
