"""Shared pieces of the dpft benchmarks: model + batch set-up, timing, memory, machine info.

All timings are wall-clock seconds of a jitted function after one warm-up call, with
`jax.block_until_ready`; examples/s = batch size / median seconds per call.
"""
from __future__ import annotations

import json
import dataclasses
import datetime
import os
import platform
import resource
import statistics
import subprocess
import time
from typing import Any, Callable

import numpy as np

#: Benchmarked models: name -> (resolution in pixels, number of classes).
MODELS = {"nfnet_tiny": (32, 10), "nfnet_f0": (192, 10), "vit_ti16": (224, 10), "vit_s16": (224, 10),
          "vit_b16": (224, 10)}


def machine_info() -> dict[str, Any]:
    """Date, CPU model (lscpu), core count, Python/jax/flax versions, JAX backend."""
    import flax
    import jax
    model = platform.processor() or "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": model,
            "cores": os.cpu_count(), "load_avg_1min": round(load, 2), "python": platform.python_version(),
            "jax": jax.__version__, "flax": flax.__version__, "backend": jax.default_backend(),
            "devices": len(jax.devices())}


def maxrss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclasses.dataclass
class Setup:
    """A model as the engine sees it: pure loss, params, and a training batch [B, K=1, H, W, 3]."""
    name: str
    loss_fn: Callable
    params: Any
    batch: dict
    num_params: int
    apply: Callable | None = None  # apply(params, images [N, H, W, C], key) -> logits [N, classes]


def make_setup(name: str, batch_size: int, *, resolution: int | None = None, num_classes: int | None = None,
               seed: int = 0, dtype: Any = None, edit: Callable[[Any], None] | None = None) -> Setup:
    """dpft model `name` (fresh init, dropout/stochastic depth as configured; compute dtype
    `dtype`, default the model's; `edit(model)` applied before the parameters are split off,
    e.g. to swap a layer's function) + random batch."""
    import jax
    import jax.numpy as jnp

    import dpft.models
    from dpft.privacy import adapters
    res, nc = MODELS.get(name, (32, 10))
    res, nc = resolution or res, num_classes or nc
    model = dpft.models.create(name, nc, seed=seed, head_init="normal", **({"dtype": dtype} if dtype else {}))
    if edit is not None:
        edit(model)
    loss_fn, params, merge = adapters.nnx_loss_fn(model, adapters.softmax_cross_entropy_loss)
    rs = np.random.RandomState(seed)
    batch = {"image": jnp.asarray(rs.randn(batch_size, 1, res, res, 3), jnp.float32),
             "label": jnp.asarray(rs.randint(0, nc, (batch_size, 1)), jnp.int32),
             "mask": jnp.ones((batch_size,), jnp.float32),
             "example_id": jnp.arange(batch_size, dtype=jnp.int32)}
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    return Setup(name, loss_fn, params, batch, n, lambda p, x, key: merge(p)(x, train=True, key=key))


def time_fn(fn: Callable, *args, iters: int = 3, warmup: int = 1) -> dict[str, float]:
    """Compile + warm up `fn(*args)` then time `iters` calls. Seconds: compile (first call), median."""
    import jax
    t0 = time.perf_counter()
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return {"first_call_s": first, "median_s": statistics.median(times), "min_s": min(times), "iters": iters}


#: Method-name suffix of a per-physical-batch accumulate step (peers_same_net, peers_opacus).
ACCUMULATE_SUFFIX = "+accumulate"


def time_round_robin(fns: dict[str, Callable], args: tuple, iters: int) -> dict[str, float]:
    """Median seconds per call of each (already warm) fn, timed in turn: a, b, c, a, b, c, ..."""
    import jax
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def compiled_temp_mib(jitted: Callable, *args) -> float | None:
    """XLA's temp-buffer size of the compiled program (MiB): the working memory beyond inputs and
    outputs, i.e. the peak that a microbatch size has to fit; None where the backend has no analysis."""
    try:
        stats = jitted.lower(*args).compile().memory_analysis()
    except Exception:  # noqa: BLE001 - a backend without memory analysis
        return None
    if stats is None:
        return None
    return stats.temp_size_in_bytes / 2 ** 20


def device_peak_mib() -> float | None:
    """Peak bytes in use on device 0 (GPU/TPU), MiB; None on CPU (no memory stats)."""
    import jax
    stats = jax.devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2 ** 20


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """Rows of dicts -> a Markdown table with the given columns (floats to 3 significant digits)."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}"
        return "" if v is None else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def emit_rows(rows: list[dict], json_path: str | None, *, echo: bool = True, machine: bool = False) -> int:
    """Print each result row as one JSON line (if `echo`) and write {"rows": rows} (plus
    {"machine": machine_info()} if `machine`) to `json_path`. Returns the exit code 0."""
    if echo:
        for r in rows:
            print(json.dumps(r))
    if json_path:
        doc = {"machine": machine_info(), "rows": rows} if machine else {"rows": rows}
        with open(json_path, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


def peer_rows(peer: str, framework: str, setup: "Setup", microbatch: int, times: dict[str, float]) -> list[dict]:
    """One result row per method of a peer's timing `times` {method: seconds per step}."""
    batch = int(setup.batch["mask"].shape[0])
    return [{"peer": peer, "framework": framework, "model": setup.name,
             "resolution": int(setup.batch["image"].shape[2]), "batch": batch, "microbatch": microbatch,
             "method": k, "examples_per_s": batch / t, "step_s": t,
             "time_ratio_vs_nonprivate": t / times["nonprivate"]} for k, t in times.items()]
