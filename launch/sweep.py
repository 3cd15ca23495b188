#!/usr/bin/env python3
"""Expand a sweep over config fields into one training job per combination.

    python launch/sweep.py --config configs/chexpert_nfnet_f0.py --workdir runs/chexpert \
        --sweep privacy.epsilon=0.5,1,2,4,8 [--sweep train.batch_size=1024,4096] \
        [--set config.data.root=/data/chexpert ...] [--run | --slurm sweep.sbatch]

Several --sweep flags give the cartesian product (the first varies slowest). Each job gets
its own workdir WORKDIR/<name>, named by its field values (e.g. `epsilon-0.5_batch_size-1024`;
the full dotted field is used where two swept fields share a last component).
`--seeds 0,1,2` is `--sweep seed=0,1,2` as the last (fastest) axis. `--baseline [ARG]` adds the
non-private baseline to the same sweep: for every combination of the axes other than
privacy.epsilon one job with privacy.enabled=False (named `epsilon-non-private_...`), loaded as
CONFIG:ARG when ARG is given (e.g. `--baseline private=False` for configs/digits_finetune.py, whose
baseline uses another optimizer). `--evaluate` follows each training job with
`dpft evaluate --workdir JOB --reuse-predictions`, and the end prints the `--compare` command.

The imbalance study (minority fraction x epsilon x seeds, with the non-private baseline):

    dpft train --config configs/digits_pretrain.py --workdir runs/public
    python launch/sweep.py --config configs/digits_finetune.py --workdir runs/imbalance \
        --set model.checkpoint=runs/public/checkpoints/150/params \
        --sweep data.options.minority_fraction=0.001,0.01,0.1,0.3 \
        --sweep privacy.epsilon=1.15,4.98,16.2 --seeds 0,1,2 --baseline private=False --evaluate --run
    dpft evaluate --compare runs/imbalance/* --x data.options.minority_fraction \
        --series privacy.epsilon --out runs/imbalance-compare
Without --run/--slurm the commands are printed; --run runs them on this host, one after the
other or up to --jobs N at once (a job that exits 75, stopped early with its state saved, is rerun
to resume it; any other non-zero exit stops the sweep: no new job starts), sharing a persistent XLA
compilation cache (--compile-cache); --slurm FILE writes a SLURM array script (one array
task per job, with launch/slurm.sbatch's resources and preemption handling) to submit with
`sbatch FILE`.
Every job's config is loaded and its overrides applied before anything runs, so a typo in a
field name or a value of the wrong type fails here (--no-check skips this).

Private selection (Papernot & Steinke 2022; `dpft.privacy.selection`): instead of the grid,

    python launch/sweep.py --config C --workdir runs/tune --sweep train.learning_rate=0.5,1,2 \
        --sweep train.clip_norm=0.5,1 --private-selection geometric --trials-mean 8 --evaluate --run
    dpft evaluate --compare runs/tune/* --out runs/tune-compare

draws the number of trials K (here geometric with mean 8, from the OS's CSPRNG) and, per trial, one
value of every axis and a seed, at random; it writes WORKDIR/selection.json once (a rerun reuses it:
K is never redrawn) and runs trials WORKDIR/trial-000 ... Each trial is evaluated on the validation
split (TRIAL/selection/metrics.json); `dpft evaluate --compare` of the trials selects the best by
--select-by (default: the headline metric) and reports the (epsilon, delta) of releasing it, the
trials' cost included. Axes that change the privacy accounting (privacy.*, data.*, the batch size,
the number of updates) are refused: every trial must be the same DP mechanism.
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import shlex
import subprocess
import sys
import threading
from concurrent import futures
from typing import IO, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
STOPPED_EARLY = 75  # dpft.errors.STOPPED_EARLY_EXIT_CODE: the run saved its state; rerun to resume


class SweepError(ValueError):
    """A malformed --sweep/--set argument."""


def parse_sweep(spec: str) -> tuple[str, list[str]]:
    """'privacy.epsilon=0.5,1,2' -> ('privacy.epsilon', ['0.5', '1', '2'])."""
    if "=" not in spec:
        raise SweepError(f"--sweep {spec!r} must look like FIELD=V1,V2,...")
    field, values = spec.split("=", 1)
    field = field.strip().lstrip("-")
    if field.startswith("config."):
        field = field[len("config."):]
    if not field or any(not p for p in field.split(".")):
        raise SweepError(f"--sweep {spec!r}: malformed field name {field!r}")
    vals = [v.strip() for v in values.split(",") if v.strip()]
    if not vals:
        raise SweepError(f"--sweep {spec!r} has no values")
    if len(set(vals)) != len(vals):
        raise SweepError(f"--sweep {spec!r} repeats a value")
    return field, vals


def expand(sweeps: Sequence[tuple[str, Sequence[str]]]) -> list[dict[str, str]]:
    """Cartesian product of the sweeps: a list of {field: value} (first field slowest)."""
    fields = [f for f, _ in sweeps]
    if len(set(fields)) != len(fields):
        raise SweepError(f"a field is swept twice: {fields}")
    return [dict(zip(fields, combo)) for combo in itertools.product(*[v for _, v in sweeps])]


def _clean(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "x"


def job_name(assignment: dict[str, str]) -> str:
    """A directory name for one job, e.g. 'epsilon-0.5_batch_size-1024'."""
    leaves = [f.split(".")[-1] for f in assignment]
    parts = []
    for field, leaf in zip(assignment, leaves):
        key = leaf if leaves.count(leaf) == 1 else field
        parts.append(f"{_clean(key)}-{_clean(assignment[field])}")
    return "_".join(parts) or "default"


NON_PRIVATE = "non-private"  # the privacy.epsilon value of a baseline job


def job_overrides(assignment: dict[str, str]) -> list[str]:
    """--config.F=V per field; the baseline's epsilon becomes privacy.enabled=False."""
    out = []
    for f, v in assignment.items():
        out.append("--config.privacy.enabled=False" if (f, v) == ("privacy.epsilon", NON_PRIVATE) else f"--config.{f}={v}")
    return out


def evaluate_command(dpft: str, workdir: str) -> list[str]:
    return [dpft, "evaluate", "--workdir", workdir, "--reuse-predictions"]


def train_command(dpft: str, config: str, workdir: str, overrides: Sequence[str]) -> list[str]:
    return [dpft, "train", "--config", config, "--workdir", workdir, *overrides]


def check_jobs(config: str, jobs: Sequence[tuple]) -> None:
    """Load the config with each job's overrides (UsageError on a bad field or value); a job may
    carry its own config path as a third element (the baseline's CONFIG:ARG)."""
    _dpft_importable()
    from dpft.config.base import load_config

    for job in jobs:
        cfg = load_config(job[2] if len(job) > 2 else config, job[1])
        if any(o == "--config.privacy.enabled=False" for o in job[1]) and cfg.privacy.enabled:
            raise SweepError(f"baseline job {job[0]} is still private")


RESOURCES_END = "# --- end of resources"


def sbatch_resources(runner: str) -> list[str]:
    """The `#SBATCH` option lines of launch/slurm.sbatch (GPUs, CPUs, time, signal, requeue), in order."""
    out = []
    with open(runner, encoding="utf-8") as f:
        for line in f:
            if line.startswith(RESOURCES_END):
                break
            if line.startswith("#SBATCH "):
                out.append(line[len("#SBATCH "):].strip())
    return out


def _option_name(opt: str) -> str:
    return opt.split("=", 1)[0].split()[0]


def slurm_array_script(
    jobs: Sequence[tuple], *, config: str, sbatch_options: Sequence[str] = (), job_name_: str = "dpft-sweep",
    evaluate: str | None = None, select: bool = False,
) -> str:
    """A bash script for `sbatch`: array task i trains job i.

    It carries launch/slurm.sbatch's own `#SBATCH` resources (GPUs, CPUs per task, time, the
    SIGUSR1 before the time limit, requeue) — sbatch reads only the submitted file's `#SBATCH`
    lines — with `sbatch_options` replacing those of the same name; the array task then runs
    slurm.sbatch's body (signal forwarding, exit 75 -> `scontrol requeue` of this array task).
    """
    runner = os.path.join(HERE, "slurm.sbatch")
    extra = [o.strip() for o in sbatch_options]
    replaced = {_option_name(o) for o in extra} | {"--job-name", "--output", "--array"}
    options = [f"--job-name={job_name_}", f"--array=0-{len(jobs) - 1}", "--output=%x-%A_%a.out"]
    options += [o for o in sbatch_resources(runner) if _option_name(o) not in replaced]
    options += extra
    lines = ["#!/usr/bin/env bash"] + [f"#SBATCH {opt}" for opt in options]
    lines += [
        "# Generated by launch/sweep.py; one array task per job, with the resources of",
        "# launch/slurm.sbatch (override with sweep.py --sbatch-option=--gpus-per-node=8 etc.).",
        "set -euo pipefail",
        'case "${SLURM_ARRAY_TASK_ID:?run this script with sbatch}" in',
    ]
    for i, job in enumerate(jobs):
        workdir, overrides = job[0], job[1]
        args = " ".join(shlex.quote(a) for a in [job[2] if len(job) > 2 else config, workdir, *overrides])
        lines.append(f"  {i}) args=({args}) ;;")
    lines += [
        '  *) echo "no job for array task $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;',
        "esac",
    ]
    if evaluate:
        # The batch shell stays (to evaluate after training), so it forwards SLURM's signals to the run.
        lines += [f'bash {shlex.quote(runner)} "${{args[@]}}" &',
                  'pid=$!',
                  'trap \'kill -USR1 "$pid" 2>/dev/null\' USR1',
                  'trap \'kill -TERM "$pid" 2>/dev/null\' TERM',
                  'rc=0',
                  'while true; do rc=0; wait "$pid" || rc=$?; kill -0 "$pid" 2>/dev/null || break; done',
                  '[ "$rc" -eq 0 ] || exit "$rc"',
                  *([shlex.join(selection_evaluate_command(evaluate, "WORKDIR")).replace("WORKDIR", '"${args[1]}"')]
                    if select else []),
                  f'exec {shlex.quote(evaluate)} evaluate --workdir "${{args[1]}}" --reuse-predictions', ""]
    else:
        # exec: the batch shell itself runs slurm.sbatch's body, so SLURM's SIGUSR1 reaches its trap.
        lines += [f'exec bash {shlex.quote(runner)} "${{args[@]}}"', ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="config file, optionally with :ARG")
    p.add_argument("--workdir", required=True, help="parent of the per-job workdirs")
    p.add_argument("--sweep", action="append", default=[], metavar="FIELD=V1,V2,...",
                   help="a config field and its values; repeat for a cartesian product")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a fixed override applied to every job")
    p.add_argument("--seeds", metavar="S1,S2,...", help="sweep the run seed (config field `seed`) last")
    p.add_argument("--baseline", nargs="?", const="", default=None, metavar="CONFIG_ARG",
                   help="add the non-private baseline per combination of the other axes (CONFIG:CONFIG_ARG if given)")
    p.add_argument("--evaluate", action="store_true",
                   help="follow each training job with `dpft evaluate --workdir JOB --reuse-predictions`")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--run", action="store_true", help="run the jobs sequentially on this host")
    mode.add_argument("--slurm", metavar="FILE", help="write a SLURM array script to FILE")
    p.add_argument("--sbatch-option", action="append", default=[], metavar="OPT",
                   help="extra #SBATCH line for --slurm, e.g. --sbatch-option=--gpus-per-node=8")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="with --run, run up to N jobs at once, each job's output in JOB/sweep.log (default 1: one "
                        "after the other, output here); on a CPU host 2 overlaps one job's start-up, checkpoints "
                        "and evaluation with another's training")
    p.add_argument("--keep-going", action="store_true", help="with --run, continue after a failed job")
    p.add_argument("--no-resume-stopped", dest="resume_stopped", action="store_false",
                   help="with --run, treat a job stopped early (exit 75) as failed instead of rerunning it")
    p.add_argument("--no-check", action="store_true", help="do not load the config to check the overrides")
    p.add_argument("--dpft", default="dpft", help="the dpft executable")
    p.add_argument("--private-selection", metavar="DIST", default=None,
                   help="run a random number of trials with random hyper-parameters and select privately: DIST = "
                        "poisson | geometric | logarithmic | negative_binomial:ETA (with --trials-mean)")
    p.add_argument("--trials-mean", type=float, default=None, metavar="M",
                   help="with --private-selection, the expected number of trials (>= 1)")
    p.add_argument("--select-by", default=None, metavar="METRIC",
                   help="with --private-selection, the validation metric to maximise (default: the headline metric)")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="with --run, the persistent XLA compilation cache the jobs share (default WORKDIR-jax-cache, "
                        "or $JAX_COMPILATION_CACHE_DIR when set; '' = none): a job loads the programs an earlier job "
                        "of the same shapes compiled")
    return p


def fixed_overrides(args: argparse.Namespace) -> list[str]:
    """--set FIELD=VALUE as --config.FIELD=VALUE."""
    fixed = []
    for s in args.set:
        body = s.lstrip("-")
        if "=" not in body:
            raise SweepError(f"--set {s!r} must look like FIELD=VALUE")
        fixed.append("--" + (body if body.startswith("config.") else "config." + body))
    return fixed


def make_jobs(args: argparse.Namespace) -> list[tuple]:
    """[(workdir, overrides)] for every combination of the sweeps, then the baseline jobs
    (workdir, overrides, config) if asked; with --private-selection, the trials (`selection_trials`)."""
    if getattr(args, "private_selection", None) is not None:
        return selection_trials(args)[0]
    specs = list(args.sweep) + ([f"seed={args.seeds}"] if getattr(args, "seeds", None) else [])
    if not specs:
        raise SweepError("give at least one --sweep FIELD=V1,V2,... (or --seeds)")
    fixed = fixed_overrides(args)
    sweeps = [parse_sweep(s) for s in specs]
    jobs: list[tuple] = []
    for assignment in expand(sweeps):
        jobs.append((os.path.join(args.workdir, job_name(assignment)), fixed + job_overrides(assignment)))
    baseline = getattr(args, "baseline", None)
    if baseline is not None:
        if not any(f == "privacy.epsilon" for f, _ in sweeps):
            raise SweepError("--baseline needs a --sweep privacy.epsilon=... axis to add the non-private value to")
        base_config = args.config.split(":", 1)[0] + (f":{baseline}" if baseline else "")
        if baseline and ":" in args.config:
            raise SweepError("--baseline CONFIG_ARG replaces the config argument; give --config without ':ARG'")
        axes = [(f, [NON_PRIVATE] if f == "privacy.epsilon" else v) for f, v in sweeps]
        for assignment in expand(axes):
            jobs.append((os.path.join(args.workdir, job_name(assignment)), fixed + job_overrides(assignment),
                         base_config))
    return jobs


def _dpft_importable() -> None:
    """This checkout's dpft importable (the script also runs from a checkout without an install)."""
    root = os.path.dirname(HERE)
    if root not in sys.path:
        sys.path.insert(0, root)


def selection_trials(args: argparse.Namespace) -> tuple[list[tuple], dict]:
    """The jobs of --private-selection and the selection record: read from WORKDIR/selection.json when a
    previous call wrote it (the same settings required: K is drawn once), else drawn now (not yet written:
    `write_selection`)."""
    from dpft.privacy import selection

    if args.trials_mean is None:
        raise SweepError("--private-selection needs --trials-mean M (the expected number of trials)")
    if getattr(args, "seeds", None) or getattr(args, "baseline", None) is not None:
        raise SweepError("--private-selection draws each trial's seed itself and selects among private runs: "
                         "drop --seeds and --baseline")
    if not args.sweep:
        raise SweepError("--private-selection needs the candidates: give at least one --sweep FIELD=V1,V2,...")
    axes = [parse_sweep(s) for s in args.sweep]
    fields = [f for f, _ in axes]
    if len(set(fields)) != len(fields):
        raise SweepError(f"a field is swept twice: {fields}")
    for field in fields:
        if field == "seed" or selection.accounting_field(field):
            raise SweepError(f"--private-selection: --sweep {field}=... would make the trials differ in their "
                             f"privacy accounting (or their seed, which each trial draws): every trial must be the "
                             f"same DP mechanism; sweep training hyper-parameters only")
    try:
        scheme = selection.Scheme(args.private_selection, float(args.trials_mean))
    except ValueError as e:
        raise SweepError(f"--private-selection {args.private_selection} --trials-mean {args.trials_mean}: {e}") from None
    path = os.path.join(args.workdir, selection.SELECTION_FILE)
    if os.path.exists(path):
        import json

        with open(path, encoding="utf-8") as f:
            try:
                old_scheme, doc = selection.read_selection_doc(json.load(f), path)
            except json.JSONDecodeError as e:
                raise SweepError(f"{path}: not valid JSON ({e})") from None
        if old_scheme != scheme or [list(a) for a in doc["axes"]] != [[f, list(v)] for f, v in axes] \
                or doc.get("metric") != args.select_by:
            raise SweepError(f"{path} holds a selection drawn with other settings ({doc['scheme']}, axes "
                             f"{doc['axes']}, metric {doc.get('metric')}): its trials are the selection; rerun with "
                             "those settings, or use another --workdir (drawing K again would void the guarantee)")
    else:
        trials = selection.draw_trials(axes, selection.draw_num_trials(scheme))
        doc = selection.selection_doc(scheme, axes, trials, args.select_by)
    fixed = fixed_overrides(args)
    jobs = [(os.path.join(args.workdir, t["name"]), fixed + job_overrides(t["assignment"])) for t in doc["trials"]]
    return jobs, doc


def write_selection(args: argparse.Namespace, doc: dict) -> None:
    """WORKDIR/selection.json, once (owner-only: it says which trials exist before any result does)."""
    _dpft_importable()
    from dpft import atomic_io
    from dpft.privacy import selection

    path = os.path.join(args.workdir, selection.SELECTION_FILE)
    if os.path.exists(path):
        return
    os.makedirs(args.workdir, exist_ok=True)
    atomic_io.write_json(path, doc, indent=2, private=True)
    print(f"private selection: {doc['num_trials']} trials drawn ({doc['scheme']['distribution']}, mean "
          f"{doc['scheme']['mean']:g}); written to {path}", flush=True)


def selection_evaluate_command(dpft: str, workdir: str) -> list[str]:
    """A trial's evaluation on the validation split, where the selection's score is read."""
    _dpft_importable()
    from dpft.privacy import selection
    from dpft.workdir import contract

    return [dpft, "evaluate", "--workdir", workdir, "--reuse-predictions", "--split", contract.VALIDATION,
            "--out", os.path.join(workdir, selection.SELECTION_EVAL_DIR), "--no-plots"]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    selection_doc = None
    try:
        if args.jobs < 1:
            raise SweepError(f"--jobs {args.jobs}: give a number of jobs >= 1")
        if args.private_selection is None and (args.trials_mean is not None or args.select_by is not None):
            raise SweepError("--trials-mean and --select-by belong to --private-selection")
        if args.private_selection is not None:
            jobs, selection_doc = selection_trials(args)
            args.evaluate = True  # the trials' metrics: the comparison's table and the selection's scores
        else:
            jobs = make_jobs(args)
        if not args.no_check:
            check_jobs(args.config, jobs)
    except ValueError as e:  # SweepError and dpft.cli.UsageError
        print(f"sweep: error: {e}", file=sys.stderr)
        return 2
    if selection_doc is not None:
        write_selection(args, selection_doc)
        if not jobs:
            print("private selection: K = 0 trials drawn (Poisson): nothing runs and nothing is released")
            return 0
    commands = [train_command(args.dpft, job[2] if len(job) > 2 else args.config, job[0], job[1]) for job in jobs]
    compare_hint = compare_command(args)
    if args.slurm:
        with open(args.slurm, "w", encoding="utf-8") as f:
            f.write(slurm_array_script(jobs, config=args.config, sbatch_options=args.sbatch_option,
                                       evaluate=args.dpft if args.evaluate else None,
                                       select=selection_doc is not None))
        os.chmod(args.slurm, 0o755)
        print(f"wrote {args.slurm} ({len(jobs)} array tasks); submit with: sbatch {shlex.quote(args.slurm)}")
        print(f"then: {compare_hint}")
        return 0
    if not args.run:
        for job, cmd in zip(jobs, commands):
            extra = f" && {shlex.join(evaluate_command(args.dpft, job[0]))}" if args.evaluate else ""
            if selection_doc is not None:
                extra += f" && {shlex.join(selection_evaluate_command(args.dpft, job[0]))}"
            print(shlex.join(cmd) + extra)
        return 0
    env = job_environment(args)
    stop = threading.Event()  # set by a failed job without --keep-going: no new job starts

    def one(i: int) -> int | None:
        if stop.is_set():
            return None
        os.makedirs(jobs[i][0], exist_ok=True)
        if args.jobs == 1:
            print(f"[{i + 1}/{len(commands)}] {shlex.join(commands[i])}", flush=True)
            rc = run_job(commands[i], jobs[i][0], args, env, None)
        else:
            log_path = os.path.join(jobs[i][0], "sweep.log")
            print(f"[{i + 1}/{len(commands)}] started (output in {log_path}): {shlex.join(commands[i])}", flush=True)
            with open(log_path, "a", encoding="utf-8") as log:
                rc = run_job(commands[i], jobs[i][0], args, env, log)
            print(f"[{i + 1}/{len(commands)}] {'done' if rc == 0 else f'exited with {rc}'}: {jobs[i][0]}", flush=True)
        if rc != 0:
            print(f"sweep: job {i} exited with {rc}", file=sys.stderr)
            if not args.keep_going:
                stop.set()
        return rc

    with futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        codes = list(pool.map(one, range(len(commands))))
    failures = [rc for rc in codes if rc not in (0, None)]
    if failures and not args.keep_going:
        return failures[0]
    if not failures:
        print(f"compare with: {compare_hint}")
    return 1 if failures else 0


def run_job(cmd: list[str], workdir: str, args: argparse.Namespace, env: dict[str, str], out: IO | None) -> int:
    """One --run job: the training (rerun while it exits 75, stopped early with its state saved, unless
    --no-resume-stopped), then with --evaluate `dpft evaluate`; output to `out` (None: this process's).
    Returns the first non-zero exit status, else 0."""
    rc = subprocess.call(cmd, env=env, stdout=out, stderr=out)
    while rc == STOPPED_EARLY and args.resume_stopped:
        print(f"sweep: job {workdir} stopped early (exit {STOPPED_EARLY}); rerunning it to resume", file=sys.stderr)
        rc = subprocess.call(cmd, env=env, stdout=out, stderr=out)
    if rc == 0 and args.evaluate:
        rc = subprocess.call(evaluate_command(args.dpft, workdir), stdout=subprocess.DEVNULL, stderr=out, env=env)
    if rc == 0 and args.private_selection is not None:
        rc = subprocess.call(selection_evaluate_command(args.dpft, workdir), stdout=subprocess.DEVNULL, stderr=out,
                             env=env)
    return rc


def job_environment(args: argparse.Namespace) -> dict[str, str]:
    """The environment of --run's jobs: this one, with a persistent XLA compilation cache they share
    (--compile-cache; the jobs of a study compile the same programs, seed after seed). Outside WORKDIR,
    so WORKDIR/* stays the runs."""
    env = dict(os.environ)
    cache = args.compile_cache if args.compile_cache is not None else (
        env.get("JAX_COMPILATION_CACHE_DIR") or args.workdir.rstrip("/") + "-jax-cache")
    if cache:
        env["JAX_COMPILATION_CACHE_DIR"] = os.path.abspath(cache)
    else:
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return env


def compare_command(args: argparse.Namespace) -> str:
    """The `dpft evaluate --compare` command for this sweep (x: epsilon if swept, series: another axis)."""
    fields = [parse_sweep(s)[0] for s in args.sweep]
    x = "privacy.epsilon" if "privacy.epsilon" in fields else (fields[0] if fields else "seed")
    others = [f for f in fields if f != x and "seed" not in f.split(".")[-1]]  # seeds are aggregated
    if getattr(args, "private_selection", None) is not None:  # the trials only (WORKDIR also holds selection.json)
        return " ".join([shlex.quote(args.dpft), "evaluate", "--compare", os.path.join(args.workdir, "trial-*"),
                         "--out", shlex.quote(args.workdir.rstrip("/") + "-compare")])
    cmd = [args.dpft, "evaluate", "--compare", os.path.join(args.workdir, "*"), "--x", x]
    if others:
        cmd += ["--series", others[0]]
    cmd += ["--out", args.workdir.rstrip("/") + "-compare"]  # outside WORKDIR, so WORKDIR/* stays runs only
    return " ".join(shlex.quote(c) if "*" not in c else c for c in cmd)


if __name__ == "__main__":
    sys.exit(main())
