"""Model builders for the DP overhead benchmark, and a forward+backward timing.

    python -m benchmarks.models_bench [--only nfnet_tiny@32] [--repeats 3]

`model_builders()` -> {"name@res": (build() -> nnx.Module, input shape (H, W, C), num_classes)}.
The timing is one jitted `jax.grad` of the mean softmax cross-entropy (train=True, so dropout
and stochastic depth are on) after a warm-up call; median wall-clock seconds.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from dpft.models import create

#: name -> batch size used by `main` for the forward+backward timing.
BATCH_SIZES = {"nfnet_tiny@32": 32, "nfnet_f0@192": 4, "vit_ti16@224": 4}


def model_builders() -> dict[str, tuple[Callable[[], nnx.Module], tuple[int, int, int], int]]:
    """Builders of the benchmarked models: (zero-arg constructor, (H, W, C), num_classes)."""
    return {
        "nfnet_tiny@32": (lambda: create("nfnet_tiny", 10), (32, 32, 3), 10),
        "nfnet_f0@192": (lambda: create("nfnet_f0", 10), (192, 192, 3), 10),
        "vit_ti16@224": (lambda: create("vit_ti16", 10), (224, 224, 3), 10),
    }


def time_forward_backward(build: Callable[[], nnx.Module], shape: tuple[int, int, int],
                          num_classes: int, batch: int, repeats: int = 3) -> dict[str, float]:
    """Compile and time grad(loss) of one batch; returns seconds (compile, median step)."""
    graphdef, params = nnx.split(build(), nnx.Param)
    x = jax.random.normal(jax.random.key(0), (batch, *shape))
    y = jax.random.randint(jax.random.key(1), (batch,), 0, num_classes)

    def loss(p, x, y, key):
        logits = nnx.merge(graphdef, p)(x, train=True, key=key)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    step = jax.jit(jax.grad(loss))
    t0 = time.perf_counter()
    jax.block_until_ready(step(params, x, y, jax.random.key(2)))
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(step(params, x, y, jax.random.key(3 + i)))
        times.append(time.perf_counter() - t0)
    return {"compile_s": compile_s, "step_s": statistics.median(times)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="subset of model_builders() keys")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"backend={jax.default_backend()} devices={jax.devices()}")
    for name, (build, shape, classes) in model_builders().items():
        if args.only and name not in args.only:
            continue
        batch = BATCH_SIZES[name]
        r = time_forward_backward(build, shape, classes, batch, args.repeats)
        print(f"{name} batch={batch}: compile+first {r['compile_s']:.1f} s, "
              f"forward+backward {r['step_s']:.3f} s/step ({batch / r['step_s']:.1f} examples/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
