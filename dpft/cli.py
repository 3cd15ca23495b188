"""The `dpft` command: `train`, `evaluate`, `prepare`, `accountant`, `audit`, `demo`.

Each sub-command lives in the module of the package that does the work; that module
exposes `add_arguments(parser)` and `run(args) -> int`. Only the chosen module is
imported, so `dpft accountant` starts fast and never compiles a model.

Exit codes: 0 success, 2 invalid input (one-line error, no traceback), 1 other failure.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("dpft.train.train_cli", "fine-tune a model with DP-SGD from a config"),
    "evaluate": ("dpft.evaluate.evaluate_cli", "evaluate checkpoints: metrics and subgroup gaps"),
    "prepare": ("dpft.data.prepare_cli", "validate a data directory and build its index"),
    "accountant": ("dpft.privacy.accountant_cli", "epsilon for (q, sigma, steps, delta) or sigma for a target epsilon"),
    "audit": ("dpft.train.audit_cli", "empirical lower bound on epsilon with canaries"),
    "demo": ("dpft.demo", "the whole recipe offline on the embedded digits data"),
}


class UsageError(ValueError):
    """Invalid user input; the CLI prints its message on one line and exits with 2."""


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
            print(f"dpft: error: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        parser.print_help()
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
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
    try:
        return int(module.run(args) or 0)
    except UsageError as e:
        print(f"dpft {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dpft {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # `python -m dpft.cli`: run the imported module's main, so that `dpft.cli.UsageError`
    # (raised by the sub-commands) is the class caught above, not a __main__ copy.
    from dpft import cli as _cli

    sys.exit(_cli.main())
