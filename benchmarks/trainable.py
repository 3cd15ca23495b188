"""Time per DP update by `config.train.trainable`: all / head / norms_and_head / lora:4, side by side.

    python -m benchmarks.trainable [--model nfnet_tiny] [--batch 32] [--iters 5] [--json OUT]

One update is what `dpft train` runs (`dpft.train.step`): `make_accumulate_fn` (the clipped
per-example sum of the trained tree, one physical batch = the whole batch, one microbatch) then
`make_apply_fn` (noise once on the trained tree, SGD, EMA), on one CPU device. Each form runs
with the engine "auto" picks (bookkeeping; vmap for LoRA) and, for a like-for-like row, with vmap.
The updates are timed round-robin (a, b, c, a, b, c, ...) so load from other processes hits all
alike. Rows: form, engine, noised parameters, model parameters, median seconds per update,
ratio to "all" with the same engine, compile + first call seconds.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import jax
import optax

from benchmarks import common

FORMS = ("all", "head", "norms_and_head", "lora:4")


def build(model_name: str, form: str, method: str, batch: int, mesh: Any) -> tuple[Any, Any, int, int]:
    """(update: state -> state, initial state, noised parameters, model parameters)."""
    import dpft.models
    from dpft import distributed
    from dpft.models import registry, trainable
    from dpft.privacy import adapters, engine, keys
    from dpft.privacy import plan as plan_lib
    from dpft.train import step as step_lib

    res, nc = common.MODELS.get(model_name, (32, 10))
    model = dpft.models.create(model_name, nc, seed=0, head_init="normal")
    loss_fn, params, _ = adapters.nnx_loss_fn(model, adapters.softmax_cross_entropy_loss)
    part = trainable.partition(form, model, params, registry.lookup(model_name).head, seed=0)
    trained = step_lib.trained_tree(params, part)
    plan = plan_lib.fixed_plan(clipping=engine.ClippingConfig(mode="flat", clip_norm=1.0), noise_multiplier=1.0,
                               expected_batch_size=float(batch), params=trained,
                               secret=keys.RunSecret.insecure_fixed(0), grad_method=method)
    cfg = step_lib.StepConfig(plan=plan, microbatch_size=batch, ema_decay=0.999, partition=part)
    opt = optax.sgd(0.1)
    accumulate = step_lib.make_accumulate_fn(loss_fn, cfg, mesh)
    apply = step_lib.make_apply_fn(opt, cfg, mesh)
    state = distributed.replicate(step_lib.init_state(params, opt, cfg), mesh)
    setup = common.make_setup(model_name, batch, resolution=res, num_classes=nc)  # the batch only
    gbatch = distributed.shard_batch({k: jax.device_get(v) for k, v in setup.batch.items()}, mesh)
    key = distributed.replicate(jax.random.key(0), mesh)
    noise_key = plan.noise_base_key()

    def update(state):
        acc = step_lib.zeros_accumulator(step_lib.trainable_part(state, cfg), mesh)
        acc, _ = accumulate(step_lib.step_input(state, cfg), acc, gbatch, key)
        state, _ = apply(state, acc, noise_key)
        return jax.block_until_ready(state)

    return update, state, plan_lib.num_scalars(trained), plan_lib.num_scalars(params)


def measure(model_name: str, batch: int, iters: int) -> list[dict]:
    from dpft.train import step as step_lib

    mesh = jax.make_mesh((1,), (step_lib.DATA_AXIS,), devices=jax.devices()[:1])
    runs: dict[tuple[str, str], dict] = {}
    for form in FORMS:
        auto = "vmap" if form.startswith("lora:") else "bookkeeping"
        for method in dict.fromkeys((auto, "vmap")):
            update, state, noised, size = build(model_name, form, method, batch, mesh)
            t0 = time.perf_counter()
            state = update(state)
            runs[(form, method)] = {"update": update, "state": state, "noised": noised, "size": size,
                                    "first_call_s": time.perf_counter() - t0, "times": []}
    for _ in range(iters):
        for r in runs.values():
            t = time.perf_counter()
            r["state"] = r["update"](r["state"])
            r["times"].append(time.perf_counter() - t)
    rows = []
    for (form, method), r in runs.items():
        med = statistics.median(r["times"])
        base = statistics.median(runs[("all", method)]["times"])
        rows.append({"model": model_name, "batch": batch, "form": form, "engine": method,
                     "noised_params": r["noised"], "model_params": r["size"], "update_s": round(med, 4),
                     "ratio_vs_all": round(med / base, 3), "first_call_s": round(r["first_call_s"], 2),
                     "iters": iters, "backend": jax.default_backend()})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="nfnet_tiny")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = measure(args.model, args.batch, args.iters)
    print(common.markdown_table(rows, ["form", "engine", "noised_params", "model_params", "update_s",
                                       "ratio_vs_all", "first_call_s"]))
    return common.emit_rows(rows, args.json, echo=False, machine=True)


if __name__ == "__main__":
    raise SystemExit(main())
