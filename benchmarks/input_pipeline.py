"""Input-pipeline throughput: decoded training images/s at 224x224 (JPEG decode + random
resized crop + flip, K=1) through `dpft.data.pipeline.TrainIterator`, for 0 and 2 workers.

    python benchmarks/input_pipeline.py [--n 256] [--source-size 320 390] [--workers 0 2]

Writes JPEGs like CheXpert-small's (about 320x390, grey, smooth content) into a temp dir.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
from PIL import Image

from dpft.data.augment import AugmentConfig
from dpft.data.base import TableMeta, from_records
from dpft.data.pipeline import TrainConfig, TrainIterator


def write_images(root: str, n: int, size: tuple[int, int], seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    paths = []
    for i in range(n):
        base = 128 + 60 * np.sin(xx / (10 + i % 7)) * np.cos(yy / (13 + i % 5))
        img = np.clip(base + rng.normal(0, 12, (h, w)), 0, 255).astype(np.uint8)
        p = os.path.join(root, f"{i:05d}.jpg")
        Image.fromarray(img, mode="L").save(p, quality=90)
        paths.append(p)
    return paths


def bench(paths: list[str], workers: int, batch: int, repeats: int) -> float:
    meta = TableMeta(name="bench", task="multiclass", class_names=("a", "b"))
    table = from_records([{"example_id": i, "patient_id": str(i), "image": p, "label": i % 2, "attrs": {}}
                          for i, p in enumerate(paths)], split="train", meta=meta)
    aug = AugmentConfig(image_size=224, crop="random_resized", flip=True, augmult=1)
    it = TrainIterator(table, TrainConfig(sampling_rate=1.0, physical_batch_size=batch, num_workers=workers, selection_seed=0), aug)
    list(it.batches_for_update(0))  # warm-up (file cache, imports)
    t0, count = time.perf_counter(), 0
    for u in range(1, repeats + 1):
        for b in it.batches_for_update(u):
            count += int(b["mask"].sum())
    return count / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--source-size", type=int, nargs=2, default=(320, 390), metavar=("H", "W"))
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        paths = write_images(d, args.n, tuple(args.source_size))
        results = {f"workers={w}": round(bench(paths, w, args.batch, args.repeats), 1) for w in args.workers}
    print(json.dumps({"images_per_s_224": results, "cpus": os.cpu_count(), "source_size": list(args.source_size),
                      "n": args.n}, indent=1))


if __name__ == "__main__":
    main()
