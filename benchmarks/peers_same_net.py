"""dpft vs Opacus vs jax-privacy on the same networks and batches (issue 18: fair baselines).

    .venv-bench/bin/python -m benchmarks.peers_same_net [--models gn_convnet nfnet_tiny vit_ti16]
        [--frameworks dpft jax_privacy opacus] [--iters 5] [--size vit_ti16=224x8]
        [--microbatches nfnet_tiny=64,16] [--json out.json] [--merge old.json] [--md out.md]

Networks (`benchmarks.peer_networks`, twins in `benchmarks.torch_twins`, equal parameter counts):
GroupNorm CNN and nfnet_tiny at 32x32, B=64; ViT-Ti/16 at 224x224, B=8. Per network, one JAX
subprocess times, round-robin in one process (`common.time_round_robin`, median of `iters`):
  dpft        nonprivate_plain (jax.grad of the batch-mean loss, no microbatch loop), nonprivate
              (engine, mode "none", sigma 0), bookkeeping and vmap DP steps (flat C=1, sigma=1, SGD)
              per microbatch size (`benchmarks.dp_overhead.make_step`);
  jax-privacy `clipped_grad` + Gaussian noise + SGD per microbatch size (`peers_jax_privacy.make_steps`);
then one PyTorch subprocess times Opacus hooks / functorch / ghost and plain PyTorch on the twin
(`benchmarks.peers_opacus`). `ratio_vs_best_nonprivate` = step time / the framework's fastest
non-private step on that network (dpft's for dpft and jax-privacy, same JAX process; plain PyTorch
for Opacus). The summary divides dpft's best DP throughput by Opacus's best mode's. Every worker,
JAX's and PyTorch's alike, runs with glibc keeping freed memory for reuse (`--host-malloc reuse`,
`dpft.host_memory.MALLOC_ENV`, what `dpft train` sets on CPU); `--host-malloc system` leaves it.

With gradient accumulation (`--logical 1 64`, the DP recipe's large logical batches of many physical
ones): every worker also times an "+accumulate" step per method (dpft: plain `jax.grad` of the summed
loss, or the plan's `clipped_sum`, added to a donated accumulator; Opacus: `signal_skip_step(True)` +
its step, i.e. clip and add to `summed_grad`, as its BatchMemoryManager does; PyTorch: the backward
alone), and the "logical" table gives, per N, (N - 1) accumulate steps + one full step (the noise and
the update once) per logical batch of N x B examples.

Re-measure only the dpft rows later (e.g. after a change to book-keeping) and keep the peers' rows:
    .venv-bench/bin/python -m benchmarks.peers_same_net --frameworks dpft --merge old.json --json new.json
(jax-privacy's ratios need dpft's non-private rows of the same process: rerun `dpft jax_privacy`
together to refresh them). A worker that fails or a step that cannot run gives rows with `error`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks import common, peer_networks
from dpft import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAMEWORKS = ("dpft", "jax_privacy", "opacus")
MICROBATCHES = {"gn_convnet": (64, 16), "nfnet_tiny": (64, 16), "vit_ti16": (8, 4)}
DPFT_METHODS = ("nonprivate_plain", "nonprivate", "bookkeeping", "vmap")


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"


def dpft_framework() -> str:
    """e.g. "dpft 4063687, jax 0.10.2" (the commit the rows were measured on; "+dirty" if changed)."""
    import jax
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha, dirty = "?", ""
    return f"dpft {sha}{'+dirty' if dirty else ''}, jax {jax.__version__}"


class _Accumulating:
    """`step(params, batch, key) -> acc`: a jitted `accumulate(params, batch, key, acc)` (acc donated)
    called with the accumulator it returned last time, as a run's physical batches do. Has the
    `lower(...).compile()` of a jitted step, so `bench_jax` compiles and times it like the others."""

    def __init__(self, accumulate, params):
        import jax
        import jax.numpy as jnp
        self.accumulate, self.lowered = accumulate, None
        self.acc = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

    def lower(self, params, batch, key) -> "_Accumulating":
        self.lowered = self.accumulate.lower(params, batch, key, self.acc)
        return self

    def compile(self) -> "_Accumulating":
        self.accumulate = self.lowered.compile()
        return self

    def __call__(self, params, batch, key):
        self.acc = self.accumulate(params, batch, key, self.acc)
        return self.acc


def jax_steps(setup: common.Setup, frameworks: tuple[str, ...], microbatches: tuple[int, ...],
              accumulate: bool = False) -> tuple[dict, dict]:
    """{(framework, method, microbatch): jitted step(params, batch, key)} and {same key: error}.
    With `accumulate`, also "<method>+accumulate" for every method (plain `jax.grad`, engine, DP): the
    per-physical-batch step of gradient accumulation (no noise, no update)."""
    from benchmarks import dp_overhead
    steps, errors = {}, {}
    if "dpft" in frameworks:
        fw = dpft_framework()
        steps[(fw, "nonprivate_plain", None)] = dp_overhead.make_step(setup, "nonprivate_plain", 1)
        if accumulate:
            steps[(fw, "nonprivate_plain" + common.ACCUMULATE_SUFFIX, None)] = _Accumulating(
                dp_overhead.make_accumulate_step(setup, "nonprivate_plain", 1), setup.params)
        for mb in microbatches:
            for method in DPFT_METHODS[1:]:
                try:
                    steps[(fw, method, mb)] = dp_overhead.make_step(setup, method, mb)
                    if accumulate:
                        steps[(fw, method + common.ACCUMULATE_SUFFIX, mb)] = _Accumulating(
                            dp_overhead.make_accumulate_step(setup, method, mb), setup.params)
                except Exception as e:  # noqa: BLE001 - an engine refusing the network: a row says so
                    errors[(fw, method, mb)] = _err(e)
    if "jax_privacy" in frameworks:
        try:
            import importlib.metadata

            from benchmarks import peers_jax_privacy
            fw = f"jax-privacy {importlib.metadata.version('jax-privacy')}"
            for mb in microbatches:
                steps[(fw, "clipped_grad", mb)] = peers_jax_privacy.make_steps(setup, mb)["dp"]
        except Exception as e:  # noqa: BLE001 - not installed (main venv) or API changed
            errors[("jax-privacy", "clipped_grad", None)] = _err(e)
    return steps, errors


def bench_jax(name: str, resolution: int, batch: int, microbatches: tuple[int, ...], iters: int,
              frameworks: tuple[str, ...], accumulate: bool = False) -> list[dict[str, Any]]:
    """Rows of the JAX frameworks on network `name`: compile all steps, then time them round-robin."""
    import jax
    setup = peer_networks.make_setup(name, batch, resolution=resolution)
    args = (setup.params, setup.batch, jax.random.key(0))
    steps, errors = jax_steps(setup, frameworks, tuple(mb for mb in microbatches if batch % mb == 0), accumulate)
    compiled, compile_s = {}, {}
    for k, step in steps.items():
        t0 = time.perf_counter()
        try:
            compiled[k] = step.lower(*args).compile()
            jax.block_until_ready(compiled[k](*args))
        except Exception as e:  # noqa: BLE001 - e.g. book-keeping refusing a layer at trace time
            errors[k] = _err(e)
            continue
        compile_s[k] = time.perf_counter() - t0
        print(f"# {name} {k}: compile + first call {compile_s[k]:.1f} s", flush=True)
    times = common.time_round_robin(compiled, args, iters)
    best_np = min((t for (fw, m, _), t in times.items() if m.startswith("nonprivate") and not _accumulating(m)),
                  default=None)
    rows = []
    for k in list(steps) + [k for k in errors if k not in steps]:
        fw, method, mb = k
        row = {"network": name, "framework": fw, "params": setup.num_params, "resolution": resolution,
               "batch": batch, "microbatch": mb, "method": method, "private": not method.startswith("nonprivate"),
               "load_1min": round(os.getloadavg()[0], 2)}
        if k in times:
            row.update(examples_per_s=batch / times[k], step_s=times[k], compile_s=compile_s[k],
                       ratio_vs_best_nonprivate=None if _accumulating(method) else times[k] / best_np if best_np else None)
        else:
            row["error"] = errors[k]
        rows.append(row)
    return rows


def run_worker(cmd: list[str], label: str, timeout: int, env: dict[str, str] | None = None) -> tuple[list[dict], dict]:
    """Run a worker writing {"rows": [...]} to a temp file; (rows, record with command, uptime, status)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rows.json")
        uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        rec = {"worker": label, "command": " ".join(cmd), "uptime_before": uptime}
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd + ["--json", path], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                               env=env)
            rec["status"] = "ok" if p.returncode == 0 else f"failed rc={p.returncode}: {p.stderr.strip()[-400:]}"
            sys.stderr.write(p.stdout if p.returncode == 0 else p.stdout + p.stderr)
        except subprocess.TimeoutExpired:
            rec["status"] = f"timeout after {timeout} s"
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        rec["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        rows = json.load(open(path))["rows"] if os.path.exists(path) else []
    print(f"[{label}] {rec['status']} ({rec['seconds']} s); {rec['uptime_before']}", file=sys.stderr, flush=True)
    return rows, rec


def summarize(rows: list[dict]) -> list[dict]:
    """Per network and framework: best DP step (its throughput, its ratio to the framework's best
    non-private step) and its throughput over Opacus's best mode's (`dp_speedup_vs_opacus_best`)."""
    out = []
    for net in dict.fromkeys(r["network"] for r in rows):
        timed = [r for r in rows if r["network"] == net and "examples_per_s" in r]
        params = sorted({r["params"] for r in rows if r["network"] == net})
        best = {}
        for fam in ("dpft", "jax-privacy", "opacus"):
            fr = [r for r in timed if r["framework"].startswith(fam)]
            dp = max((r for r in fr if r["private"]), key=lambda r: r["examples_per_s"], default=None)
            base = [r for r in timed if r["framework"].startswith("dpft")] if fam == "jax-privacy" else fr
            np_ = max((r for r in base if not r["private"]), key=lambda r: r["examples_per_s"], default=None)
            best[fam] = dp
            if dp:
                out.append({"network": net, "framework": dp["framework"], "best_dp": _label(dp),
                            "dp_examples_per_s": dp["examples_per_s"],
                            "best_nonprivate_examples_per_s": np_["examples_per_s"] if np_ else None,
                            "ratio_vs_best_nonprivate": dp.get("ratio_vs_best_nonprivate"),
                            "params": "equal" if len(params) == 1 else f"DIFFER {params}"})
        if best["dpft"] and best["opacus"]:
            for r in out:
                if r["network"] == net:
                    r["dp_speedup_vs_opacus_best"] = r["dp_examples_per_s"] / best["opacus"]["examples_per_s"]
    return out


def _accumulating(method: str) -> bool:
    return method.endswith(common.ACCUMULATE_SUFFIX)


def logical_summary(rows: list[dict], physical_batches: tuple[int, ...]) -> list[dict]:
    """With gradient accumulation (the DP recipe's large batches): per network, framework family and
    N in `physical_batches`, seconds per logical batch of N physical batches of each method =
    (N - 1) x its "+accumulate" step + its full step (`dp_overhead.logical_batch_seconds`); the best
    DP method's logical throughput, its ratio to the family's best non-private one and, for dpft,
    its speedup over Opacus's best mode. A family with rows for the network but no DP method timed
    both ways gets a row with `error` (never left out)."""
    from benchmarks import dp_overhead
    out = []
    for net in dict.fromkeys(r["network"] for r in rows):
        mine = [r for r in rows if r["network"] == net]
        for n in physical_batches:
            best = {}
            for fam in ("dpft", "opacus"):
                fr = [r for r in mine if r["framework"].startswith(fam)]
                full = {(r["method"], r.get("microbatch")): r for r in fr
                        if "step_s" in r and not _accumulating(r["method"])}
                cands = [(full[key], dp_overhead.logical_batch_seconds(full[key]["step_s"], r["step_s"], n))
                         for r in fr if "step_s" in r and _accumulating(r["method"])
                         for key in [(r["method"].removesuffix(common.ACCUMULATE_SUFFIX), r.get("microbatch"))] if key in full]
                dp = min(((f, t) for f, t in cands if f["private"]), key=lambda c: c[1], default=None)
                np_ = min(((f, t) for f, t in cands if not f["private"]), key=lambda c: c[1], default=None)
                if dp is None:
                    if fr:
                        out.append({"network": net, "framework": fr[0]["framework"], "physical_batches": n,
                                    "error": "no DP method timed both as a full and as an accumulate step"})
                    continue
                examples = n * dp[0]["batch"]
                best[fam] = examples / dp[1]
                out.append({"network": net, "framework": dp[0]["framework"], "physical_batches": n,
                            "logical_batch": examples, "best_dp": _label(dp[0]), "dp_examples_per_s": examples / dp[1],
                            "best_nonprivate_examples_per_s": examples / np_[1] if np_ else None,
                            "ratio_vs_best_nonprivate": dp[1] / np_[1] if np_ else None})
            if "dpft" in best and "opacus" in best:
                for r in out:
                    if r["network"] == net and r["physical_batches"] == n and "error" not in r:
                        r["dp_speedup_vs_opacus_best"] = r["dp_examples_per_s"] / best["opacus"]
    return out


def _label(r: dict) -> str:
    return r["method"] + (f" mb {r['microbatch']}" if r.get("microbatch") else "")


ROW_COLUMNS = ["network", "params", "resolution", "batch", "framework", "method", "microbatch",
               "examples_per_s", "step_s", "ratio_vs_best_nonprivate", "load_1min", "error"]
LOGICAL_COLUMNS = ["network", "framework", "physical_batches", "logical_batch", "best_dp", "dp_examples_per_s",
                   "best_nonprivate_examples_per_s", "ratio_vs_best_nonprivate", "dp_speedup_vs_opacus_best", "error"]
SUMMARY_COLUMNS = ["network", "framework", "best_dp", "dp_examples_per_s", "best_nonprivate_examples_per_s",
                   "ratio_vs_best_nonprivate", "dp_speedup_vs_opacus_best", "params"]


def parse_map(items: list[str], conv) -> dict:
    """["name=value", ...] -> {name: conv(value)}."""
    return {k: conv(v) for k, v in (s.split("=", 1) for s in items)}


def worker_env(host_malloc: str) -> dict[str, str]:
    """Every worker's environment, JAX's and PyTorch's alike: with "reuse", glibc keeps freed memory
    for the next step (`dpft.host_memory.MALLOC_ENV`, what `dpft train` sets on CPU); "system" as is."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    return {**env, **host_memory.MALLOC_ENV} if host_malloc == "reuse" else env


def orchestrate(args: argparse.Namespace) -> dict:
    """Run the workers of every selected network; returns {"machine", "workers", "rows", "summary"}."""
    sizes = parse_map(args.size, lambda v: tuple(int(x) for x in v.split("x")))
    mbs = {**MICROBATCHES, **parse_map(args.microbatches, lambda v: tuple(int(x) for x in v.split(",")))}
    rows, all_rows, workers = [], [], []
    for name in args.models:
        net = peer_networks.NETWORKS[name]
        res, batch = sizes.get(name, (net.resolution, net.batch))
        jax_fw = [f for f in args.frameworks if f != "opacus"]
        kinds = []
        if jax_fw:
            kinds.append(("jax", [sys.executable, "-m", "benchmarks.peers_same_net", "--worker", "--models", name,
                                  "--frameworks", *jax_fw, "--size", f"{name}={res}x{batch}",
                                  "--microbatches", f"{name}={','.join(map(str, mbs[name]))}",
                                  "--iters", str(args.iters)] + (["--accumulate"] if args.logical else []),
                          [f.replace("_", "-") for f in jax_fw]))
        if "opacus" in args.frameworks:
            kinds.append(("opacus", [sys.executable, "-m", "benchmarks.peers_opacus", "--models", name,
                                     "--batch", str(batch), "--resolution", str(res), "--iters", str(args.iters)]
                          + (["--accumulate"] if args.logical else []),
                          ["opacus"]))
        runs: dict[str, list[list[dict]]] = {k: [] for k, _, _ in kinds}
        for rnd in range(args.rounds):  # the workers of one network alternate: jax, opacus, jax, opacus, ...
            for kind, cmd, fws in kinds:
                r, rec = run_worker(cmd, f"{kind} {name} round {rnd}", args.timeout, worker_env(args.host_malloc))
                r = r or [{"network": name, "framework": f, "method": "*", "error": rec["status"]} for f in fws]
                for row in r:
                    row["round"] = rnd
                runs[kind].append(r)
                all_rows += r
                workers.append(rec)
        for kind in runs:
            rows += min(runs[kind], key=_best_nonprivate_s)
    if args.merge:
        with open(args.merge) as f:
            old = json.load(f)
        rerun = {(r["network"], r["framework"].split()[0]) for r in rows}
        keep = lambda rs: [r for r in rs if (r["network"], r["framework"].split()[0]) not in rerun]
        rows, all_rows = keep(old["rows"]) + rows, keep(old.get("all_rounds", [])) + all_rows
        workers = [dict(w, merged_from=args.merge) for w in old.get("workers", [])] + workers
    order = {n: i for i, n in enumerate(peer_networks.NETWORKS)}
    rows.sort(key=lambda r: order.get(r["network"], 99))
    return {"machine": common.machine_info(), "rounds": args.rounds, "host_malloc": args.host_malloc,
            "workers": workers, "rows": rows,
            "all_rounds": all_rows, "summary": summarize([r for r in rows if not _accumulating(r.get("method", ""))]),
            "logical": logical_summary(rows, tuple(args.logical))}


def _best_nonprivate_s(rows: list[dict]) -> float:
    """Fastest non-private step of one worker run (inf if none ran): the least disturbed run wins."""
    return min((r["step_s"] for r in rows if "step_s" in r and not r.get("private", True)
                and not _accumulating(r["method"])), default=float("inf"))


def to_markdown(doc: dict) -> str:
    m = doc["machine"]
    head = (f"{m['date']}, {m['cpu']}, {m['cores']} cores, jax {m['jax']}, flax {m['flax']}\n\n"
            + "\n".join(f"- {w['worker']}: {w['status']} ({w.get('seconds')} s); `{w['uptime_before']}`"
                        for w in doc["workers"]))
    parts = [head, common.markdown_table(doc["summary"], SUMMARY_COLUMNS)]
    if doc.get("logical"):
        parts.append(common.markdown_table(doc["logical"], LOGICAL_COLUMNS))
    return "\n\n".join(parts + [common.markdown_table(doc["rows"], ROW_COLUMNS)]) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(peer_networks.NETWORKS), choices=list(peer_networks.NETWORKS))
    ap.add_argument("--frameworks", nargs="+", default=list(FRAMEWORKS), choices=FRAMEWORKS)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2,
                    help="run each worker this often (alternating); keep each worker's least disturbed round")
    ap.add_argument("--size", nargs="*", default=[], help="NAME=RESxBATCH, e.g. vit_ti16=224x8")
    ap.add_argument("--microbatches", nargs="*", default=[], help="NAME=MB,MB (JAX steps), e.g. nfnet_tiny=64,16")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per worker subprocess")
    ap.add_argument("--host-malloc", choices=("reuse", "system"), default="reuse",
                    help="glibc malloc of every worker: reuse freed memory (as dpft train on CPU) or as the system sets")
    ap.add_argument("--logical", nargs="*", type=int, default=[],
                    help="also time the accumulate steps and report logical batches of these many physical batches")
    ap.add_argument("--accumulate", action="store_true", help=argparse.SUPPRESS)  # worker: time accumulate steps
    ap.add_argument("--merge", default=None, help="keep the rows of frameworks not rerun from this JSON")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # the JAX worker of one network
    args = ap.parse_args(argv)
    if args.worker:
        name = args.models[0]
        net = peer_networks.NETWORKS[name]
        res, batch = parse_map(args.size, lambda v: tuple(int(x) for x in v.split("x"))).get(
            name, (net.resolution, net.batch))
        mbs = parse_map(args.microbatches, lambda v: tuple(int(x) for x in v.split(","))).get(name, MICROBATCHES[name])
        return common.emit_rows(bench_jax(name, res, batch, mbs, args.iters, tuple(args.frameworks), args.accumulate),
                                args.json)
    doc = orchestrate(args)
    md = to_markdown(doc)
    print(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
