"""The `dpft` command: `train`, `evaluate`, `prepare`, `accountant`, `audit`, `demo`, `export`, `verify`.

Each sub-command lives in the module of the package that does the work; that module
exposes `add_arguments(parser)` and `run(args) -> int`. Only the chosen module is
imported, so `dpft accountant` starts fast and never compiles a model.

Exit codes: 0 success; every expected failure (a `dpft.errors.DpftError`, or an OSError
such as disk full or a read-only directory) prints one line `dpft <command>: error: ...`
and exits with its code: 2 invalid input (values, config, data), 3 checkpoint, 4 workdir
busy, 5 filesystem, 6 non-finite training; 75 `dpft train` stopped early by a signal (SIGTERM,
SIGINT, SIGUSR1) with its last completed update saved: rerun the same command to resume;
130 interrupted (outside training). Anything else is a bug and keeps
its traceback (exit 1).
"""
from __future__ import annotations

import argparse
import importlib
import sys
import threading
from typing import Sequence

from dpft import errors, host_memory

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("dpft.train.train_cli", "fine-tune a model with DP-SGD from a config"),
    "evaluate": ("dpft.evaluate.evaluate_cli", "evaluate checkpoints: metrics and subgroup gaps"),
    "prepare": ("dpft.config.prepare_cli", "validate a data directory and build its index"),
    "accountant": ("dpft.privacy.accountant_cli", "epsilon for (q, sigma, steps, delta) or sigma for a target epsilon"),
    "audit": ("dpft.train.audit_cli", "empirical lower bound on epsilon with canaries"),
    "demo": ("dpft.demo.cli", "the whole recipe offline on the embedded digits data"),
    "export": ("dpft.evaluate.export_cli", "a trained model to share: params, config, plan, ledger; never the secret"),
    "verify": ("dpft.evaluate.verify_cli", "read-only check of a workdir: checkpoints, plan and ledger, file modes"),
}

#: Commands that run models: on CPU, glibc keeps their freed buffers for the next step.
HOST_MEMORY_COMMANDS = ("train", "evaluate", "demo", "audit")
#: Commands that run on every process of a multi-process job: jax.distributed starts before the
#: command's own code runs (`dpft.distributed.initialize_distributed`; nothing may touch a jax
#: backend before it). `dpft evaluate` starts it itself, only when it runs a model.
MULTI_PROCESS_COMMANDS = ("train",)
#: Commands that run on one process: under a multi-process job, process 0 runs them, the others exit 0.
ONE_PROCESS_COMMANDS = ("audit", "demo", "export", "verify")


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpft", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        parser = _top_parser()
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_usage(sys.stderr)
            _say(f"dpft: error: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}")
            return 2
        parser.print_help()
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    host_line = None
    # Only in a process that has not imported JAX yet (a `dpft` command, not cli.main() called from
    # a process that already runs JAX: there it would come too late to be reliable).
    if name in HOST_MEMORY_COMMANDS and "jax" not in sys.modules and host_memory.cpu_only_jax():
        try:
            host_line = host_memory.keep_freed_host_memory()  # before JAX starts its threads (dpft/host_memory.py)
        except ValueError as e:  # a bad DPFT_HOST_MALLOC
            _say(f"dpft {name}: error: {e}")
            return errors.UsageError.exit_code
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"dpft {name}", description=COMMANDS[name][1], allow_abbrev=False)
    module.add_arguments(parser)
    if parser.get_default("accepts_config_overrides"):
        # `--config.privacy.epsilon=4` style overrides go to the command as args.overrides.
        args, unknown = parser.parse_known_args(rest)
        bad = [u for u in unknown if u.startswith("-") and not u.lstrip("-").startswith("config.")]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)}")
        args.overrides = unknown
    else:
        args = parser.parse_args(rest)
    if host_line:  # a diagnostic: stderr, so that --json output on stdout stays one document
        _say(host_line)
    try:
        if name in MULTI_PROCESS_COMMANDS or name in ONE_PROCESS_COMMANDS:
            from dpft import distributed  # imports jax, starts no backend
            if name in MULTI_PROCESS_COMMANDS:
                distributed.initialize_distributed()
            else:
                why = distributed.not_this_process(f"dpft {name}")
                if why:
                    _say(why)
                    return 0
        return int(module.run(args) or 0)
    except errors.DpftError as e:
        _say(f"dpft {name}: error: {_one_line(str(e))}")
        return e.exit_code
    except OSError as e:
        # e.g. a full disk also fails the clean-up after a failed save: report the first failure.
        first = _dpft_error_in_chain(e)
        if first is not None:
            _say(f"dpft {name}: error: {_one_line(str(first))}")
            return first.exit_code
        cause = errors.filesystem_cause(e)
        if cause is None:
            raise  # not the environment's fault: a bug, keep the traceback
        _say(f"dpft {name}: error: {_one_line(errors.describe_oserror(cause))}")
        return errors.FilesystemError.exit_code
    except KeyboardInterrupt:
        _say(f"dpft {name}: interrupted")
        return 130


def _say(line: str) -> None:
    """`line` and its newline to stderr in one write, flushed: a background thread's log (orbax,
    absl) can come before or after it but never inside it. While other Python threads are alive
    the line also starts with a newline: one of them may have written part of a line (print() and
    traceback printing write a line's text and its newline separately), and the line must not
    continue theirs (a CI run once lost `dpft train: error: ...` at the start of a line so)."""
    lead = "\n" if threading.active_count() > 1 else ""
    sys.stderr.write(lead + line + "\n")
    sys.stderr.flush()


def _dpft_error_in_chain(exc: BaseException) -> errors.DpftError | None:
    """The first DpftError in the context chain of `exc` (an earlier, explained failure)."""
    seen: set[int] = set()
    node = exc.__cause__ or exc.__context__
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        if isinstance(node, errors.DpftError):
            return node
        node = node.__cause__ or node.__context__
    return None


def _one_line(text: str) -> str:
    """`text` with its line breaks folded, so that every error is one line on stderr."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip()) or "(no message)"


if __name__ == "__main__":
    # `python -m dpft.cli`: run the imported module's main (not a __main__ copy of it).
    from dpft import cli as _cli

    sys.exit(_cli.main())
