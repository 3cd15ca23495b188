"""Where the time of the DP step goes: each piece jitted and timed on its own.

    python -m benchmarks.profile_step [--models nfnet_tiny nfnet_f0] [--batch 16] [--iters 3] [--json out.json]
                                      [--resolution PX] [--dtype bfloat16] [--pieces NAME ...]

Imports only jax, flax, numpy and dpft's models and privacy engine, like `gpu_check` (a GPU image
runs it as it is). With ``--dtype bfloat16`` on an accelerator the book-keeping pieces take their
native bf16 route. Every row also carries ``bk_norms_max_rel_diff``: the largest relative
difference between the book-keeping per-example norms and the vmap engine's (both from the same
parameters and batch), a correctness check of the route that ran.

Pieces, for one physical batch of B examples (K = 1):
  forward            batched forward + loss (no gradient)
  batched_backward   jax.grad of the summed loss (= the non-private gradient)
  per_example_grads  vmap(grad): B materialised per-example gradients [B, *param]
  norms              per-example float32 L2 norms from those gradients
  clip_and_sum       scale each by min(1, C/||g||) and sum over B (masked)
  noise              dpft.privacy.noise.privatize of the sum (one Gaussian draw per parameter)
  full_dp            engine.clipped_grad_sum(flat, microbatch=B) + privatize, fused by XLA
and the book-keeping engine's pieces (dpft.privacy.bookkeeping):
  bk_tap_pass        one forward + backward w.r.t. the layer-output perturbations (no weight grads)
  bk_norms           per-example norms from layer inputs and output gradients
  bk_norms_and_sum   norms + the clipped sum (from the materialised per-example grads, or one
                     contraction of (x, weights * d) per layer)
  bk_full_dp         bookkeeping.bk_clipped_grad_sum(flat, microbatch=B) + privatize, fused by XLA
The pieces are timed as separate programs (inputs already on device), so their sum exceeds the fused
step; the ratios show what is intrinsic (per-example backward) and what is overhead. ``compile_s`` is
the first call's time: ~0 for a piece whose program already ran to build another piece's inputs
(per_example_grads, norms, bk_tap_pass, bk_norms).
"""
from __future__ import annotations

import argparse
import json

from benchmarks import common


PIECES = ("forward", "batched_backward", "per_example_grads", "norms", "clip_and_sum", "noise", "full_dp",
          "bk_tap_pass", "bk_norms", "bk_norms_and_sum", "bk_full_dp")


def pieces(setup: common.Setup, names: tuple[str, ...] = PIECES) -> dict:
    """name -> (jitted fn, args) for each piece in `names`; the inputs a piece needs (per-example
    gradients, norms, the tap pass's layer inputs and output gradients) are computed only for the
    pieces asked for (on a GPU, F0's per-example gradients at batch 128 are 37 GB)."""
    import jax
    import jax.numpy as jnp

    from dpft.nn import taps
    from dpft.privacy import bookkeeping, engine, noise
    from dpft.privacy.keys import RunSecret, noise_base_key
    noise_base = noise_base_key(RunSecret.generate())
    views = {k: v for k, v in setup.batch.items() if k not in ("mask", "example_id")}
    mask = setup.batch["mask"]
    b = mask.shape[0]
    keys = jax.random.split(jax.random.key(0), b)
    loss = lambda p, v, k: setup.loss_fn(p, v, k)[0]
    batched_loss = lambda p: jnp.sum(jax.vmap(loss, in_axes=(None, 0, 0))(p, views, keys))
    per_ex = jax.jit(lambda p: jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(p, views, keys))
    norms_fn = jax.jit(lambda g: jnp.sqrt(sum(jnp.sum(jnp.square(x).reshape(b, -1), axis=1)
                                                for x in jax.tree.leaves(g))))

    def clip_sum(g, n):
        f = jnp.where(mask > 0, engine.clip_factors(n, engine.ClippingConfig("flat", clip_norm=1.0)), 0.0)
        return jax.tree.map(lambda x: jnp.tensordot(f, x, axes=1), g)

    privatize = lambda g: noise.privatize(g, noise.noise_key(noise_base, 0), noise_multiplier=1.0, clip_norm=1.0,
                                          expected_batch_size=float(b))
    full = lambda p: privatize(engine.clipped_grad_sum(
        setup.loss_fn, p, setup.batch, jax.random.key(0), clipping=engine.ClippingConfig(clip_norm=1.0),
        microbatch_size=b)[0])
    bk_full = lambda p: privatize(bookkeeping.bk_clipped_grad_sum(
        setup.loss_fn, p, setup.batch, jax.random.key(0), clipping=engine.ClippingConfig(clip_norm=1.0),
        microbatch_size=b)[0])
    specs = bookkeeping.discover_ops(setup.loss_fn.tapped, setup.params, views, keys[0])

    def op_params(p):
        flat = {taps.param_path(kp): x for kp, x in jax.tree_util.tree_leaves_with_path(p)}
        return {k: {n: flat[path] for n, path in s.param_paths.items()} for k, s in specs.items()}

    tap_pass = jax.jit(lambda p: bookkeeping.tap_pass(setup.loss_fn.tapped, p, specs, views, keys)[2:])
    bk_norms = jax.jit(lambda p, x, d: bookkeeping.per_example_norms(specs, op_params(p), x, d)[0])
    weights = jnp.where(mask > 0, 0.5, 0.0)

    def norms_and_sum(p, x, d):
        sq, summers = bookkeeping.per_example_norms(specs, op_params(p), x, d)
        return sq, bookkeeping.weighted_param_grads(summers, weights)

    made: dict = {}

    def once(name, make):
        if name not in made:
            made[name] = jax.block_until_ready(make())
        return made[name]
    grads = lambda: once("grads", lambda: per_ex(setup.params))
    norms = lambda: once("norms", lambda: norms_fn(grads()))
    bk_io = lambda: once("bk_io", lambda: tap_pass(setup.params))
    makers = {
        "forward": lambda: (jax.jit(batched_loss), (setup.params,)),
        "batched_backward": lambda: (jax.jit(jax.grad(batched_loss)), (setup.params,)),
        "per_example_grads": lambda: (per_ex, (setup.params,)),
        "norms": lambda: (norms_fn, (grads(),)),
        "clip_and_sum": lambda: (jax.jit(clip_sum), (grads(), norms())),
        # the noise step's time does not depend on the sum's values
        "noise": lambda: (jax.jit(privatize), (jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), setup.params),)),
        "full_dp": lambda: (jax.jit(full), (setup.params,)),
        "bk_tap_pass": lambda: (tap_pass, (setup.params,)),
        "bk_norms": lambda: (bk_norms, (setup.params, *bk_io())),
        "bk_norms_and_sum": lambda: (jax.jit(norms_and_sum), (setup.params, *bk_io())),
        "bk_full_dp": lambda: (jax.jit(bk_full), (setup.params,)),
    }
    return {n: makers[n]() for n in names}


def norms_rel_diff(programs: dict) -> float:
    """max_i |bk_norm_i - vmap_norm_i| / vmap_norm_i over the batch, from the `pieces` programs (an
    example whose vmap norm is 0 counts its absolute difference, so the check is always defined)."""
    import jax.numpy as jnp
    fn, args = programs["bk_norms"]
    bk = jnp.sqrt(fn(*args))
    fn, args = programs["norms"]
    ref = fn(*args)
    return float(jnp.max(jnp.abs(bk - ref) / jnp.where(ref > 0, ref, 1.0)))


def bench(name: str, batch: int, iters: int, resolution: int | None = None, dtype: str | None = None,
          names: tuple[str, ...] = PIECES) -> list[dict]:
    import jax.numpy as jnp
    setup = common.make_setup(name, batch, resolution=resolution, dtype=getattr(jnp, dtype) if dtype else None)
    programs = pieces(setup, names)
    rel = norms_rel_diff(programs) if {"norms", "bk_norms"} <= set(programs) else None
    rows = []
    for piece, (fn, args) in programs.items():
        t = common.time_fn(fn, *args, iters=iters)
        rows.append({"model": name, "resolution": int(setup.batch["image"].shape[2]), "batch": batch,
                     "dtype": dtype or "model default", "piece": piece, "seconds": t["median_s"],
                     "compile_s": t["first_call_s"], "bk_norms_max_rel_diff": rel})
    base = {r["piece"]: r["seconds"] for r in rows}
    for r in rows:
        r["ratio_vs_batched_backward"] = (r["seconds"] / base["batched_backward"] if "batched_backward" in base
                                          else None)
        print(json.dumps(r), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["nfnet_tiny"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--resolution", type=int, default=None, help="image side, px (default: the model's)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                    help="compute dtype (default: the model's)")
    ap.add_argument("--pieces", nargs="+", default=list(PIECES), choices=PIECES,
                    help="the pieces to time (default all; bk_norms_max_rel_diff needs norms and bk_norms)")
    args = ap.parse_args(argv)
    rows = [r for m in args.models
            for r in bench(m, args.batch, args.iters, args.resolution, args.dtype, tuple(args.pieces))]
    print(common.markdown_table(rows, ["model", "resolution", "batch", "dtype", "piece", "seconds",
                                       "ratio_vs_batched_backward", "compile_s", "bk_norms_max_rel_diff"]))
    return common.emit_rows(rows, args.json, echo=False, machine=True)


if __name__ == "__main__":
    raise SystemExit(main())
