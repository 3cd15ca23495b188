"""Is there a faster non-private conv step on XLA:CPU than `lax.conv`? (issue 18: the GroupNorm CNN's
gap to PyTorch is its non-private step.) The benchmark GroupNorm CNN's SGD step (3x [3x3 conv ->
GroupNorm -> relu], 16/32/64 channels, the last two strided; mean pool; linear; B=64, 32x32x3)
with its convs written three ways, equal to each other on the same parameters (checked):

  lax_conv   `lax.conv_general_dilated` (what `nnx.Conv` runs)
  im2col     nine strided slices concatenated on channels, then one matmul
  patches    `lax.conv_general_dilated_patches` (what book-keeping's materialised route builds), then one matmul

    python -m benchmarks.conv_formulations [--iters 7] [--json out.json]

Timed round-robin in one process (median of `iters` rounds of 5 calls). XLA flags that might route
convs elsewhere are tried by setting XLA_FLAGS in the environment of separate runs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

from benchmarks import common

CHANNELS = (3, 16, 32, 64)
PAD = ((1, 1), (1, 1))  # explicit, so that all three formulations pad alike


def conv_lax(h, w, stride: int):
    import jax
    return jax.lax.conv_general_dilated(h, w, (stride, stride), PAD, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_im2col(h, w, stride: int):
    """h [B, H, W, C], w [3, 3, C, O] -> [B, H', W', O]: slices ordered (kh, kw, C) like w's reshape."""
    import jax.numpy as jnp
    hp = jnp.pad(h, ((0, 0),) + PAD + ((0, 0),))
    ho = (h.shape[1] + 2 - 3) // stride + 1
    wo = (h.shape[2] + 2 - 3) // stride + 1
    cols = [hp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
            for i in range(3) for j in range(3)]
    return jnp.concatenate(cols, axis=-1) @ w.reshape(-1, w.shape[-1])


def conv_patches(h, w, stride: int):
    """`conv_general_dilated_patches` orders the patch features (C, kh, kw)."""
    import jax
    import jax.numpy as jnp
    p = jax.lax.conv_general_dilated_patches(h, (3, 3), (stride, stride), PAD,
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return p @ jnp.transpose(w, (2, 0, 1, 3)).reshape(-1, w.shape[-1])


FORMULATIONS = {"lax_conv": conv_lax, "im2col": conv_im2col, "patches": conv_patches}


def make_step(conv, x, y):
    """Jitted SGD step `params -> params` of the GroupNorm CNN with `conv`."""
    import jax
    import jax.numpy as jnp

    def group_norm(h, groups: int = 4):
        b, hh, ww, c = h.shape
        r = h.reshape(b, hh, ww, groups, c // groups)
        mean = r.mean(axis=(1, 2, 4), keepdims=True)
        var = r.var(axis=(1, 2, 4), keepdims=True)
        return ((r - mean) * jax.lax.rsqrt(var + 1e-6)).reshape(h.shape)

    def loss(p):
        h = x
        for i in range(3):
            h = jax.nn.relu(group_norm(conv(h, p[f"w{i}"], 1 if i == 0 else 2)))
        logits = h.mean(axis=(1, 2)) @ p["head"]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    return jax.jit(lambda p: jax.tree.map(lambda a, g: a - 0.1 * g, p, jax.grad(loss)(p)))


def run(iters: int, batch: int = 64, resolution: int = 32) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    rs = np.random.RandomState(0)
    params = {f"w{i}": jnp.asarray(rs.randn(3, 3, CHANNELS[i], CHANNELS[i + 1]) * 0.3, jnp.float32) for i in range(3)}
    params["head"] = jnp.asarray(rs.randn(CHANNELS[-1], 10) * 0.3, jnp.float32)
    x = jnp.asarray(rs.randn(batch, resolution, resolution, 3), jnp.float32)
    y = jnp.asarray(rs.randint(0, 10, batch))
    steps = {k: make_step(f, x, y) for k, f in FORMULATIONS.items()}
    out = {k: f(params) for k, f in steps.items()}
    ref = out["lax_conv"]
    diffs = {k: max(float(jnp.max(jnp.abs(o[n] - ref[n]))) for n in ref) for k, o in out.items()}
    for k, d in diffs.items():
        if d > 1e-4:
            raise AssertionError(f"conv_formulations: {k} differs from lax_conv by {d:.3g} after one step")
    times = {k: [] for k in steps}
    for _ in range(iters):
        for k, f in steps.items():
            t = time.perf_counter()
            for _ in range(5):
                jax.block_until_ready(f(params))
            times[k].append((time.perf_counter() - t) / 5)
    med = {k: statistics.median(v) for k, v in times.items()}
    return [{"formulation": k, "batch": batch, "resolution": resolution, "step_s": med[k],
             "examples_per_s": batch / med[k], "time_vs_lax_conv": med[k] / med["lax_conv"],
             "max_abs_diff_vs_lax_conv": diffs[k], "xla_flags": os.environ.get("XLA_FLAGS", ""),
             "load_1min": round(os.getloadavg()[0], 2)} for k in steps]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    return common.emit_rows(run(args.iters), args.json, machine=True)


if __name__ == "__main__":
    raise SystemExit(main())
