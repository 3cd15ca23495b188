"""`dpft export WORKDIR --out DIR`: the way to share a trained model.

A release holds the final (or `--checkpoint N`) parameters — raw, and the EMA / Polyak averages
the run kept — with the run's config, privacy plan and ledger, after `dpft evaluate`'s check that
the plan and ledger agree with the config and data (`contract.verified_plan`). It never holds the
run's secret (the noise could be subtracted with it), the optimizer state (which carries more of
the private gradients' history), the data position, individual accounting or any other step.

The release is itself a read-only workdir (one checkpoint, its checksums, `config.json`,
`privacy_plan.json`, `ledger.json`, `EXPORT.json`): `dpft evaluate --workdir DIR` evaluates it,
`dpft train` refuses it. It is written beside DIR and renamed into place, so DIR is whole or absent.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

from dpft.errors import CheckpointError, UsageError
from dpft.workdir import contract

#: What a release never contains.
EXCLUDED = ("secret", "opt_state", "data_state", "individual accounting state", "other checkpoints",
            "private/ (realised batch sizes, training loss)", "individual_epsilon.*", "predictions")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("workdir", help="run directory written by `dpft train`")
    parser.add_argument("--out", required=True, help="new directory for the release (must not exist, or be empty)")
    parser.add_argument("--checkpoint", default="latest", help="update index of the checkpoint, or 'latest'")


def run(args: argparse.Namespace) -> int:
    from dpft import paths

    workdir, out = paths.absolute(args.workdir), paths.absolute(args.out)
    if paths.is_remote(workdir) or paths.is_remote(out):
        raise UsageError("dpft export reads and writes local directories (copy a release to a bucket afterwards)")
    if not os.path.isdir(workdir):
        raise UsageError(f"{workdir} does not exist (or is not a directory)")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UsageError(f"--out {out} exists and is not an empty directory; choose a new one")
    step = None if args.checkpoint == "latest" else _step(args.checkpoint)
    from dpft.evaluate.evaluate_cli import corrupt_message
    from dpft.workdir import checkpointing
    try:
        release = read_release(workdir, step)
    except checkpointing.CorruptCheckpoint as e:  # by the run's own path, not the pinned snapshot's
        raise CheckpointError(corrupt_message(workdir, e, None)) from None
    tmp = f"{out.rstrip(os.sep)}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_release(tmp, release, source=workdir)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"exported checkpoint {release['step']} of {workdir} ({', '.join(release['pytrees'])}; epsilon "
          f"{release['epsilon_text']}) to {out}; it holds no secret and no optimizer state")
    return 0


def _step(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"--checkpoint must be an update index or 'latest', got {text!r}") from None


def read_release(workdir: str, step: int | None) -> dict:
    """The parameters kept by the run, its config, and its checked plan and ledger, of checkpoint
    `step` (None: the latest) -> {"step", "pytrees", "config", "plan", "ledger", "epsilon_text"}."""
    from dpft.evaluate.evaluate_cli import param_targets, restore_verified
    from dpft.inference.predictor import Predictor
    from dpft.workdir import checkpointing

    with checkpointing.pinned(workdir, step, items=contract.EVAL_ITEMS) as (ckpt, chosen):
        config = contract.checkpoint_config(ckpt.directory, chosen)
        predictor, template = Predictor.from_config(config)
        names = [contract.PARAMS] + [contract.PARAMS_ITEMS[a] for a in contract.averages_kept(config)]
        targets = param_targets(names, template, predictor)
        restored, ledger, plan = restore_verified(ckpt, chosen, config, predictor, targets, workdir)
    eps = contract.epsilon_spent(ledger, plan)
    if not plan.get("enabled"):
        text = "non-private"
    else:
        text = contract.mark_epsilon(f"{eps:.4g} at delta {plan['delta']:.3g}", plan.get("guarantee_valid"))
    return {"step": chosen, "pytrees": {name: restored.pytrees[name] for name in targets},
            "config": config, "plan": plan, "ledger": ledger, "epsilon_text": text}


def write_release(directory: str, release: dict, *, source: str) -> None:
    """The release as a one-checkpoint workdir in `directory` (see the module doc)."""
    from dpft import atomic_io
    from dpft.config.base import config_to_json
    from dpft.workdir import checkpointing

    os.makedirs(directory)
    step = int(release["step"])
    with checkpointing.Checkpointer(directory, keep=1) as ckpt:
        ckpt.save(step, pytrees=release["pytrees"],
                  json_items={contract.CONFIG: json.loads(config_to_json(release["config"])), contract.PLAN: release["plan"],
                              contract.LEDGER: release["ledger"].to_dict()})
    os.chmod(checkpointing.checkpoint_dir(directory), 0o755)  # no secret in it: a release is for sharing
    contract.write_ledger(directory, release["ledger"])
    atomic_io.write_text(contract.workdir_file(directory, contract.CONFIG_FILE), config_to_json(release["config"]))
    atomic_io.write_json(contract.workdir_file(directory, contract.PLAN_FILE), release["plan"], indent=2)
    atomic_io.write_json(contract.workdir_file(directory, contract.EXPORT_FILE),
                         {"source": source, "step": step, "items": sorted(release["pytrees"]),
                          "excluded": list(EXCLUDED)}, indent=2)
