"""The patient as the privacy unit: its DP step vs the example-level DP step on the same images.

    python -m benchmarks.patient_unit [--models nfnet_nano nfnet_tiny] [--images 64] [--cap 4]
        [--microbatch-images 16] [--iters 5] [--json out.json]

The same `images` images (K = 1 view each), the same engine and model, timed round-robin (median of
`iters` calls of the jitted step: clipped sum, noise once, SGD update; `benchmarks.dp_overhead.make_step`'s
body over the production plan):
* "example": one unit row per image (`images` rows), microbatch `microbatch_images` rows;
* "patient_full": `images / cap` patients of exactly `cap` images (no empty slot), the same images per
  microbatch;
* "patient_padded": the images dealt to patients of 1..cap images (sizes cycling 1..cap, so about half
  of the slots are empty padding, as with a cap that keeps 95% of a skewed data set), the same number of
  unit rows per microbatch as patient_full.
Reports images/s, patients/s and `ratio_vs_example` (step time of example / this layout: >= 0.9 is the
goal of issue 30 for patient_full, CPU).
"""
from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from benchmarks import common


def patient_batch(batch: dict, sizes: list[int], cap: int) -> dict:
    """Unit rows [P, cap, ...] of `batch`'s images (K = 1) dealt in order to patients of `sizes`; the empty
    slots repeat the patient's last image with weight 0."""
    import jax.numpy as jnp
    images, labels = np.asarray(batch["image"])[:, 0], np.asarray(batch["label"])[:, 0]
    rows, start = [], 0
    for s in sizes:
        idx = list(range(start, start + s)) + [start + s - 1] * (cap - s)
        rows.append((idx, [1.0] * s + [0.0] * (cap - s)))
        start += s
    return {"image": jnp.asarray(np.stack([images[i] for i, _ in rows])),
            "label": jnp.asarray(np.stack([labels[i] for i, _ in rows])),
            "view_weight": jnp.asarray(np.asarray([w for _, w in rows], np.float32)),
            "mask": jnp.ones((len(rows),), jnp.float32), "example_id": jnp.arange(len(rows), dtype=jnp.int32)}


def bench(name: str, images: int, cap: int, microbatch_images: int, iters: int, method: str) -> list[dict[str, Any]]:
    import jax

    from benchmarks.dp_overhead import make_step
    setup = common.make_setup(name, images)
    full = [cap] * (images // cap)
    cycle = [1 + i % cap for i in range(images)]
    padded = []
    for s in cycle:  # sizes 1, 2, ..., cap, 1, ... covering exactly `images` images
        if sum(padded) + s > images:
            s = images - sum(padded)
        if s:
            padded.append(s)
    rows_per_micro = max(1, microbatch_images // cap)
    npad = -(-len(padded) // rows_per_micro) * rows_per_micro  # whole microbatches: pad with empty patients
    layouts = {"example": (setup.batch, microbatch_images, images),
               "patient_full": (patient_batch(setup.batch, full, cap), rows_per_micro, len(full)),
               "patient_padded": (patient_batch(setup.batch, padded, cap), rows_per_micro, len(padded))}
    pb = layouts["patient_padded"][0]
    if npad > len(padded):  # padding units (mask 0) so that the microbatch size divides the rows
        extra = npad - len(padded)
        pb = {k: jax.numpy.concatenate([v, jax.numpy.zeros((extra,) + v.shape[1:], v.dtype)]) for k, v in pb.items()}
        layouts["patient_padded"] = (pb, rows_per_micro, len(padded))
    key = jax.random.key(0)
    fns = {}
    for layout, (batch, micro, _) in layouts.items():
        step = make_step(setup, method, micro)
        fns[layout] = (lambda p, k, step=step, batch=batch: step(p, batch, k))
        jax.block_until_ready(fns[layout](setup.params, key))  # compile + warm up
    times = common.time_round_robin(fns, (setup.params, key), iters)
    out = []
    for layout, (batch, micro, units) in layouts.items():
        row = {"model": name, "method": method, "layout": layout, "images": images, "units": units,
               "unit_rows": int(batch["mask"].shape[0]), "cap": 1 if layout == "example" else cap,
               "microbatch_rows": micro, "step_s": times[layout], "images_per_s": images / times[layout],
               "units_per_s": units / times[layout], "ratio_vs_example": times["example"] / times[layout]}
        out.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["nfnet_nano", "nfnet_tiny"])
    parser.add_argument("--methods", nargs="+", default=["bookkeeping", "vmap"])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--cap", type=int, default=4)
    parser.add_argument("--microbatch-images", type=int, default=16)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    rows = [r for m in args.models for method in args.methods
            for r in bench(m, args.images, args.cap, args.microbatch_images, args.iters, method)]
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"machine": common.machine_info() if hasattr(common, "machine_info") else None, "rows": rows},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
