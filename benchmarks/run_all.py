"""Run every available dpft benchmark and write results JSON + a Markdown table.

    python -m benchmarks.run_all [--quick] [--out bench-results/]

Each benchmark runs in its own subprocess (own memory high-water mark, own XLA_FLAGS) with a
timeout; peers (Opacus, jax-privacy) run with the separate bench venv's python
(`.venv-bench/bin/python`, see benchmarks/README.md) and are skipped, with a note, if it is missing.
Writes OUT/results.json ({"machine", "jobs": [{name, command, seconds, status, rows}]}) and
OUT/results.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

from benchmarks import common
from benchmarks.peers_same_net import ROW_COLUMNS as SAME_NET_COLUMNS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_PY = os.path.join(ROOT, ".venv-bench", "bin", "python")


def jobs(quick: bool) -> list[dict]:
    """name, python, module args and timeout (s) of each benchmark."""
    q = ["--quick"] if quick else []
    it = ["--iters", "3" if quick else "5"]
    peer_batch = ["--batch", "64"]
    return [
        {"name": "dp_overhead_tiny", "py": sys.executable, "timeout": 420 if quick else 1800,
         "args": ["benchmarks.dp_overhead", "--models", "nfnet_tiny", *q]},
        {"name": "dp_overhead_f0", "py": sys.executable, "timeout": 900 if quick else 2400,
         "args": ["benchmarks.dp_overhead", "--models", "nfnet_f0", *q]},
        {"name": "dp_overhead_vit_ti", "py": sys.executable, "timeout": 900 if quick else 2400,
         "args": ["benchmarks.dp_overhead", "--models", "vit_ti16", *q]},
        {"name": "peers_optax", "py": sys.executable, "timeout": 300,
         "args": ["benchmarks.peers_optax", *peer_batch, *it]},
        {"name": "peers_jax_privacy", "py": BENCH_PY, "timeout": 300,
         "args": ["benchmarks.peers_jax_privacy", *peer_batch, "--microbatch", "16", *it]},
        {"name": "peers_opacus", "py": BENCH_PY, "timeout": 600,
         "args": ["benchmarks.peers_opacus", "--models", "nfnet_tiny", *peer_batch, *it]},
        {"name": "peers_same_net", "py": BENCH_PY, "timeout": 3600 if quick else 7200,
         "args": ["benchmarks.peers_same_net", "--rounds", "1" if quick else "2", *it,
                  *(["--models", "gn_convnet", "nfnet_tiny"] if quick else [])]},
        {"name": "scaling", "py": sys.executable, "timeout": 600,
         "args": ["benchmarks.scaling", "--devices", *(["1", "2", "8"] if quick else ["1", "2", "4", "8"]),
                  "--batch", "32", *it]},
        {"name": "noise_draw", "py": sys.executable, "timeout": 600,
         "args": ["benchmarks.noise_draw", *it]},
        {"name": "profile_step", "py": sys.executable, "timeout": 300 if quick else 1200,
         "args": ["benchmarks.profile_step", "--models", *(["nfnet_tiny"] if quick else ["nfnet_tiny", "nfnet_f0"]),
                  "--batch", "16", *it]},
        {"name": "cost_model", "py": sys.executable, "timeout": 1200 if quick else 3600,
         "args": ["benchmarks.cost_model", "--models", *(["nfnet_f0"] if quick else ["nfnet_f0", "vit_b16"]),
                  "--batch", *(["16"] if quick else ["16", "128"])]},
    ]


def run_job(job: dict, out_dir: str) -> dict:
    path = os.path.join(out_dir, f"{job['name']}.json")
    cmd = [job["py"], "-m", *job["args"], "--json", path]
    rec = {"name": job["name"], "command": " ".join(shlex.quote(c) for c in cmd), "rows": []}
    if not os.path.exists(job["py"]):
        return dict(rec, status=f"skipped: {job['py']} missing (install the bench extras, benchmarks/README.md)")
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=job["timeout"])
        status = "ok" if p.returncode == 0 else f"failed rc={p.returncode}: {p.stderr.strip()[-400:]}"
    except subprocess.TimeoutExpired:
        status = f"timeout after {job['timeout']} s"
    rec.update(seconds=round(time.perf_counter() - t0, 1), status=status)
    if os.path.exists(path):
        with open(path) as f:
            rec["rows"] = json.load(f).get("rows", [])
    print(f"[{rec['name']}] {status} ({rec['seconds']} s)", flush=True)
    return rec


def to_markdown(result: dict) -> str:
    m = result["machine"]
    out = [f"# dpft benchmarks ({'quick' if result['quick'] else 'full'})", "",
           f"- date: {m['date']}", f"- machine: {m['cpu']}, {m['cores']} cores, load avg (1 min) at start "
           f"{m['load_avg_1min']}", f"- jax {m['jax']}, flax {m['flax']}, backend {m['backend']}, "
           f"python {m['python']}", ""]
    cols = {"dp_overhead": ["model", "resolution", "batch", "microbatch", "method", "examples_per_s", "step_s",
                            "time_ratio_vs_nonprivate", "time_ratio_vs_best_nonprivate", "xla_temp_mib", "rss_growth_mib",
                            "compile_s", "error"],
            # peers_opacus / peers_same_net rows (benchmarks.peers_same_net.ROW_COLUMNS); before "peers"
            "peers_opacus": SAME_NET_COLUMNS, "peers_same_net": SAME_NET_COLUMNS,
            "peers": ["peer", "framework", "model", "resolution", "batch", "microbatch", "method",
                      "examples_per_s", "step_s", "time_ratio_vs_nonprivate"],
            "scaling": ["model", "devices", "batch", "microbatch", "examples_per_s", "step_s", "error"],
            "profile_step": ["model", "resolution", "batch", "piece", "seconds", "ratio_vs_batched_backward",
                             "compile_s"]}
    for job in result["jobs"]:
        kind = next((k for k in cols if job["name"].startswith(k)), "peers")
        out += [f"## {job['name']}", "", f"`{job['command']}` -- {job.get('status')} "
                f"({job.get('seconds', 0)} s)", ""]
        if job["rows"]:
            out += [common.markdown_table(job["rows"], cols[kind]), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, few iterations (~10 min on 2 cores)")
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--only", nargs="+", default=None, help="run only these job names")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    result = {"machine": common.machine_info(), "quick": args.quick, "jobs": []}
    for job in jobs(args.quick):
        if args.only and job["name"] not in args.only:
            continue
        result["jobs"].append(run_job(job, os.path.abspath(args.out)))
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
