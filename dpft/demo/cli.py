"""`dpft demo`: arguments and the order of the steps (`dpft.demo.steps`), then the report."""
from __future__ import annotations

import argparse
import os
import time
from typing import Any

from dpft.demo.recipe import DEFAULT_MODEL, MODELS
from dpft.demo.report import summary_table, write_report
from dpft.demo.report import units_table
from dpft.demo.steps import enable_compilation_cache, fine_tune_sweep, imbalance_study, pretrain, unit_study
from dpft.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="./dpft-demo", help="where everything is written (default ./dpft-demo)")
    parser.add_argument("--epsilons", default="1,4,8", help="target epsilons of the private runs (comma list)")
    parser.add_argument("--minority-fraction", type=float, default=0.05,
                        help="share of rotated digits in the private training split (default 0.05)")
    parser.add_argument("--imbalance", default="",
                        help="also run the imbalance study at these minority fractions, e.g. 0.001,0.01,0.1,0.3")
    parser.add_argument("--imbalance-epsilons", default="1.15,4.98,16.2",
                        help="epsilons of the imbalance study (non-private is always added)")
    parser.add_argument("--units", type=float, default=0.0, metavar="EPSILON",
                        help="also compare the privacy units (example vs patient) at this epsilon per patient, on the "
                             "digits grouped into patients of 1-6 images (digits_patients); 0 = off")
    parser.add_argument("--seeds", default="0,1,2", help="run seeds of the imbalance study (comma list, default 0,1,2)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates per evaluation")
    parser.add_argument("--updates", type=int, default=40, help="DP fine-tuning updates per run")
    parser.add_argument("--pretrain-updates", type=int, default=150, help="public pre-training updates")
    parser.add_argument("--quick", action="store_true", help="fewer updates and bootstrap samples (smoke test)")
    parser.add_argument("--study", default=None, choices=("mechanisms",),
                        help="instead of the demo: the mechanisms study (DP-SGD vs BandMF; full vs head / "
                             "norms_and_head / LoRA fine-tuning) over --epsilons x --seeds, in WORKDIR/mechanisms")
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=MODELS,
                        help=f"the NFNet (default {DEFAULT_MODEL}; nfnet_nano compiles in about half the time)")


def _floats(text: str, name: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--{name} must be a comma-separated list of numbers, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from dpft.evaluate import compare

    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    enable_compilation_cache(workdir)
    epsilons = _floats(args.epsilons, "epsilons")
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--seeds must be a comma-separated list of integers, got {args.seeds!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds must list distinct integers, got {args.seeds!r}")
    fractions = _floats(args.imbalance, "imbalance") if args.imbalance else []
    if any(e <= 0 for e in epsilons + _floats(args.imbalance_epsilons, "imbalance-epsilons")):
        raise UsageError(f"--epsilons must be > 0, got {args.epsilons!r}")
    if args.units < 0:
        raise UsageError(f"--units must be an epsilon > 0 (or 0: off), got {args.units!r}")
    if any(not 0 < f < 1 for f in fractions + [args.minority_fraction]):
        raise UsageError("minority fractions must be in (0, 1)")
    updates = max(4, args.updates // 4) if args.quick else args.updates
    pre_updates = max(4, args.pretrain_updates // 4) if args.quick else args.pretrain_updates
    n_resamples = 50 if args.quick else args.bootstrap
    t0 = time.monotonic()

    checkpoint = pretrain(workdir, pre_updates, model=args.model)
    if args.study == "mechanisms":
        return run_mechanisms_study(args, workdir, checkpoint, epsilons, seeds, updates, n_resamples, t0)
    print(f"[2/4] private fine-tuning at epsilon {', '.join(f'{e:g}' for e in epsilons)} and non-private "
          f"(minority = {args.minority_fraction:g} of the private training set)")
    rows = fine_tune_sweep(workdir, checkpoint, epsilons, updates=updates,
                           minority_fraction=args.minority_fraction, n_resamples=n_resamples, tag="finetune/",
                           model=args.model)
    print("[3/4] sweep comparison from the saved checkpoints' evaluations")
    cmp = compare.compare_runs([r["dir"] for r in rows], os.path.join(workdir, "compare"))
    study: dict[str, Any] = {}
    if fractions:
        eps_study = _floats(args.imbalance_epsilons, "imbalance-epsilons")
        n = len(fractions) * (len(eps_study) + 1) * len(seeds)
        print(f"      imbalance study: minority fraction {', '.join(f'{f:g}' for f in fractions)} x epsilon "
              f"{', '.join(f'{e:.2f}' for e in eps_study)} and non-private x seeds {', '.join(map(str, seeds))} "
              f"({n} runs)")
        study = imbalance_study(workdir, checkpoint, fractions, eps_study, seeds, updates=updates,
                                n_resamples=n_resamples, model=args.model)
    units: list[dict] = []
    if args.units:
        print(f"      privacy units: example vs patient at epsilon {args.units:g} per patient (digits_patients)")
        units = unit_study(workdir, checkpoint, args.units, updates=updates, minority_fraction=args.minority_fraction,
                           n_resamples=n_resamples, model=args.model)
    elapsed = time.monotonic() - t0
    print("[4/4] summary")
    table = summary_table(rows)
    print(table)
    if units:
        print("\nprivacy units at the same epsilon per patient:")
        print(units_table(units))
    if study:
        print("\nimbalance study (" + study["files"]["md"] + "):")
        print(open(study["files"]["md"], encoding="utf-8").read().split("\n## Runs")[0].split("\n", 1)[1].strip())
    write_report(workdir, rows, cmp, study, elapsed, args, units)
    print(f"\nwhole demo: {elapsed / 60:.1f} min; report: {os.path.join(workdir, 'report.md')}")
    return 0


def run_mechanisms_study(args: argparse.Namespace, workdir: str, checkpoint: str, epsilons: list[float],
                         seeds: list[int], updates: int, n_resamples: int, t0: float) -> int:
    """`--study mechanisms` (`dpft.demo.mechanisms`): the runs, the table, WORKDIR/mechanisms/report.md."""
    from dpft import atomic_io
    from dpft.demo import mechanisms

    print(f"[2/3] mechanisms study: {', '.join(mechanisms.VARIANTS)} x epsilon "
          f"{', '.join(f'{e:g}' for e in epsilons)} x seeds {', '.join(map(str, seeds))}, {updates} updates each")
    study = mechanisms.mechanisms_study(workdir, checkpoint, epsilons, seeds, updates=updates,
                                       minority_fraction=args.minority_fraction, n_resamples=n_resamples,
                                       model=args.model)
    table = mechanisms.study_table(study["rows"])
    elapsed = time.monotonic() - t0
    print("[3/3] summary (mean over seeds [95% t interval over seeds])")
    print(table)
    command = "dpft demo --study mechanisms " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in (("workdir", args.workdir), ("epsilons", args.epsilons),
                                                    ("seeds", args.seeds), ("updates", args.updates),
                                                    ("model", args.model), ("bootstrap", args.bootstrap)))
    report = ["# Mechanisms study", "", f"Made by `{command}`{' --quick' if args.quick else ''} in "
              f"{elapsed / 60:.1f} min.", "",
              f"The demo's private fine-tuning ({args.model}, {updates} updates of expected batch 128 on about 520 "
              f"private digits, minority fraction {args.minority_fraction:g}) with each variant's fields changed "
              "(`dpft.demo.mechanisms.VARIANTS`). Accuracy and the accuracy gap between the majority and the minority "
              "on the test split: mean over seeds [95% t interval over seeds]; seconds per update: median over "
              "updates after the first two, then over the runs.", "", table, "",
              *[f"Comparison over {name}: `{os.path.relpath(files['md'], workdir)}`"
                for name, files in study["comparisons"].items()]]
    atomic_io.write_text(os.path.join(study["root"], "report.md"), "\n".join(report) + "\n")
    atomic_io.write_json(os.path.join(study["root"], "summary.json"), {"rows": study["rows"], "elapsed_s": elapsed},
                         indent=2, default=str)
    print(f"\nstudy: {elapsed / 60:.1f} min; report: {os.path.join(study['root'], 'report.md')}")
    return 0
