"""`dpft audit`: empirical epsilon lower bound (one run, Dirac canaries) vs the accountant.

Exit codes: 0 the bound does not exceed the claimed epsilon; 1 it does ("AUDIT FAILED");
2 invalid input (every value is checked by `audit_config` before anything is trained).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys

from dpft.errors import UsageError

#: AuditConfig field -> its `dpft audit` option (type, default, choices and help from the field's record).
FLAGS = {"epsilon": "epsilon", "noise_multiplier": "noise-multiplier", "num_canaries": "canaries", "steps": "steps",
         "sampling_rate": "sampling-rate", "delta": "delta", "confidence": "confidence", "accountant": "accountant",
         "seed": "seed", "dtype": "dtype", "grad_method": "grad-method",
         "insecure_fixed_noise_seed": "insecure-fixed-noise-seed", "unit": "unit",
         "images_per_canary": "images-per-canary"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dpft.config.options import add_arguments as add_option_arguments
    from dpft.train.canary_audit import AuditConfig

    add_option_arguments(parser, AuditConfig, FLAGS)
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    # Deliberately breaks DP (scales the noise); only for testing that the audit can fail.
    parser.add_argument("--noise-scale-for-testing", type=float, default=AuditConfig.noise_scale_for_testing,
                        help=argparse.SUPPRESS)


def audit_config(args: argparse.Namespace):
    """The `AuditConfig` of the command line; UsageError (one line, naming the option) for any
    non-finite or out-of-range value, before any training."""
    from dpft.config.fields import Range
    from dpft.privacy.accounting import SIGMA_RANGE
    from dpft.train.canary_audit import AuditConfig

    config = AuditConfig(**{name: getattr(args, name) for name in (*FLAGS, "noise_scale_for_testing")})
    sigma, allowed = config.noise_multiplier, Range(*SIGMA_RANGE)
    for name, value, problem in config.problems():
        flag = FLAGS.get(name, name.replace("_", "-"))
        raise UsageError(f"--{flag}: {problem}, got {value} (audit config: {name}={value!r})")
    if sigma and not allowed.contains(sigma):  # the accountant's range
        raise UsageError(f"--noise-multiplier: must be 0 or {allowed.text()}, got {sigma}")
    return config


def run(args: argparse.Namespace) -> int:
    from dpft.train import canary_audit as audit

    config = audit_config(args)
    try:
        sigma = audit.resolve_noise_multiplier(config)  # raises on an unreachable epsilon
    except ValueError as e:
        raise UsageError(str(e)) from e
    result = audit.run_audit(dataclasses.replace(config, noise_multiplier=sigma))
    if args.noise_scale_for_testing != 1.0:
        print(f"WARNING: noise scaled by {args.noise_scale_for_testing}: the run is NOT "
              f"{result.epsilon_claimed:.4g}-DP (testing the audit only)", file=sys.stderr)
    if args.json:
        print(json.dumps({k: _jsonable(v) for k, v in result.to_dict().items()}, sort_keys=True))
    else:
        print(f"empirical epsilon lower bound ({result.confidence:.0%} confidence): "
              f"{result.epsilon_lower_bound:.4f}")
        print(f"claimed epsilon (accountant {config.accountant}, delta={config.delta:g}): "
              f"{result.epsilon_claimed:.4f}")
        secret = "secret noise" if config.insecure_fixed_noise_seed < 0 else "INSECURE fixed noise seed"
        print(f"audited: the production step (engine {result.engine}, dtype {config.dtype}, {secret})")
        print(f"privacy unit {config.unit}, {config.images_per_canary} image(s) per canary")
        print(f"canaries {result.num_canaries} ({result.num_included} included), guesses {result.num_guesses}, "
              f"correct {result.correct}, noise multiplier {result.noise_multiplier:.4f}, steps {config.steps}, "
              f"q {config.sampling_rate:g}")
    if not result.passed:
        print(f"AUDIT FAILED: empirical lower bound {result.epsilon_lower_bound:.4f} exceeds claimed epsilon "
              f"{result.epsilon_claimed:.4f}", file=sys.stderr)
        return 1
    return 0


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v
