"""What the DP step costs XLA, read from the compiled programs alone: compile only, nothing runs,
so a CPU shows the programs of the GPU shapes (NFNet-F0 192 px, ViT-B/16 224 px, batch 128, bf16).

    python -m benchmarks.cost_model [--models nfnet_f0 vit_b16] [--batch 16 128] [--dtype bfloat16]
                                    [--ghost auto bytes] [--programs batched_backward bk_full_dp ...]
                                    [--no-layers] [--json out.json]

Programs, one microbatch of B examples (K = 1), parameters, batch and keys as arguments (never
compile-time constants, as in training):
  batched_backward   the non-private gradient: jax.grad of the summed loss
  bk_tap_pass        book-keeping's forward + backward w.r.t. the layer outputs (no weight gradients)
  bk_norms           per-example norms from the tap pass's layer inputs and output gradients
  bk_norms_and_sum   the norms and the clipped sum from them
  bk_clipped_sum     `bookkeeping.bk_clipped_grad_sum` (tap pass, norms and clipped sum in one program)
  noise_flat         `noise.privatize` of ONE float32 vector with the model's parameter count
  bk_full_dp         bk_clipped_sum + `noise.privatize` of the parameter tree: the DP step as it runs
The book-keeping programs are compiled once per route rule of ``--ghost`` (`bk_layers.use_ghost`:
"auto" = fewer flops, the rule training uses; "bytes" = fewer bytes written; column ``ghost``).
Per program: compile seconds (`lowered.compile()`; the persistent compilation cache is off), XLA's
cost analysis (flops, bytes accessed) and memory analysis (temp, argument, output bytes), and each as
a ratio to ``batched_backward``.

XLA's cost analysis overcounts the noise of a parameter *tree*: the draw is one stream cut into the
leaves, and each leaf's slice is costed at the stream's full size (measured: flops per parameter 184,
1,012 and 9,112 for 1, 10 and 100 leaves of one 2M draw, while its run time stays 70-102 ns per
parameter). So the flops and bytes of the DP step are read as bk_clipped_sum + noise_flat (row
``dp_step``), its compile time and temp memory from bk_full_dp. Issue 33's goals for ``dp_step``:
bytes accessed <= 1.5x, temp <= 1.3x, compile <= 1.5x.

Per tapped layer (``--no-layers`` leaves it out): the route each rule takes (`bk_layers.use_ghost`
"auto" and "bytes"), both routes' flops for one example's norm and the bytes each route writes per
example (`bk_layers.matmul_cost`, times the groups): the materialised float32 per-example gradient,
groups x n x o x 4, against the ghost norm's two float32 Gram matrices, groups x 2 x R^2 x 4. The
totals at batch B say how many bytes the flop rule writes and how many the byte rule does. The shapes are read by tracing each layer's own norm function
(`bookkeeping.op_norms`) and recording its `matmul_flops` calls, so the table follows the code.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable
from unittest import mock

from benchmarks import common

#: The programs compiled by default: the non-private step, the DP step and its book-keeping pieces.
PROGRAMS = ("batched_backward", "bk_tap_pass", "bk_norms", "bk_norms_and_sum", "bk_clipped_sum", "noise_flat",
            "bk_full_dp")
BASELINE = "batched_backward"
#: The DP step's row: flops and bytes of bk_clipped_sum + noise_flat, compile seconds and temp bytes of bk_full_dp.
DP_STEP = "dp_step"
#: Issue 33's goals for the DP step against the non-private one (compile only, CPU, GPU shapes).
GOALS = {"bytes_accessed": 1.5, "temp_bytes": 1.3, "compile_s": 1.5}


def program_costs(fn: Callable, *args: Any) -> dict[str, float]:
    """Compile ``fn`` (a jitted function) for ``args`` (arrays or ShapeDtypeStructs) without running
    it: compile seconds, flops and bytes accessed (XLA cost analysis), temp / argument / output /
    generated-code bytes (XLA memory analysis)."""
    lowered = fn.lower(*args)
    t0 = time.perf_counter()
    compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per partition
        cost = cost[0]
    mem = compiled.memory_analysis()
    return {"compile_s": seconds, "flops": float(cost.get("flops", 0.0)),
            "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
            "temp_bytes": float(mem.temp_size_in_bytes), "argument_bytes": float(mem.argument_size_in_bytes),
            "output_bytes": float(mem.output_size_in_bytes), "code_bytes": float(mem.generated_code_size_in_bytes)}


def with_ratios(rows: list[dict]) -> list[dict]:
    """Adds ``<measure>_ratio`` (this program / the non-private step of the same model and batch) to
    every row; None where the non-private step is missing or its measure is 0."""
    base = {(r["model"], r["batch"]): r for r in rows if r["program"] == BASELINE}
    for r in rows:
        b = base.get((r["model"], r["batch"]))
        for k in ("compile_s", "flops", "bytes_accessed", "temp_bytes"):
            r[f"{k}_ratio"] = (r[k] / b[k]) if b is not None and b[k] else None
    return rows


def layer_routes(setup: common.Setup) -> list[dict]:
    """One row per tapped layer whose norm is a matmul norm (convolutions, dense layers): its route
    under book-keeping's rule and both routes' flops and bytes per example (see the module doc).
    Layers without a route (norm layers, generic taps) are left out."""
    import jax

    from dpft.nn import taps
    from dpft.privacy import bk_layers, bookkeeping

    views = {k: v for k, v in setup.batch.items() if k not in ("mask", "example_id")}
    keys = jax.random.split(jax.random.key(0), setup.batch["mask"].shape[0])
    specs = bookkeeping.discover_ops(setup.loss_fn.tapped, setup.params, views, keys[0])
    _, _, inputs, out_grads = jax.eval_shape(
        lambda p: bookkeeping.tap_pass(setup.loss_fn.tapped, p, specs, views, keys), setup.params)
    flat = {taps.param_path(kp): x for kp, x in jax.tree_util.tree_leaves_with_path(setup.params)}
    rows = []
    for key, spec in specs.items():
        calls: list[tuple[int, int, int]] = []
        real = bk_layers.matmul_flops

        def recording(rows_, fan_in, fan_out, _calls=calls, _real=real):
            _calls.append((int(rows_), int(fan_in), int(fan_out)))
            return _real(rows_, fan_in, fan_out)

        op_params = {n: flat[path] for n, path in spec.param_paths.items()}
        with mock.patch.object(bk_layers, "matmul_flops", recording):
            jax.eval_shape(lambda p, x, d: bookkeeping.op_norms(spec, p, x, d, "auto")[0], op_params,
                           inputs[key], out_grads[key])
        if not calls:
            continue
        r, n, o = calls[0]
        groups = _groups(spec)
        cost = bk_layers.matmul_cost(r, n, o)
        route = {rule: "ghost" if bk_layers.use_ghost(rule, cost) else "materialised" for rule in ("auto", "bytes")}
        rows.append({"model": setup.name, "layer": key, "kind": spec.kind, "rows": r, "fan_in": n, "fan_out": o,
                     "groups": groups, "route": route["auto"],
                     "ghost_flops": groups * cost.ghost_flops, "materialised_flops": groups * cost.materialised_flops,
                     "ghost_bytes": groups * cost.ghost_bytes, "materialised_bytes": groups * cost.materialised_bytes,
                     "fewer_bytes_route": route["bytes"]})
    return rows


def _groups(spec: Any) -> int:
    """Feature groups of a tapped conv (1 for dense layers)."""
    kw = getattr(spec.fn, "keywords", None) or {}
    if "groups" in kw:
        return int(kw["groups"])
    return int(getattr(spec.layer, "groups", 1) or 1)


def route_totals(layers: list[dict], batch: int) -> dict[str, Any]:
    """Bytes written at batch ``batch`` by the routes the rule takes and by the fewer-bytes routes:
    the per-example gradients of materialised layers plus the Gram matrices of ghost layers."""
    def total(route_key: str) -> float:
        return float(sum(batch * (l["ghost_bytes"] if l[route_key] == "ghost" else l["materialised_bytes"])
                         for l in layers))
    return {"layers": len(layers), "ghost_layers": sum(l["route"] == "ghost" for l in layers),
            "flop_rule_mib": total("route") / 2 ** 20, "fewer_bytes_rule_mib": total("fewer_bytes_route") / 2 ** 20,
            "materialised_gradients_mib": sum(batch * l["materialised_bytes"] for l in layers
                                              if l["route"] == "materialised") / 2 ** 20,
            "layers_that_would_change": [l["layer"] for l in layers if l["route"] != l["fewer_bytes_route"]]}


#: Programs that do not depend on book-keeping's route rule (compiled once, whatever --ghost says).
RULE_FREE = ("batched_backward", "bk_tap_pass", "noise_flat")


def programs(setup: common.Setup, names: tuple[str, ...], ghost: str = "auto") -> dict[str, tuple[Callable, tuple]]:
    """name -> (jitted fn, args) of each program in `names` (module doc), book-keeping's norms under
    route rule `ghost` (`bk_layers.use_ghost`). The args are the setup's concrete arrays, or shapes
    (`jax.eval_shape`) where they would be another program's output: `lower` takes both as
    arguments, so nothing is a compile-time constant and nothing runs."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dpft.nn import taps
    from dpft.privacy import bookkeeping, engine, noise
    from dpft.privacy.keys import RunSecret, noise_base_key

    clipping = engine.ClippingConfig(clip_norm=1.0)
    b = int(setup.batch["mask"].shape[0])
    batch = setup.batch
    keys = jax.random.split(jax.random.key(0), b)
    noise_key = noise.noise_key(noise_base_key(RunSecret.generate()), 0)

    def views_of(bt):
        return {k: v for k, v in bt.items() if k not in ("mask", "example_id")}

    specs = bookkeeping.discover_ops(setup.loss_fn.tapped, setup.params, views_of(batch), keys[0])

    def op_params(p):
        flat = {taps.param_path(kp): x for kp, x in jax.tree_util.tree_leaves_with_path(p)}
        return {k: {n: flat[path] for n, path in sp.param_paths.items()} for k, sp in specs.items()}

    def batched_backward(p, bt, ks):
        loss = lambda q: jnp.sum(jax.vmap(lambda v, k: setup.loss_fn(q, v, k)[0], in_axes=(0, 0))(views_of(bt), ks))
        return jax.grad(loss)(p)

    def tap_pass(p, bt, ks):
        return bookkeeping.tap_pass(setup.loss_fn.tapped, p, specs, views_of(bt), ks)[2:]

    def norms(p, x, d):
        return bookkeeping.per_example_norms(specs, op_params(p), x, d, ghost)[0]

    def norms_and_sum(p, x, d, mask):
        sq, summers = bookkeeping.per_example_norms(specs, op_params(p), x, d, ghost)
        weights = jnp.where(mask > 0, jnp.minimum(1.0, 1.0 / jnp.sqrt(jnp.maximum(sq, 1e-24))), 0.0)
        return sq, bookkeeping.weighted_param_grads(summers, weights)

    def clipped_sum(p, bt, key):
        return bookkeeping.bk_clipped_grad_sum(setup.loss_fn, p, bt, key, clipping=clipping, microbatch_size=b,
                                             ghost=ghost)[0]

    def privatize(g, nk):
        return noise.privatize(g, nk, noise_multiplier=1.0, clip_norm=1.0, expected_batch_size=float(b))

    def full_dp(p, bt, key, nk):
        return privatize(clipped_sum(p, bt, key), nk)

    tapped = lambda: jax.eval_shape(tap_pass, setup.params, batch, keys)
    flat_noise = jax.ShapeDtypeStruct((setup.num_params,), np.float32)
    makers = {
        "batched_backward": lambda: (batched_backward, (setup.params, batch, keys)),
        "bk_tap_pass": lambda: (tap_pass, (setup.params, batch, keys)),
        "bk_norms": lambda: (norms, (setup.params, *tapped())),
        "bk_norms_and_sum": lambda: (norms_and_sum, (setup.params, *tapped(), batch["mask"])),
        "bk_clipped_sum": lambda: (clipped_sum, (setup.params, batch, jax.random.key(0))),
        "noise_flat": lambda: (privatize, (flat_noise, noise_key)),
        "bk_full_dp": lambda: (full_dp, (setup.params, batch, jax.random.key(0), noise_key)),
    }
    unknown = sorted(set(names) - set(makers))
    if unknown:
        raise ValueError(f"cost_model: unknown programs {unknown}; choose from {sorted(makers)}")
    made = {n: makers[n]() for n in names}
    return {n: (jax.jit(fn), args) for n, (fn, args) in made.items()}


def dp_step_row(rows: list[dict], ghost: str = "auto") -> dict | None:
    """The DP step of one (model, batch) under route rule `ghost` from its programs' rows: flops and
    bytes accessed of bk_clipped_sum + noise_flat (see the module doc), compile seconds and memory
    of bk_full_dp; None unless all three were compiled."""
    by = {r["program"]: r for r in rows if r.get("ghost") in (ghost, "-")}
    if not {"bk_clipped_sum", "noise_flat", "bk_full_dp"} <= set(by):
        return None
    full = by["bk_full_dp"]
    row = {k: full[k] for k in ("model", "resolution", "batch", "dtype", "ghost", "compile_s", "temp_bytes",
                                "argument_bytes", "output_bytes", "code_bytes")}
    row.update(program=DP_STEP, flops=by["bk_clipped_sum"]["flops"] + by["noise_flat"]["flops"],
               bytes_accessed=by["bk_clipped_sum"]["bytes_accessed"] + by["noise_flat"]["bytes_accessed"])
    return row


def bench(name: str, batch: int, dtype: str | None, names: tuple[str, ...], layers: bool,
          resolution: int | None = None, ghosts: tuple[str, ...] = ("auto",)) -> tuple[list[dict], dict | None]:
    """Compile `names` of model `name` at `batch`, the book-keeping programs once per route rule in
    `ghosts`: (rows, with a dp_step row per rule where it follows; route summary or None)."""
    import jax.numpy as jnp

    setup = common.make_setup(name, batch, resolution=resolution, dtype=getattr(jnp, dtype) if dtype else None)
    rows = []
    for i, ghost in enumerate(ghosts):
        wanted = tuple(n for n in names if n not in RULE_FREE or i == 0)
        for program, (fn, args) in programs(setup, wanted, ghost).items():
            rows.append({"model": name, "resolution": int(setup.batch["image"].shape[2]), "batch": batch,
                         "dtype": dtype or "model default", "ghost": "-" if program in RULE_FREE else ghost,
                         "program": program, **program_costs(fn, *args)})
            print(json.dumps(rows[-1]), flush=True)
    for ghost in ghosts:
        dp = dp_step_row(rows, ghost)
        rows += [dp] if dp else []
    summary = None
    if layers:
        per_layer = layer_routes(setup)
        summary = {"model": name, "batch": batch, **route_totals(per_layer, batch), "per_layer": per_layer}
    return rows, summary


def goal_lines(rows: list[dict]) -> list[str]:
    """One line per (model, batch): the DP step's ratios against issue 33's goals."""
    out = []
    for r in rows:
        if r["program"] != DP_STEP:
            continue
        parts = []
        for k, limit in GOALS.items():
            v = r.get(f"{k}_ratio")
            parts.append(f"{k} {v:.2f}x (goal <= {limit}x: {'met' if v is not None and v <= limit else 'NOT met'})"
                         if v is not None else f"{k} n/a")
        out.append(f"{r['model']} batch {r['batch']} (routes: {r['ghost']}): " + ", ".join(parts))
    return out


def bk_layers_choices() -> tuple[str, ...]:
    """`bk_layers.GHOST_CHOICES` (imported when the command runs, not when this module is)."""
    from dpft.privacy import bk_layers

    return bk_layers.GHOST_CHOICES


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["nfnet_f0", "vit_b16"])
    ap.add_argument("--batch", nargs="+", type=int, default=[16, 128])
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    ap.add_argument("--resolution", type=int, default=None, help="image side, px (default: the model's)")
    ap.add_argument("--programs", nargs="+", default=list(PROGRAMS), choices=PROGRAMS,
                    help=f"programs to compile (ratios need {BASELINE}; the dp_step row needs bk_clipped_sum, "
                         "noise_flat and bk_full_dp)")
    ap.add_argument("--ghost", nargs="+", default=["auto"], choices=bk_layers_choices(),
                    help="book-keeping's route rules to compile the DP step under (auto: fewer flops, training's; "
                         "bytes: fewer bytes written)")
    ap.add_argument("--no-layers", action="store_true", help="leave out the per-layer route table")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import jax
    cache_was = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)  # compile seconds are measured, never loaded
    rows, routes = [], []
    try:
        for m in args.models:
            for b in args.batch:
                r, s = bench(m, b, args.dtype, tuple(args.programs), not args.no_layers, args.resolution,
                             tuple(dict.fromkeys(args.ghost)))
                rows += r
                routes += [s] if s else []
    finally:
        jax.config.update("jax_enable_compilation_cache", cache_was)
    with_ratios(rows)
    for r in rows:
        r["temp_mib"], r["gbytes_accessed"], r["gflops"] = r["temp_bytes"] / 2 ** 20, r["bytes_accessed"] / 1e9, r["flops"] / 1e9
    print(common.markdown_table(rows, ["model", "resolution", "batch", "dtype", "ghost", "program", "compile_s", "compile_s_ratio",
                                       "gflops", "flops_ratio", "gbytes_accessed", "bytes_accessed_ratio",
                                       "temp_mib", "temp_bytes_ratio"]))
    for s in routes:
        print(f"\n{s['model']} batch {s['batch']}: {s['ghost_layers']} of {s['layers']} matmul layers ghost; "
              f"bytes written by the routes: flop rule {s['flop_rule_mib']:.0f} MiB "
              f"(materialised per-example gradients {s['materialised_gradients_mib']:.0f} MiB), "
              f"byte rule {s['fewer_bytes_rule_mib']:.0f} MiB; "
              f"{len(s['layers_that_would_change'])} layers would change route")
    for line in goal_lines(rows):
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": common.machine_info(), "rows": rows, "routes": routes}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
