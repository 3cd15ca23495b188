"""Scaling: DP-step examples/s vs number of (fake CPU) devices, through dpft.train.step.

    python -m benchmarks.scaling [--devices 1 2 4 8] [--batch 32] [--iters 3] [--json out.json]

Each device count runs in its own subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=N (the flag must precede jax's import). The timed
unit is one update: `make_accumulate_fn` (per-device clipped sums under shard_map) on one global batch
+ `make_apply_fn` (psum, noise once, SGD). On a 2-core CPU the fake devices share the same cores, so
this shows the sharding overhead, not a speed-up.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def child(devices: int, batch: int, iters: int, model: str) -> dict:
    import time

    import jax
    import optax

    from benchmarks import common
    from dpft.privacy import engine, keys
    from dpft.privacy import plan as plan_lib
    from dpft import distributed
    from dpft.train import step as step_lib
    assert len(jax.devices()) == devices, (jax.devices(), devices)
    setup = common.make_setup(model, batch)
    mesh = jax.make_mesh((devices,), (step_lib.DATA_AXIS,))
    per_device = batch // devices
    clipping = engine.ClippingConfig(mode="flat", clip_norm=1.0)
    plan = plan_lib.fixed_plan(clipping=clipping, noise_multiplier=1.0, expected_batch_size=float(batch),
                               params=setup.params, secret=keys.RunSecret.generate(), grad_method="bookkeeping")
    cfg = step_lib.StepConfig(plan=plan, microbatch_size=per_device)
    noise_key = plan.noise_base_key()
    opt = optax.sgd(0.1)
    accumulate = step_lib.make_accumulate_fn(setup.loss_fn, cfg, mesh)
    apply = step_lib.make_apply_fn(opt, cfg, mesh)
    state = step_lib.init_state(distributed.replicate(setup.params, mesh), opt, cfg)
    gbatch = distributed.shard_batch({k: jax.device_get(v) for k, v in setup.batch.items()}, mesh)
    key = distributed.replicate(jax.random.key(0), mesh)

    def update(state):
        acc = step_lib.zeros_accumulator(state["params"], mesh)
        acc, _ = accumulate(state["params"], acc, gbatch, key)
        state, _ = apply(state, acc, noise_key)
        return jax.block_until_ready(state)

    t0 = time.perf_counter()
    state = update(state)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        state = update(state)
        times.append(time.perf_counter() - t)
    times.sort()
    med = times[len(times) // 2]
    return {"model": model, "devices": devices, "batch": batch, "microbatch": cfg.microbatch_size,
            "examples_per_s": batch / med, "step_s": med, "first_call_s": compile_s}


def run(device_counts: list[int], batch: int, iters: int, model: str, timeout: float = 600) -> list[dict]:
    rows = []
    for n in device_counts:
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu")
        cmd = [sys.executable, "-m", "benchmarks.scaling", "--child", str(n), "--batch", str(batch),
               "--iters", str(iters), "--model", model]
        try:
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
            line = [l for l in out.stdout.splitlines() if l.startswith("{")]
            row = json.loads(line[-1]) if line else {"devices": n, "error": out.stderr[-500:]}
        except subprocess.TimeoutExpired:
            row = {"devices": n, "error": f"timeout after {timeout} s"}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--model", default="nfnet_tiny")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.batch, args.iters, args.model)))
        return 0
    rows = run(args.devices, args.batch, args.iters, args.model)
    from benchmarks import common  # imported late: jax must not load before XLA_FLAGS is set
    return common.emit_rows(rows, args.json, echo=False)


if __name__ == "__main__":
    raise SystemExit(main())
