"""`dpft evaluate`: metrics and subgroup gaps from a run's saved checkpoints.

    dpft evaluate --workdir DIR [--checkpoint STEP|latest] [--split test] [--params ema|raw|polyak]
                  [--reuse-predictions] [--bootstrap 1000] [--seed 0] [--ci-level 0.95]
                  [--threshold-method youden|fpr|f1|fixed] [--target-fpr 0.1] [--threshold 0.5]
                  [--min-group-size 30] [--exclude-small-groups] [--intersect sex*race] [--control age]
                  [--exclude-group race=Unknown] [--out DIR] [--no-plots]
    dpft evaluate --compare DIR1 DIR2 ... [--x privacy.epsilon] [--series FIELD] [--select-by METRIC] [--out DIR]

The first form restores the checkpoint, runs the model over the split (and over the
validation split, where the decision thresholds are chosen), writes
`DIR/predictions/<step>/<split>.npz`, then `DIR/eval/<step>/{metrics.json, report.md, groups.csv, *.png}`; with
`--params` other than the run's own `eval.params`, `DIR/predictions/<step>/<params>/` and
`DIR/eval/<step>/<params>/` (one choice never overwrites another's)
(or --out). With --reuse-predictions it reads existing predictions and needs no checkpoint.
The second builds the sweep table and plots over any config axis, seeds aggregated (compare.py), and
the selected run with the privacy of its choice (selected.py: the trials of `launch/sweep.py
--private-selection` are selected and accounted; `--select-by` over other runs is said unaccounted).

Evaluation may run beside a live `dpft train` on the same workdir: checkpoints are opened
read-only (nothing is created, cleaned up or deleted) and the step read is pinned as a
hard-linked snapshot (`dpft.workdir.checkpointing.pinned`), so keep-N cleanup cannot delete it
mid-read. A workdir on an object store (`--workdir gs://...`) is read through etils.epath: the
step is copied (only the items evaluation reads: no optimizer state, no run secret) into a private
local temporary directory and used only if it is still complete and unchanged after the copy;
predictions and reports are written back atomically (`dpft.atomic_io`). A mistyped --workdir is
refused without creating anything.
"""
from __future__ import annotations

import argparse
import functools
from typing import Any, Sequence

from dpft import paths as dpft_paths
from dpft.errors import CheckpointError, UsageError
from dpft.workdir import contract

#: Why `--params` names an average the run did not keep (`contract.averages_kept`).
NOT_KEPT = {"polyak": "kept no Polyak average (train.polyak=False)", "ema": "kept no EMA (train.ema_decay=0)"}


#: EvalConfig field -> its `dpft evaluate` option (type, default, choices and help from the field's record).
FLAGS = {"n_resamples": "bootstrap", "seed": "seed", "ci_level": "ci-level", "threshold_method": "threshold-method",
         "target_fpr": "target-fpr", "fixed_threshold": "threshold", "min_group_size": "min-group-size"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dpft.config.options import add_arguments as add_option_arguments
    from dpft.config.schema import FIELDS
    from dpft.evaluate.reports import EvalConfig

    parser.add_argument("--workdir", help="run directory written by `dpft train`")
    parser.add_argument("--checkpoint", default="latest", help="update index of the checkpoint, or 'latest'")
    parser.add_argument("--split", default="test", help="split to evaluate (default test)")
    parser.add_argument("--params", choices=FIELDS["eval.params"].choice_names(), default=None,
                        help="which parameters (default: the run's eval.params); polyak needs train.polyak=True")
    parser.add_argument("--reuse-predictions", action="store_true",
                        help="use existing predictions files instead of running the model (works without checkpoints)")
    parser.add_argument("--compare", nargs="+", metavar="DIR", help="build the sweep comparison of these runs")
    parser.add_argument("--x", default="privacy.epsilon", metavar="FIELD",
                        help="--compare: config field on the x axis (default privacy.epsilon)")
    parser.add_argument("--series", default=None, metavar="FIELD",
                        help="--compare: config field giving one line per value (e.g. data.options.minority_fraction)")
    parser.add_argument("--attribute", default=None, help="--compare: the subgroup attribute of the gaps and parity "
                        "(default: every attribute)")
    parser.add_argument("--select-by", default=None, metavar="METRIC",
                        help="--compare: select the best run by this overall metric (the trials of launch/sweep.py "
                             "--private-selection are selected, and accounted, without it: by their validation metric)")
    parser.add_argument("--out", help="output directory (--compare: default ./compare; else WORKDIR/eval/<step>)")
    g = parser.add_argument_group("statistics and groups")
    add_option_arguments(g, EvalConfig, FLAGS)
    g.add_argument("--exclude-small-groups", action="store_true", help="leave small groups out of gaps and parity")
    g.add_argument("--intersect", action="append", default=[], metavar="A*B",
                   help="add an intersectional attribute, e.g. --intersect sex*race (repeatable)")
    g.add_argument("--control", action="append", default=[], metavar="ATTRIBUTE",
                   help="a control feature (fairlearn's control_features): compare every other attribute's groups "
                        "within each of its values, e.g. --control age gives the sex gap in each age bin (repeatable)")
    g.add_argument("--exclude-group", action="append", default=[], metavar="ATTR=GROUP",
                   help="leave a group out of gaps and parity, e.g. --exclude-group race=Unknown (repeatable)")
    g.add_argument("--no-plots", action="store_true", help="write no PNGs")


def eval_options(args: argparse.Namespace) -> dict:
    """The `reports.EvalConfig` fields given on the command line."""
    return {**{name: getattr(args, name) for name in FLAGS}, "exclude_small_groups": args.exclude_small_groups,
            "intersections": tuple(args.intersect), "exclude_groups": tuple(args.exclude_group),
            "control_features": tuple(args.control),
            "plots": not args.no_plots}


def _predictions_step(workdir: str, which: str) -> int:
    """The step of existing predictions (for --reuse-predictions): 'latest' = the largest."""
    root = contract.predictions_dir(workdir)
    steps = sorted(int(d) for d in dpft_paths.listdir(root) if d.isdigit()) if dpft_paths.isdir(root) else []
    if not steps:
        raise UsageError(f"{workdir}: --reuse-predictions but no predictions/<step>/ found")
    if which == "latest":
        return steps[-1]
    try:
        step = int(which)
    except ValueError:
        raise UsageError(f"--checkpoint must be an update index or 'latest', got {which!r}") from None
    if step not in steps:
        raise UsageError(f"{workdir}: no predictions for update {step}; have {steps}")
    return step


def _checkpoint_step(workdir: str, which: str) -> int | None:
    """The update index asked for: None for 'latest' (resolved when pinned), else an int."""
    if not dpft_paths.isdir(workdir):
        raise UsageError(f"--workdir {workdir} does not exist (or is not a directory)")
    if which == "latest":
        return None
    try:
        return int(which)
    except ValueError:
        raise UsageError(f"--checkpoint must be an update index or 'latest', got {which!r}") from None


def _same_step_everywhere(workdir: str, step: int | None) -> int | None:
    """With several processes, the checkpoint process 0 resolves ('latest' may move while a run
    trains), so that every process restores the same one; unchanged in a single process."""
    import jax

    if jax.process_count() == 1:
        return step
    import numpy as np
    from jax.experimental import multihost_utils

    from dpft.workdir import checkpointing

    mine = -1
    if jax.process_index() == 0:
        with checkpointing.Checkpointer(workdir, read_only=True) as live:
            steps = live.all_steps()
        mine = step if step is not None else (steps[-1] if steps else -1)
    from dpft import distributed
    chosen = int(distributed.together(multihost_utils.broadcast_one_to_all, "step")(np.asarray(mine, np.int64)))
    return None if chosen < 0 else chosen


def predict_from_checkpoint(workdir: str, step: int | None, splits: list[str], params: str | None,
                            print_fn=print) -> tuple[int, dict[str, str]]:
    """Restores the eval parameters of checkpoint `step` (None: the latest) of the run in `workdir`
    from a pinned, read-only snapshot and writes its predictions files -> (step, {split: path}).

    Needs only the workdir contract (`dpft.workdir.contract`): config.json, the checkpoint's config,
    params/EMA/Polyak, plan and ledger items; the model runs through `dpft.inference.predictor`."""
    from dpft.inference.predictor import Predictor
    from dpft.workdir import checkpointing

    config = contract.read_config(workdir)
    if params in NOT_KEPT and params not in contract.averages_kept(config):
        raise UsageError(f"{workdir}: --params {params}, but this run {NOT_KEPT[params]}")
    step = _same_step_everywhere(workdir, step)
    verify = None  # step -> intact?, once the model's templates exist
    try:
        with checkpointing.pinned(workdir, step, items=contract.EVAL_ITEMS, print_fn=print_fn) as (ckpt, chosen):
            config = contract.checkpoint_config(ckpt.directory, chosen)  # the model the checkpoint was trained as
            with config.unlocked():
                config.eval.splits = tuple(splits)
            item, which = contract.eval_params(config, params)
            predictor, template = Predictor.from_config(config)
            check_coverage(workdir, config, predictor.tables, print_fn)
            print_fn(f"running the model of checkpoint {chosen} ({which} params, read from {ckpt.directory}/"
                     f"{chosen}) over {', '.join(splits)} (and validation)...")
            targets = param_targets([item], template, predictor)
            verify = functools.partial(_intact, workdir, targets)
            restored, ledger, plan = restore_verified(ckpt, chosen, config, predictor, targets, workdir)
    except checkpointing.CorruptCheckpoint as e:
        raise CheckpointError(corrupt_message(workdir, e, verify)) from None
    paths = predictor.write_predictions(workdir, chosen, restored.pytrees[item], which, ledger=ledger, plan=plan)
    return chosen, paths


def check_coverage(workdir: str, config: Any, tables: Any, print_fn=print) -> dict[str, Any]:
    """Prints the attribute coverage of the data evaluated now and checks it as training did
    (`build.attribute_report`: a requested attribute without any value is a DataError, exit 2); also
    refuses an attribute that had values when the run trained (`WORKDIR/attribute_coverage.json`) and
    has none now (e.g. the demographics table moved): the report would silently lose that attribute."""
    import json

    from dpft import remote_files
    from dpft.config import build
    from dpft.errors import DataError

    now = build.attribute_report(config, tables, print_fn)
    path = contract.workdir_file(workdir, contract.COVERAGE_FILE)
    if not dpft_paths.isfile(path):
        return now
    then = json.loads(remote_files.read_text(path)).get("attributes", {})
    vanished = [a for a, e in then.items()
                if e.get("with_value", 0) > 0 and now["attributes"].get(a, {}).get("with_value", 0) == 0]
    if vanished:
        raise DataError(f"{workdir}: fairness attribute(s) {vanished} had values when the run trained "
                        f"({contract.COVERAGE_FILE}) but have none in the data evaluated now: point the data "
                        f"options at the demographics again (config.data.options of the run)")
    return now


def param_targets(items: Sequence[str], template: Any, predictor: Any) -> dict[str, Any]:
    """Restore targets: each parameter item in `items` into `template` (`Predictor.from_config`'s),
    and the checkpoint's update counter (a replicated int32 scalar)."""
    import numpy as np

    from dpft import distributed

    counter = distributed.replicate(np.zeros((), np.int32), predictor.mesh)
    return {**{name: template for name in items}, contract.UPDATE: counter}


def restore_verified(ckpt: Any, step: int, config: Any, predictor: Any, targets: dict[str, Any], workdir: str
                     ) -> tuple[Any, Any, dict[str, Any]]:
    """`targets`, plan and ledger of checkpoint `step` -> (restored, ledger, plan dict), the plan and
    ledger checked against what the run's config and training data give (`contract.verified_plan`,
    exit 3 otherwise): epsilon is recomputed, never taken from the checkpoint's word."""
    import numpy as np

    from dpft.config import build

    restored = ckpt.restore(step, targets=targets, items=(contract.PLAN, contract.LEDGER))
    ledger = contract.checkpoint_ledger(restored, ckpt.directory)
    params = next(restored.pytrees[name] for name in targets if name != contract.UPDATE)
    plan = contract.verified_plan(
        config, num_examples=build.num_units(config, predictor.tables[build.train_split_name(config)]), params=params,
        recorded_plan=restored.json_items.get(contract.PLAN) or {}, ledger=ledger,
        updates=int(np.asarray(restored.pytrees[contract.UPDATE])), where=f"{workdir}: checkpoint {step}")
    return restored, ledger, plan


def _intact(workdir: str, targets: dict, step: int) -> bool:
    """Whether checkpoint `step` of `workdir` restores `targets`, its plan and ledger with every checksum."""
    from dpft.workdir import checkpointing

    try:
        with checkpointing.pinned(workdir, step, items=contract.EVAL_ITEMS, print_fn=lambda *a: None) as (ckpt, s):
            ckpt.restore(s, targets=targets, items=(contract.PLAN, contract.LEDGER))
        return True
    except CheckpointError:
        return False


def corrupt_message(workdir: str, error, verify) -> str:
    """The corrupt checkpoint by its real path (not the pinned snapshot's) and the newest intact older one
    (checked with `verify` where the model's templates were built, else only named)."""
    from dpft.workdir import checkpointing

    real = dpft_paths.join(checkpointing.checkpoint_dir(workdir), str(error.step))
    with checkpointing.Checkpointer(workdir, read_only=True) as live:
        older = [s for s in sorted(live.all_steps(), reverse=True) if s < error.step]
    if verify is not None:
        good = next((s for s in older if verify(s)), None)
        hint = (f"the newest intact checkpoint is {good}: rerun with --checkpoint {good}" if good is not None
                else "no older checkpoint is intact")
    else:
        hint = f"try an older one: --checkpoint {older[0]}" if older else "there is no older checkpoint"
    return f"checkpoint {real} is corrupt: {error.reason}; {hint}"


def run(args: argparse.Namespace) -> int:
    from dpft.evaluate import compare, render, reports

    if args.compare or args.reuse_predictions and args.params is None:
        # No model runs: files in, files out. Under a multi-process job only process 0 writes them.
        from dpft import distributed
        why = distributed.not_this_process("dpft evaluate (without a model run)")
        if why:
            print(why)
            return 0
    if args.compare:
        out = args.out or "compare"
        result = compare.compare_runs(args.compare, out, x=args.x, series=args.series, attribute=args.attribute,
                                      ci_level=args.ci_level, select_by=args.select_by)
        print(compare.render_compare_markdown(result))
        print(f"wrote {', '.join(result['files'].values())}")
        return 0
    if args.select_by is not None:
        raise UsageError("--select-by belongs to --compare (it selects among the compared runs)")
    if not args.workdir:
        raise UsageError("give --workdir DIR (or --compare DIR ...)")
    options = eval_options(args)
    reports.make_config(**options)  # bad statistics options fail before the model runs
    dpft_paths.check_supported(args.workdir, "--workdir")  # local, or gs:// / s3:// / az:// through etils.epath
    dpft_paths.check_supported(args.out, "--out")
    for path, what in ((args.workdir, "--workdir"), (args.out, "--out")):  # both may be written
        dpft_paths.check_credentials(path, what)
    workdir = dpft_paths.absolute(args.workdir)
    reuse = args.reuse_predictions and args.params is None
    if args.reuse_predictions and args.params is not None:
        print("--params given: running the model instead of reusing predictions (they may hold other params)")
    if reuse:
        if not dpft_paths.isdir(workdir):
            raise UsageError(f"--workdir {workdir} does not exist (or is not a directory)")
        step = _predictions_step(workdir, args.checkpoint)
        test_path = contract.predictions_path(workdir, step, args.split)
        val_path = contract.predictions_path(workdir, step, contract.VALIDATION)
        if not dpft_paths.isfile(test_path):
            raise UsageError(f"{workdir}: --reuse-predictions but {test_path} does not exist")
    else:
        step = _checkpoint_step(workdir, args.checkpoint)
        # Every process of a multi-process job runs the model over its share of the data (the
        # jax.distributed start comes first: nothing above touched a jax backend); process 0 writes.
        from dpft import distributed
        distributed.initialize_distributed()
        import jax
        say = print if jax.process_index() == 0 else (lambda *a, **k: None)
        say(f"running the model of checkpoint {'latest' if step is None else step} over {args.split} "
            "(and validation)...")
        step, paths = predict_from_checkpoint(workdir, step, [args.split], args.params, print_fn=say)
        if jax.process_index() != 0:
            print(f"process {jax.process_index()} of {jax.process_count()}: predictions of checkpoint {step} "
                  f"computed; process 0 writes them and the report")
            return 0
        test_path = paths.get(args.split, contract.predictions_path(workdir, step, args.split))
        val_path = paths.get(contract.VALIDATION, contract.predictions_path(workdir, step, contract.VALIDATION))
    if not dpft_paths.isfile(test_path):
        raise UsageError(f"{workdir}: split {args.split!r} has no predictions (does the data set have it?)")
    result = reports.evaluate_predictions(
        test_path, val_path if dpft_paths.isfile(val_path) and args.split != contract.VALIDATION else None,
        out_dir=args.out, **options)
    out_dir = args.out or str(reports.default_out_dir(test_path))
    print(render.render_markdown(result))
    print(f"wrote {out_dir}/metrics.json, report.md, groups.csv" + ("" if args.no_plots else " and plots"))
    return 0
