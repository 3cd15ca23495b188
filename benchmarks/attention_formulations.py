"""Which attention core should the ViT run on XLA:CPU? (issue 18.) The ViT's training steps with
its `nnx.MultiHeadAttention` core written three ways, equal on the same parameters (checked):

  flax_default    `nnx.dot_product_attention` -> `jax.nn.dot_product_attention`'s XLA path, which
                  reshapes heads into [groups, 1] and vmaps over the size-1 group axis
  einsum          `dpft.nn.ops.attention_einsums`: the same two einsums over the batch axes as
                  given (a per-example call under vmap keeps its batch of one: [m, 1, ...])
  self_attention  `dpft.nn.ops.self_attention` (what dpft's ViT runs): the einsums with leading
                  size-1 batch axes dropped

For each: the plain `jax.grad` accumulate step and the book-keeping DP accumulate step
(`benchmarks.dp_overhead.make_accumulate_step`, microbatch = batch), timed round-robin in one
process (median of `iters` rounds of one call each), so that the machine's drift hits all alike.

    python -m benchmarks.attention_formulations [--model vit_ti16] [--batch 8] [--iters 12] [--json out.json]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

from benchmarks import common

METHODS = ("nonprivate_plain", "bookkeeping")


def einsum_attention(query, key, value, bias=None, mask=None, **options):
    """`ops.self_attention`'s arithmetic without dropping size-1 axes (self-attention, no mask)."""
    from dpft.nn import ops
    if bias is not None or mask is not None:
        raise ValueError("einsum_attention: no bias or mask")
    return ops.attention_einsums(query, key, value)


def formulations() -> dict:
    from flax import nnx

    from dpft.nn import ops
    return {"flax_default": nnx.dot_product_attention, "einsum": einsum_attention,
            "self_attention": ops.self_attention}


def with_attention(fn):
    """`make_setup` edit: every `nnx.MultiHeadAttention` of the model runs `fn` as its core."""
    from flax import nnx

    def edit(model) -> None:
        found = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.MultiHeadAttention)]
        if not found:
            raise ValueError("attention_formulations: the model has no nnx.MultiHeadAttention")
        for m in found:
            m.attention_fn = fn
    return edit


def run(model: str, batch: int, iters: int) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from benchmarks import dp_overhead
    steps, setups = {}, {}
    for name, fn in formulations().items():
        setups[name] = common.make_setup(model, batch, edit=with_attention(fn))
        for method in METHODS:
            steps[(name, method)] = dp_overhead.make_accumulate_step(setups[name], method, batch)
    key = jax.random.key(0)
    zeros = lambda s: jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), s.params)
    outs = {k: f(setups[k[0]].params, setups[k[0]].batch, key, zeros(setups[k[0]])) for k, f in steps.items()}
    diffs = {}
    for (name, method), out in outs.items():
        ref = outs[("flax_default", method)]
        scale = max(float(jnp.max(jnp.abs(r))) for r in jax.tree.leaves(ref))
        diffs[(name, method)] = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                                    zip(jax.tree.leaves(out), jax.tree.leaves(ref))) / scale
        if diffs[(name, method)] > 1e-4:
            raise AssertionError(f"attention_formulations: {name} {method} differs from flax_default by "
                                 f"{diffs[(name, method)]:.3g} (relative to the largest entry)")
    times = {k: [] for k in steps}
    for _ in range(iters):
        for k, f in steps.items():
            s = setups[k[0]]
            acc = jax.block_until_ready(zeros(s))
            t = time.perf_counter()
            jax.block_until_ready(f(s.params, s.batch, key, acc))
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return [{"model": model, "formulation": name, "method": method, "batch": batch, "iters": iters,
             "step_s": med[(name, method)], "examples_per_s": batch / med[(name, method)],
             "time_vs_flax_default": med[(name, method)] / med[("flax_default", method)],
             "time_vs_own_plain": med[(name, method)] / med[(name, "nonprivate_plain")],
             "max_rel_diff_vs_flax_default": diffs[(name, method)],
             "xla_flags": os.environ.get("XLA_FLAGS", ""), "load_1min": round(os.getloadavg()[0], 2)}
            for (name, method) in steps]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_ti16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    return common.emit_rows(run(args.model, args.batch, args.iters), args.json, machine=True)


if __name__ == "__main__":
    raise SystemExit(main())
