"""Updates at the virtual batch sizes the recipe promises (up to 262,144 examples per update).

    python -m benchmarks.virtual_batch [--batches 4096,16384,65536,262144] [--physical 4096] [--json OUT]

Each expected batch size B runs in its own subprocess (its own memory high-water mark): a micro
model (a linear layer over 8x8x3 synthetic images, 100 classes: 19,300 coordinates), N = 2B
synthetic in-memory examples (q = 0.5), the production step (`dpft.train.step`: per-example clipped gradients
accumulated over ceil(|selection| / physical) physical batches, one psum, noise once, divided by B).
One warm-up update compiles; the timed update follows. Reported per B: seconds per update,
microseconds per example (constant when time is linear in B), peak RSS less the in-memory data
set of 2B examples (flat when the accumulation holds one physical batch at a time), and the noise check: the update of a run
with sigma > 0 minus the same update with sigma = 0 (same secret, same selection) is the noise
divided by B; its standard deviation over the D coordinates must be sigma * C / B within the
sampling error sqrt(1 / (2 D)) (4 standard errors allowed).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

RES, CHANNELS, CLASSES = 8, 3, 100
SIGMA, CLIP = 1.3, 1.0


def one(batch: int, physical: int) -> dict:
    """Runs in a fresh process: time, peak memory and the noise check at expected batch `batch`."""
    import jax
    import numpy as np
    import optax
    from flax import nnx

    from benchmarks import common
    from dpft import distributed
    from dpft.models import layers
    from dpft.privacy import adapters, engine, keys, sampling
    from dpft.privacy import plan as plan_lib
    from dpft.train import step as step_lib

    n = 2 * batch
    rs = np.random.default_rng(0)
    images = rs.standard_normal((n, RES * RES * CHANNELS), dtype=np.float32)  # no float64 transient
    labels = rs.integers(0, CLASSES, n, dtype=np.int32)

    class Micro(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.linear = layers.Linear(RES * RES * CHANNELS, CLASSES, init=layers.ParamInit.from_rngs(rngs))

        def __call__(self, x, train: bool = False, key=None):
            return self.linear(x)

    loss_fn, params, _ = adapters.nnx_loss_fn(Micro(nnx.Rngs(0)), adapters.softmax_cross_entropy_loss)
    mesh = distributed.make_data_mesh()
    secret = keys.RunSecret.insecure_fixed(3)
    results = {}
    for sigma in (0.0, SIGMA):
        plan = plan_lib.fixed_plan(clipping=engine.ClippingConfig(mode="flat", clip_norm=CLIP),
                                   noise_multiplier=sigma, expected_batch_size=float(batch), params=params,
                                   secret=secret, num_examples=n, grad_method="bookkeeping")
        cfg = step_lib.StepConfig(plan=plan, microbatch_size=min(physical, 1024) // jax.local_device_count())
        accumulate = step_lib.make_accumulate_fn(loss_fn, cfg, mesh)
        apply = step_lib.make_apply_fn(optax.sgd(1.0), cfg, mesh)
        state = distributed.replicate(step_lib.init_state(params, optax.sgd(1.0), cfg), mesh)
        seconds, selected = [], 0
        for u in range(2):  # update 0 compiles, update 1 is timed
            t0 = time.perf_counter()
            sel = plan.selection(u)  # the plan's secret Poisson selection: the same for both sigmas
            acc = step_lib.zeros_accumulator(state["params"], mesh)
            before = jax.tree.map(np.asarray, state["params"])
            for idx, mask in sampling.physical_batches(sel, physical):
                rows = np.maximum(idx, 0)
                b = {"image": images[rows][:, None, :], "label": labels[rows][:, None], "mask": mask,
                     "example_id": idx.astype(np.int32)}
                acc, _ = accumulate(state["params"], acc, distributed.shard_batch(b, mesh), keys.dropout_key(0, u))
            state, _ = apply(state, acc, plan.noise_base_key())
            after = jax.block_until_ready(jax.tree.map(np.asarray, state["params"]))
            seconds.append(time.perf_counter() - t0)
            selected = len(sel)
        delta = np.concatenate([np.ravel(b - a) for b, a in zip(jax.tree.leaves(before), jax.tree.leaves(after))])
        results[sigma] = {"seconds": seconds[-1], "selected": selected, "step": delta}
    noise = results[SIGMA]["step"] - results[0.0]["step"]  # = noise / B (lr 1, same clipped sum)
    d = noise.size
    std, expected = float(np.std(noise)), SIGMA * CLIP / batch
    return {"expected_batch": batch, "selected": results[SIGMA]["selected"], "physical": physical,
            "physical_batches": math.ceil(results[SIGMA]["selected"] / physical),
            "seconds_per_update": results[SIGMA]["seconds"],
            "us_per_example": 1e6 * results[SIGMA]["seconds"] / max(results[SIGMA]["selected"], 1),
            "peak_rss_mib": common.maxrss_mib(), "data_mib": (images.nbytes + labels.nbytes) / 2**20,
            "peak_rss_minus_data_mib": common.maxrss_mib() - (images.nbytes + labels.nbytes) / 2**20,
            "noise_std": std, "noise_std_expected": expected,
            "noise_std_rel_error": std / expected - 1, "noise_std_tolerance": 4 * math.sqrt(1 / (2 * d)),
            "coordinates": d}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="4096,16384,65536,262144", help="expected batch sizes B")
    parser.add_argument("--physical", type=int, default=4096, help="physical batch (examples per accumulate call)")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # child process: one B
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one(args.one, args.physical)))
        return 0
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        out = subprocess.run([sys.executable, "-m", "benchmarks.virtual_batch", "--one", str(b),
                              "--physical", str(args.physical)], capture_output=True, text=True,
                             env=dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu")))
        if out.returncode != 0:
            raise SystemExit(f"B={b} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        ok = abs(r["noise_std_rel_error"]) <= r["noise_std_tolerance"]
        print(f"B={b:>7}: {r['selected']:>7} selected, {r['physical_batches']:>3} physical batches, "
              f"{r['seconds_per_update']:.2f} s/update, {r['us_per_example']:.1f} us/example, "
              f"peak RSS {r['peak_rss_mib']:.0f} MiB ({r['peak_rss_minus_data_mib']:.0f} MiB without the "
              f"{r['data_mib']:.0f} MiB data set), noise std {r['noise_std']:.3e} vs sigma*C/B "
              f"{r['noise_std_expected']:.3e} ({100 * r['noise_std_rel_error']:+.2f}%, "
              f"{'ok' if ok else 'WRONG'} within {100 * r['noise_std_tolerance']:.2f}%)", flush=True)
        if not ok:
            raise SystemExit("noise std differs from sigma * C / B")
    if args.json:
        from benchmarks import common
        with open(args.json, "w") as f:
            json.dump({"machine": common.machine_info(), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
