"""`dpft verify WORKDIR`: a read-only check of a training run's workdir; one line per problem.

Checked with read-only checkpointers on pinned snapshots (`checkpointing.pinned`: hard links under
WORKDIR/.pins, removed again), so a live run may go on training meanwhile; nothing else is written:
* every checkpoint: every item readable and every checksum equal (arrays and JSON items: the secret,
  the data position, the plan, the ledger, the config);
* the plan and ledger of every intact checkpoint against its config and the training data
  (`contract.verified_plan`: what `dpft evaluate` checks before it states an epsilon);
* the private files (the checkpoint tree with the run's secret, quarantined checkpoints, the private
  statistics, the per-example norms of individual accounting, individual epsilons, predictions with
  patient ids): owner-only (no group or other permission), local workdirs only.

Exit 0 when nothing is wrong, 3 (checkpoint) when anything is, after printing every problem.
"""
from __future__ import annotations

import argparse
import glob
import os
import stat

from dpft.errors import CheckpointError, UsageError
from dpft.workdir import contract


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("workdir", help="run directory written by `dpft train`")


def private_paths(workdir: str) -> list[str]:
    """The workdir's files and folders that must be owner-only (those that exist)."""
    from dpft.privacy.individual import files as individual_files
    from dpft.workdir import checkpointing

    patterns = [checkpointing.checkpoint_dir(workdir), os.path.join(workdir, "corrupt_checkpoints"),
                os.path.join(workdir, "private"), os.path.join(workdir, individual_files.NORMS_DIR),
                os.path.join(workdir, individual_files.NORMS_DIR, "*.npz"),
                os.path.join(workdir, individual_files.NPZ_NAME),
                os.path.join(workdir, "predictions", "*", "*.npz")]
    return sorted(p for pattern in patterns for p in glob.glob(pattern))


def permission_problems(workdir: str) -> list[str]:
    """One line per private path that group or others may access."""
    from dpft import atomic_io

    return [f"{p}: mode {stat.filemode(os.stat(p).st_mode)} lets other users read it (it must be owner-only: "
            f"chmod -R go-rwx {p})" for p in private_paths(workdir) if not atomic_io.is_owner_only(p)]


def checkpoint_problems(workdir: str) -> tuple[list[str], list[int]]:
    """(problems, intact steps): every item and checksum of every checkpoint."""
    from dpft.workdir import checkpointing

    with checkpointing.Checkpointer(workdir, read_only=True) as ckpt:
        steps = ckpt.all_steps()
    if not steps:
        return [f"{checkpointing.checkpoint_dir(workdir)}: no checkpoint"], []
    problems, intact = [], []
    for step in steps:
        try:
            with checkpointing.pinned(workdir, step, print_fn=lambda *a: None) as (ckpt, chosen):
                ckpt.restore(chosen)
            intact.append(step)
        except checkpointing.CorruptCheckpoint as e:
            problems.append(f"checkpoint {step}: corrupt: {e.reason}")
    return problems, intact


def privacy_record_problems(workdir: str, steps: list[int]) -> list[str]:
    """The plan and ledger of each checkpoint in `steps` against its config and the training data."""
    from dpft.evaluate.evaluate_cli import param_targets, restore_verified
    from dpft.inference.predictor import Predictor
    from dpft.workdir import checkpointing

    problems, built = [], {}
    for step in steps:
        try:
            with checkpointing.pinned(workdir, step, items=contract.EVAL_ITEMS, print_fn=lambda *a: None) as (
                    ckpt, chosen):
                config = contract.checkpoint_config(ckpt.directory, chosen)
                key = contract_key(config)
                if key not in built:
                    built[key] = Predictor.from_config(config)
                predictor, template = built[key]
                targets = param_targets([contract.PARAMS], template, predictor)
                restore_verified(ckpt, chosen, config, predictor, targets, workdir)
        except CheckpointError as e:
            problems.append(f"checkpoint {step}: {e}")
    return problems


def contract_key(config) -> str:
    """Checkpoints with the same config share one model and data load."""
    from dpft.config.base import config_to_json

    return config_to_json(config)


def run(args: argparse.Namespace) -> int:
    from dpft import paths

    workdir = paths.absolute(args.workdir)
    if paths.is_remote(workdir):
        raise UsageError("dpft verify reads local workdirs (file permissions are a local notion)")
    if not os.path.isdir(workdir):
        raise UsageError(f"{workdir} does not exist (or is not a directory)")
    contract.read_config(workdir)  # UsageError when it is not a `dpft train` workdir
    problems, intact = checkpoint_problems(workdir)
    problems += privacy_record_problems(workdir, intact)
    problems += permission_problems(workdir)
    for line in problems:
        print(f"dpft verify: {line}")
    if problems:
        raise CheckpointError(f"{workdir}: {len(problems)} problem(s) (listed above)")
    print(f"dpft verify: {workdir}: {len(intact)} checkpoint(s) intact (steps {', '.join(map(str, intact))}), "
          "privacy plan and ledger agree with the config and data, private files owner-only")
    return 0
