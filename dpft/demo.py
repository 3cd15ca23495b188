"""`dpft demo`: the whole recipe, offline, on scikit-learn's digits, in minutes on a CPU.

1. "Public pre-training": a tiny NFNet trained non-privately on the public split
   (upright digits only), exported in DeepMind's Haiku checkpoint format.
2. Private fine-tuning from that checkpoint with DP-SGD at several epsilons and
   non-privately, through the same `dpft.train` path as the big configs (Poisson
   sampling, physical batches + accumulation, augmult, EMA, ledger, checkpoints), on
   the private split, where a minority subgroup (digits rotated by 90 degrees) is rare.
3. Evaluation of each saved checkpoint (accuracy, per-group accuracy and gap, parity,
   patient-level bootstrap CIs, individual epsilons per group) and the sweep comparison.
4. A summary table on the terminal and `report.md` + PNGs in the workdir.

`dpft demo --imbalance 0.001,0.01,0.1,0.3` adds the imbalance study of Berrada et al. (2023):
minority fraction x epsilon (default 1.15, 4.98, 16.2) x seeds (default 0, 1, 2), with the
non-private baseline at every fraction, evaluated like any run and compared with
`dpft.evaluate.compare.compare_runs(x="data.options.minority_fraction", series="privacy.epsilon")`
(accuracy, its gap, every parity metric; mean and CI over seeds): `imbalance/compare.{md,json,png}`.
The same study from the command line is `configs/digits_pretrain.py` + `launch/sweep.py` over
`configs/digits_finetune.py` (README, "Fairness studies"); its runs are named the same way.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Any

import ml_collections

from dpft.errors import UsageError

MINORITY = "minority"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="./dpft-demo", help="where everything is written (default ./dpft-demo)")
    parser.add_argument("--epsilons", default="1,4,8", help="target epsilons of the private runs (comma list)")
    parser.add_argument("--minority-fraction", type=float, default=0.05,
                        help="share of rotated digits in the private training split (default 0.05)")
    parser.add_argument("--imbalance", default="",
                        help="also run the imbalance study at these minority fractions, e.g. 0.001,0.01,0.1,0.3")
    parser.add_argument("--imbalance-epsilons", default="1.15,4.98,16.2",
                        help="epsilons of the imbalance study (non-private is always added)")
    parser.add_argument("--seeds", default="0,1,2", help="run seeds of the imbalance study (comma list, default 0,1,2)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates per evaluation")
    parser.add_argument("--updates", type=int, default=40, help="DP fine-tuning updates per run")
    parser.add_argument("--pretrain-updates", type=int, default=150, help="public pre-training updates")
    parser.add_argument("--quick", action="store_true", help="fewer updates and bootstrap samples (smoke test)")


def _floats(text: str, name: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--{name} must be a comma-separated list of numbers, got {text!r}") from None


def recipe(*, private: bool, epsilon: float = 8.0, updates: int, checkpoint: str = "",
           train_split: str = "train", minority_fraction: float = 0.05, seed: int = 0,
           learning_rate: float = 1e-3, eval_minority_fraction: float = 0.1,
           num_devices: int | None = None) -> ml_collections.ConfigDict:
    """The demo's run config: tiny NFNet on 32x32 digits; the same fields as configs/*.py.

    The physical batch (64 examples per host) is split over `num_devices` local devices
    (default: all of them); the microbatch is the largest divisor of the per-device share <= 16.
    """
    from dpft.config.base import base_config

    if num_devices is None:
        import jax

        num_devices = jax.local_device_count()
    physical = max(64, num_devices) // num_devices * num_devices
    per_device = physical // num_devices
    microbatch = max(d for d in range(1, min(16, per_device) + 1) if per_device % d == 0)

    c = base_config(locked=False)
    c.seed = seed
    c.model.name = "nfnet_tiny"
    c.model.checkpoint = checkpoint
    c.data.name = "digits"
    c.data.image_size = 32
    c.data.eval_image_size = 32
    c.data.augmult = 2 if private else 1
    c.data.random_crop = True
    c.data.random_flip = False  # digits are not mirror-symmetric
    c.data.options = ml_collections.ConfigDict({
        # public / private train / validation / test shares of the 1,797 digits
        "split_fractions": (0.2, 0.55, 0.1, 0.15),
        "minority_fraction": minority_fraction, "eval_minority_fraction": eval_minority_fraction,
        "train_split": train_split, "crop": "pad_crop"})
    c.privacy.enabled = private
    c.privacy.epsilon = epsilon
    c.privacy.delta = 0.0  # 1/N
    c.privacy.noise_multiplier = 0.0  # calibrated from epsilon
    c.privacy.clip_norm = 1.0
    c.train.batch_size = 128
    c.train.physical_batch_size = physical
    c.train.microbatch_size = microbatch  # 8-16: the fastest DP step on CPU (benchmarks/README.md)
    c.train.num_updates = updates
    # DP-SGD as in the papers: plain SGD (no momentum), a large step on the clipped, noisy mean
    # (its norm is bounded by C), and an EMA. Adam would normalise the noise away per
    # coordinate, so runs at different epsilons with one seed would take near-identical steps.
    # The non-private baseline's unclipped gradients need Adam's small steps.
    c.train.optimizer.name = "sgd" if private else "adam"
    c.train.optimizer.learning_rate = 0.5 if private else learning_rate
    c.train.lr_schedule.name = "constant"
    c.train.lr_schedule.warmup_steps = 0
    c.train.ema_decay = 0.9 if private else 0.0
    c.train.eval_every = 0
    c.train.checkpoint_every = max(updates // 2, 1)
    c.train.log_every = max(updates // 4, 1)
    c.train.keep_checkpoints = 2
    c.eval.batch_size = 256
    c.eval.params = "ema" if c.train.ema_decay > 0 else "raw"
    c.eval.splits = ("test",)
    c.individual.enabled = private
    c.individual.every = max(updates // 4, 1)
    c.individual.norm_grid = 0.01
    c.lock()
    return c


def _enable_compilation_cache(workdir: str) -> None:
    """Runs of the same shapes share compiled programs through jax's persistent cache."""
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(workdir), ".jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def pretrain(workdir: str, updates: int, print_fn=print) -> str:
    """Non-private training on the public split; returns the exported Haiku checkpoint path."""
    from dpft.models import checkpoints
    from dpft.train import loop

    run_dir = os.path.join(workdir, "public_pretraining")
    path = os.path.join(run_dir, "nfnet_tiny_public.pkl")
    if os.path.isfile(path):
        print_fn(f"[1/4] public pre-training: reusing {path}")
        return path
    print_fn("[1/4] public pre-training (non-private, upright digits only)")
    trainer = loop.Trainer(recipe(private=False, updates=updates, train_split="public", minority_fraction=0.0,
                                  learning_rate=3e-3),
                           run_dir, print_fn=lambda s: print_fn("      " + s))
    trainer.run()
    params, _ = trainer.eval_params()
    checkpoints.save_model(trainer.merge(params), path)
    return path


def _eval_run(run_dir: str, n_resamples: int, plots: bool = True) -> dict[str, Any]:
    from dpft.evaluate import reports

    pred_root = os.path.join(run_dir, "predictions")
    step = max(int(s) for s in os.listdir(pred_root))
    test = os.path.join(pred_root, str(step), "test.npz")
    val = os.path.join(pred_root, str(step), "validation.npz")
    return reports.evaluate_predictions(test, val if os.path.isfile(val) else None,
                                        n_resamples=n_resamples, min_group_size=20, plots=plots)


def _summary_row(name: str, epsilon: float | None, result: dict, run_dir: str) -> dict[str, Any]:
    groups = result["groups"].get("group", {})
    gap = result["gaps"].get("group", {}).get("top1", {})
    row = {
        "run": name, "epsilon": epsilon,
        "accuracy": result["overall"]["top1"]["value"],
        "majority_accuracy": groups.get("majority", {}).get("metrics", {}).get("top1", {}).get("value"),
        "minority_accuracy": groups.get(MINORITY, {}).get("metrics", {}).get("top1", {}).get("value"),
        "gap": gap.get("gap", {}).get("value"),
        "gap_ci": gap.get("gap", {}).get("ci"),
        "gap_undefined": gap.get("gap", {}).get("undefined"),
        "dir": run_dir,
    }
    ind = result.get("individual_epsilon")
    if ind:
        row["individual_epsilon_median"] = ind.get("overall", {}).get("q50")
    return row


def fine_tune_sweep(workdir: str, checkpoint: str, epsilons: list[float], *, updates: int,
                    minority_fraction: float, n_resamples: int, print_fn=print, tag: str = "") -> list[dict]:
    """One DP run per epsilon plus a non-private run, each evaluated from its checkpoint."""
    from dpft.train import loop

    rows = []
    runs = [(e, True) for e in epsilons] + [(None, False)]
    for i, (eps, private) in enumerate(runs):
        name = f"eps_{eps:g}" if private else "non_private"
        run_dir = os.path.join(workdir, f"{tag}{name}")
        print_fn(f"      [{i + 1}/{len(runs)}] {name}{' ' + tag.rstrip('_/') if tag else ''}")
        cfg = recipe(private=private, epsilon=eps or 8.0, updates=updates, checkpoint=checkpoint,
                     minority_fraction=minority_fraction)
        loop.Trainer(cfg, run_dir, print_fn=lambda s: print_fn("          " + s)).run()
        rows.append(_summary_row(name, eps, _eval_run(run_dir, n_resamples), run_dir))
    return rows


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def summary_table(rows: list[dict]) -> str:
    """The demo's runs: accuracy overall and per group, the gap (max - min over groups) with its CI."""
    header = ("| run | epsilon | accuracy | majority acc. | minority acc. | accuracy gap, max - min (95% CI) | "
              "median individual eps |")
    lines = [header, "|" + "---|" * 7]
    for r in rows:
        ci = r.get("gap_ci")
        if r["gap"] is None:
            gap = f"n/a ({r.get('gap_undefined') or 'undefined'})"
        else:
            gap = _fmt(r["gap"]) + (f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci and ci[0] is not None else "")
        eps = f"{r['epsilon']:.2f}" if r["epsilon"] else "non-private"
        lines.append(f"| {r['run']} | {eps} | {_fmt(r['accuracy'])} | "
                     f"{_fmt(r['majority_accuracy'])} | {_fmt(r['minority_accuracy'])} | {gap} | "
                     f"{_fmt(r.get('individual_epsilon_median'))} |")
    return "\n".join(lines)


def imbalance_study(workdir: str, checkpoint: str, fractions: list[float], epsilons: list[float], seeds: list[int],
                    *, updates: int, n_resamples: int, print_fn=print) -> dict[str, Any]:
    """Minority fraction x (epsilons + non-private) x seeds, each run evaluated from its checkpoint,
    then compared over minority fraction with one line per epsilon (mean and CI over seeds)."""
    from dpft.evaluate import compare
    from dpft.train import loop

    root = os.path.join(workdir, "imbalance")
    grid = [(f, e, s) for f in fractions for e in [*epsilons, None] for s in seeds]
    dirs = []
    for i, (frac, eps, seed) in enumerate(grid):
        name = f"minority_fraction-{frac:g}_epsilon-{'non-private' if eps is None else f'{eps:g}'}_seed-{seed}"
        run_dir = os.path.join(root, name)
        print_fn(f"      [{i + 1}/{len(grid)}] {name}")
        cfg = recipe(private=eps is not None, epsilon=eps or 8.0, updates=updates, checkpoint=checkpoint,
                     minority_fraction=frac, seed=seed)
        with cfg.unlocked():
            cfg.individual.enabled = False  # individual epsilons: see the main runs; saves a pass per run
        if not os.path.isfile(os.path.join(run_dir, "eval", str(updates), "metrics.json")):
            loop.Trainer(cfg, run_dir, print_fn=lambda s: None).run()
            _eval_run(run_dir, n_resamples, plots=False)
        dirs.append(run_dir)
    return compare.compare_runs(dirs, os.path.join(root, "compare"), x="data.options.minority_fraction",
                                series="privacy.epsilon")


def run(args: argparse.Namespace) -> int:
    from dpft.evaluate import compare

    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    _enable_compilation_cache(workdir)
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
    if any(not 0 < f < 1 for f in fractions + [args.minority_fraction]):
        raise UsageError("minority fractions must be in (0, 1)")
    updates = max(4, args.updates // 4) if args.quick else args.updates
    pre_updates = max(4, args.pretrain_updates // 4) if args.quick else args.pretrain_updates
    n_resamples = 50 if args.quick else args.bootstrap
    t0 = time.monotonic()

    checkpoint = pretrain(workdir, pre_updates)
    print(f"[2/4] private fine-tuning at epsilon {', '.join(f'{e:g}' for e in epsilons)} and non-private "
          f"(minority = {args.minority_fraction:g} of the private training set)")
    rows = fine_tune_sweep(workdir, checkpoint, epsilons, updates=updates,
                           minority_fraction=args.minority_fraction, n_resamples=n_resamples, tag="finetune/")
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
                                n_resamples=n_resamples)
    elapsed = time.monotonic() - t0
    print("[4/4] summary")
    table = summary_table(rows)
    print(table)
    if study:
        print("\nimbalance study (" + study["files"]["md"] + "):")
        print(open(study["files"]["md"], encoding="utf-8").read().split("\n## Runs")[0].split("\n", 1)[1].strip())
    write_report(workdir, rows, cmp, study, elapsed, args)
    print(f"\nwhole demo: {elapsed / 60:.1f} min; report: {os.path.join(workdir, 'report.md')}")
    return 0


def write_report(workdir: str, rows: list[dict], cmp: dict, study: dict, elapsed: float,
                 args: argparse.Namespace) -> None:
    lines = [
        "# dpft demo report", "",
        "Tiny NFNet pre-trained non-privately on the public (upright) digits, then fine-tuned with "
        f"DP-SGD on the private split where rotated digits are {args.minority_fraction:g} of the examples. "
        "Test split: 10% rotated. Accuracy gap = max - min over the groups (patient-level bootstrap "
        "CIs; here one image per 'patient').", "",
        summary_table(rows), "",
        "Sweep (epsilon vs accuracy vs gap): ![compare](compare/compare.png)", "",
        "Per-run evaluation reports (per-group metrics, parity, individual epsilons):", "",
    ]
    for r in rows:
        rel = os.path.relpath(r["dir"], workdir)
        lines.append(f"- {r['run']}: `{rel}/eval/` (report.md, metrics.json, PNGs)")
    if study:
        rel = os.path.relpath(os.path.dirname(study["files"]["png"]), workdir)
        table = open(study["files"]["md"], encoding="utf-8").read().split("\n## Runs")[0]
        table = table.split("\n", 1)[1]  # drop the file's title
        lines += ["", "## Imbalance study (minority fraction x epsilon x seeds, with the non-private baseline)", "",
                  "Each run is a fine-tuning of the same public model on the private split subsampled so that the "
                  "minority (rotated digits) is the given fraction; test split: 10% minority. Individual "
                  "accounting is off in these runs.", "",
                  f"![imbalance study]({rel}/compare.png)", "", table.strip(), "",
                  f"Per-run table and files: `{rel}/compare.md`, `{rel}/compare.json`.", ""]
    lines += ["", f"Whole demo: {elapsed / 60:.1f} minutes.",
              "Individual epsilons are sensitive data about individuals: they stay in each run's workdir."]
    with open(os.path.join(workdir, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump({"runs": rows, "imbalance": study.get("cells") if study else None, "elapsed_s": elapsed},
                  f, indent=2, default=str)
