"""`dpft train --config configs/X.py[:arg] --workdir DIR [--config.FIELD=VALUE ...]`.

Trains (or, when DIR holds a checkpoint of the same config, resumes) a DP-SGD run.
Every config field can be overridden, e.g. `--config.privacy.epsilon=4`.
Exit 0 when the run is complete; 75 (`dpft.errors.STOPPED_EARLY_EXIT_CODE`) when a signal
(SIGTERM, SIGINT, SIGUSR1) stopped it early after saving its last completed update: run the
same command again to resume.
"""
from __future__ import annotations

import argparse
import logging
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="config file, e.g. configs/chexpert_nfnet_f0.py[:arg]")
    parser.add_argument("--workdir", required=True, help="run directory (checkpoints, logs, predictions)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.set_defaults(accepts_config_overrides=True)
    parser.epilog = "Overrides: --config.FIELD=VALUE, e.g. --config.privacy.epsilon=4 --config.train.num_updates=500"


def run(args: argparse.Namespace) -> int:
    from dpft.config.base import config_to_json, load_config

    logging.basicConfig(level=os.environ.get("DPFT_LOGLEVEL", "WARNING"))
    config = load_config(args.config, list(getattr(args, "overrides", [])))
    if args.print_config:
        print(config_to_json(config))
        return 0
    from dpft import paths
    # Local, or gs:// / s3:// / az:// through etils.epath (workdir, data, pre-trained checkpoint).
    paths.check_supported(args.workdir, "--workdir")
    paths.check_credentials(args.workdir, "--workdir")  # gs:// without credentials: one line, at once
    from dpft.workdir import contract
    contract.refuse_export_as_run(args.workdir)
    paths.check_supported(config.data.root, "config.data.root")
    paths.check_supported(config.model.checkpoint, "config.model.checkpoint")
    from dpft.data import path_options
    for key in path_options(str(config.data.name)):  # the data set's path options (its DatasetSpec)
        paths.check_supported(config.data.options[key], f"config.data.options.{key}")
    from dpft.config.validation import validate
    validate(config)  # refuse bad configs before loading data or compiling anything
    from dpft.train import library_logs
    library_logs.route_to(args.workdir)  # orbax's / tensorboardX's own tracebacks: a file, not the terminal
    from dpft import distributed
    from dpft.train import loop, workdir_lock
    # One run per workdir, checked before any data is loaded: a second `dpft train` exits at once.
    # Multi-process runs take the lock in the loop (process 0 only, once jax knows which it is).
    single = distributed.detect_cluster() is None
    with workdir_lock.WorkdirLock(args.workdir, enabled=single):
        result = loop.train(config, args.workdir)
    if result.preempted:  # its last completed update is saved: not done, not failed
        import sys

        from dpft.errors import STOPPED_EARLY_EXIT_CODE
        print(f"dpft train: stopped early at update {result.updates_done} of {result.plan.num_updates}; "
              f"run the same command again to resume (exit {STOPPED_EARLY_EXIT_CODE})", file=sys.stderr)
        return STOPPED_EARLY_EXIT_CODE
    return 0
