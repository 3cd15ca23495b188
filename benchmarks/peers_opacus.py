"""Peer: Opacus (PyTorch, CPU) DP-SGD steps in each grad-sample mode vs plain PyTorch, on the twins.

    .venv-bench/bin/python -m benchmarks.peers_opacus [--models gn_convnet nfnet_tiny vit_ti16]
        [--modes hooks functorch ghost] [--batch B] [--resolution R] [--iters 5] [--json out.json]

Networks: `benchmarks.torch_twins` (PyTorch twins of dpft's Flax networks, same parameters; default
batch and resolution from `benchmarks.peer_networks`). Each DP mode is set up as a user would:
`PrivacyEngine().make_private(module, optimizer, data_loader, noise_multiplier=1, max_grad_norm=1,
grad_sample_mode=mode, poisson_sampling=False)` on a fresh copy of the twin (same weights), then
one step = forward + cross-entropy (mean) + backward + `optimizer.step()` (per-sample clipping, noise,
SGD) + `zero_grad()`; for "ghost" (fast gradient / ghost clipping) the loss is the returned
`DPLossFastGradientClipping` criterion, whose `backward()` runs Opacus's two backward passes.
"nonprivate" = the plain twin, cross-entropy backward + SGD step. All steps of a network are warmed
up once and then timed round-robin (median of `iters`). A mode that fails to set up or to run gives a
row with its error instead of a time. Needs the `bench` extras (separate venv); tests never import it.
"""
from __future__ import annotations

import argparse
import copy
import importlib.metadata
import os
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from benchmarks import common, peer_networks, torch_twins

MODES = ("hooks", "functorch", "ghost")
DEFAULTS = {k: (n.resolution, n.batch) for k, n in peer_networks.NETWORKS.items()}  # (resolution, batch)


def framework() -> str:
    """e.g. "opacus 1.6.0, torch 2.13.0+cpu"."""
    return f"opacus {importlib.metadata.version('opacus')}, torch {torch.__version__}"


def plain_steps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[Callable[[], None], Callable[[], None]]:
    """Non-private (step, accumulate): step = backward of the mean cross-entropy + SGD; accumulate =
    the backward alone (PyTorch adds it to .grad), a physical batch of a logical one."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def accumulate():
        F.cross_entropy(model(x), y).backward()
    return step, accumulate


def dp_steps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str) -> tuple[Callable[[], None], Callable[[], None]]:
    """Opacus DP-SGD (step, accumulate) (sigma 1, C 1, flat clipping) in grad-sample `mode`, set up by
    PrivacyEngine, on one optimizer. accumulate = what Opacus's BatchMemoryManager does for a physical
    batch that does not end the logical one: `signal_skip_step(True)`, then the step clips and adds
    to `summed_grad` without noise or update."""
    from opacus import PrivacyEngine
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(x))
    made = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
        criterion=torch.nn.CrossEntropyLoss(), noise_multiplier=1.0, max_grad_norm=1.0,
        grad_sample_mode=mode, poisson_sampling=False)
    if mode == "ghost":
        dp_model, opt, criterion, _ = made
    else:
        (dp_model, opt, _), criterion = made, torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad()
        criterion(dp_model(x), y).backward()
        opt.step()

    def accumulate():
        opt.signal_skip_step(do_skip=True)
        opt.zero_grad()
        criterion(dp_model(x), y).backward()
        opt.step()
    return step, accumulate


def bench(name: str, batch: int, resolution: int, iters: int, modes=MODES, accumulate: bool = False) -> list[dict]:
    """One row per method ("nonprivate", then each mode) of twin `name`; ratios vs "nonprivate".
    With `accumulate`, also "<method>+accumulate" rows (no ratio; see `dp_steps`)."""
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    x = torch.randn(batch, 3, resolution, resolution)
    y = torch.randint(0, 10, (batch,))
    base = torch_twins.TWINS[name](10, resolution)
    steps, errors = {}, {}
    for mode in ("nonprivate", *modes):
        try:
            pair = plain_steps(copy.deepcopy(base), x, y) if mode == "nonprivate" else \
                dp_steps(copy.deepcopy(base), x, y, mode)
            steps[mode] = pair[0]
            if accumulate:
                steps[mode + common.ACCUMULATE_SUFFIX] = pair[1]
        except Exception as e:  # noqa: BLE001 - a mode that cannot set up this network: a row says so
            errors[mode] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    warm = {}
    for k, f in steps.items():
        t0 = time.perf_counter()
        try:
            f()
            warm[k] = f
        except Exception as e:  # noqa: BLE001 - a mode that cannot run this network
            errors[k] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        print(f"# opacus {name} {k}: warm-up {time.perf_counter() - t0:.2f} s", flush=True)
    times = {k: [] for k in warm}
    for _ in range(iters):
        for k, f in warm.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    methods = ["nonprivate", *modes]
    for k in methods + ([m + common.ACCUMULATE_SUFFIX for m in methods] if accumulate else []):
        row = {"network": name, "framework": framework(), "params": torch_twins.num_params(base),
               "resolution": resolution, "batch": batch, "microbatch": None, "method": k,
               "private": not k.startswith("nonprivate"), "load_1min": round(os.getloadavg()[0], 2)}
        if k in med:
            ratio = med[k] / med["nonprivate"] if "nonprivate" in med and not k.endswith(common.ACCUMULATE_SUFFIX) else None
            row.update(examples_per_s=batch / med[k], step_s=med[k], ratio_vs_best_nonprivate=ratio)
        else:
            row["error"] = errors.get(k.removesuffix(common.ACCUMULATE_SUFFIX), errors.get(k, "not timed"))
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(DEFAULTS), choices=list(DEFAULTS))
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--batch", type=int, default=None, help="default: the network's (64; ViT 8)")
    ap.add_argument("--resolution", type=int, default=None, help="default: the network's (32; ViT 224)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--accumulate", action="store_true",
                    help="also time each method's accumulate step (a physical batch of a logical one)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = []
    for m in args.models:
        res, b = DEFAULTS[m]
        rows += bench(m, args.batch or b, args.resolution or res, args.iters, tuple(args.modes), args.accumulate)
    return common.emit_rows(rows, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
