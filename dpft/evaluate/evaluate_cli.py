"""`dpft evaluate`: metrics and subgroup gaps from a run's saved checkpoints.

    dpft evaluate --workdir DIR [--checkpoint STEP|latest] [--split test] [--params ema|raw]
    dpft evaluate --compare DIR1 DIR2 ... [--out DIR]

The first form restores the checkpoint, runs the model over the split (and over the
validation split, where the decision thresholds are chosen), writes
`DIR/predictions/<step>/<split>.npz`, then `DIR/eval/<step>/{metrics.json, report.md, *.png}`.
The second builds the sweep table and plots (epsilon vs utility vs gap) of several runs.

Evaluation may run beside a live `dpft train` on the same workdir: checkpoints are opened
read-only (nothing is created, cleaned up or deleted) and the step read is pinned as a
hard-linked snapshot (`dpft.train.checkpointing.pinned`), so keep-N cleanup cannot delete it
mid-read. A mistyped --workdir is refused without creating anything.
"""
from __future__ import annotations

import argparse
import os

from dpft.cli import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", help="run directory written by `dpft train`")
    parser.add_argument("--checkpoint", default="latest", help="update index of the checkpoint, or 'latest'")
    parser.add_argument("--split", default="test", help="split to evaluate (default test)")
    parser.add_argument("--params", choices=("ema", "raw", "polyak"), default=None,
                        help="which parameters (default: the run's eval.params, EMA)")
    parser.add_argument("--compare", nargs="+", metavar="DIR", help="build the sweep comparison of these runs")
    parser.add_argument("--out", help="output directory for --compare (default ./compare)")
    parser.add_argument("--bootstrap", type=int, default=200, help="patient-level bootstrap resamples")
    parser.add_argument("--min-group-size", type=int, default=30, help="flag groups smaller than this")
    parser.add_argument("--reuse-predictions", action="store_true",
                        help="use existing predictions files instead of running the model")


def _checkpoint_step(workdir: str, which: str) -> int | None:
    """The update index asked for: None for 'latest' (resolved when pinned), else an int."""
    if not os.path.isdir(workdir):
        raise UsageError(f"--workdir {workdir} does not exist (or is not a directory)")
    if which == "latest":
        return None
    try:
        return int(which)
    except ValueError:
        raise UsageError(f"--checkpoint must be an update index or 'latest', got {which!r}") from None


def predict_from_checkpoint(workdir: str, step: int | None, splits: list[str], params: str | None,
                            ) -> tuple[int, dict[str, str]]:
    """Restores checkpoint `step` (None: the latest) of the run in `workdir` from a pinned, read-only
    snapshot and writes its predictions files -> (step, {split: path})."""
    from dpft.train import checkpointing, loop
    from dpft.train.config_base import config_from_json

    config_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_path):
        raise UsageError(f"{workdir}: no config.json (is this a `dpft train` workdir?)")
    with open(config_path, encoding="utf-8") as f:
        config = config_from_json(f.read())
    if params is not None:
        with config.unlocked():
            config.eval.params = params
    with config.unlocked():
        config.eval.splits = tuple(splits)
    trainer = loop.Trainer(config, workdir)
    with checkpointing.pinned(workdir, step) as (ckpt, chosen):
        print(f"running the model of checkpoint {chosen} over {', '.join(splits)} (and validation)...")
        trainer.restore(ckpt, chosen)
    return chosen, trainer.write_predictions()


def run(args: argparse.Namespace) -> int:
    from dpft.evaluate import compare, reports

    if args.compare:
        out = args.out or "compare"
        result = compare.compare_runs(args.compare, out)
        print(compare.render_compare_markdown(result))
        print(f"wrote {', '.join(result['files'].values())}")
        return 0
    if not args.workdir:
        raise UsageError("give --workdir DIR (or --compare DIR ...)")
    from dpft import paths
    paths.check_local(args.workdir, "--workdir")
    workdir = os.path.abspath(args.workdir)
    step = _checkpoint_step(workdir, args.checkpoint)
    if step is None:
        from dpft.train import checkpointing

        with checkpointing.Checkpointer(workdir, read_only=True) as ckpt:
            steps = ckpt.all_steps()
        if not steps:
            raise UsageError(f"{workdir}: no checkpoint found under {checkpointing.checkpoint_dir(workdir)}")
        latest = steps[-1]
    else:
        latest = step
    pred_dir = os.path.join(workdir, "predictions", str(latest))
    test_path = os.path.join(pred_dir, f"{args.split}.npz")
    val_path = os.path.join(pred_dir, "validation.npz")
    if args.reuse_predictions and os.path.isfile(test_path):
        step = latest
    else:
        step, paths = predict_from_checkpoint(workdir, step, [args.split], args.params)
        pred_dir = os.path.join(workdir, "predictions", str(step))
        test_path = paths.get(args.split, os.path.join(pred_dir, f"{args.split}.npz"))
        val_path = paths.get("validation", os.path.join(pred_dir, "validation.npz"))
    if not os.path.isfile(test_path):
        raise UsageError(f"{workdir}: split {args.split!r} has no predictions (does the data set have it?)")
    result = reports.evaluate_predictions(
        test_path, val_path if os.path.isfile(val_path) and args.split != "validation" else None,
        n_resamples=args.bootstrap, min_group_size=args.min_group_size)
    out_dir = os.path.join(workdir, "eval", str(step))
    print(reports.render_markdown(result))
    print(f"wrote {out_dir}/metrics.json, report.md and plots")
    return 0
