"""`dpft audit`: empirical epsilon lower bounds (one run of the production Trainer, Dirac canaries) vs
the accountant: the one-run test and the Gaussian test (`dpft.train.canary_audit`).

Exit codes: 0 no bound of the chosen tests exceeds the claimed epsilon; 1 one does ("AUDIT FAILED");
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
         "images_per_canary": "images-per-canary", "test": "test"}
#: Options that break DP on purpose (testing that the audit can fail): not in --help.
TESTING_FLAGS = {"noise_scale_for_testing": "noise-scale-for-testing",
                 "sensitivity_scale_for_testing": "sensitivity-scale-for-testing"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dpft.config.options import add_arguments as add_option_arguments
    from dpft.train.canary_audit import AuditConfig

    add_option_arguments(parser, AuditConfig, FLAGS)
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--power", action="store_true", help="print the Gaussian test's power at these settings "
                        "(the smallest sensitivity error and noise shortfall it detects in 90%% of runs) and exit")
    parser.add_argument("--workdir", default=None, help="keep the audit's training run here (default: a "
                        "temporary directory, removed after)")
    for name, flag in TESTING_FLAGS.items():  # deliberately break DP; only for testing that the audit can fail
        parser.add_argument(f"--{flag}", type=float, default=getattr(AuditConfig, name), help=argparse.SUPPRESS)


def audit_config(args: argparse.Namespace):
    """The `AuditConfig` of the command line; UsageError (one line, naming the option) for any
    non-finite or out-of-range value, before any training."""
    from dpft.config.fields import Range
    from dpft.privacy.accounting import SIGMA_RANGE
    from dpft.train.canary_audit import AuditConfig

    config = AuditConfig(**{name: getattr(args, name) for name in (*FLAGS, *TESTING_FLAGS)})
    sigma, allowed = config.noise_multiplier, Range(*SIGMA_RANGE)
    for name, value, problem in config.problems():
        flag = {**FLAGS, **TESTING_FLAGS}.get(name, name.replace("_", "-"))
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
    if args.power:
        if not audit._clipping_record(config).private:
            raise UsageError("--power: a non-private clipping mode has no noise to measure")
        found = audit.gaussian_power(config, sigma)
        print(f"gaussian test power ({config.num_canaries} canaries, {config.steps} steps, q {config.sampling_rate:g}, "
              f"noise multiplier {sigma:.4g}, {config.confidence:.0%} confidence): detects in 90% of runs a "
              f"sensitivity >= {found['sensitivity']:.2f} C, or a noise std <= {found['noise']:.2f} sigma C")
        return 0
    say = (lambda *a, **k: None) if args.json else (lambda *a, **k: print(*a, **k, file=sys.stderr, flush=True))
    result = audit.run_audit(dataclasses.replace(config, noise_multiplier=sigma), workdir=args.workdir, print_fn=say)
    for name, flag in TESTING_FLAGS.items():
        if getattr(config, name) != 1.0:
            print(f"WARNING: --{flag} {getattr(config, name)}: the run is NOT {result.epsilon_claimed:.4g}-DP "
                  f"(testing the audit only)", file=sys.stderr)
    g = result.gaussian
    if args.json:
        print(json.dumps(_jsonable(result.to_dict()), sort_keys=True))
    else:
        print(f"claimed epsilon (accountant {config.accountant}, delta={config.delta:g}): "
              f"{result.epsilon_claimed:.4f}")
        if config.test != "gaussian":
            print(f"one-run test: epsilon lower bound ({result.confidence:.0%} confidence) "
                  f"{result.epsilon_lower_bound:.4f}; guesses {result.num_guesses}, correct {result.correct}")
        if g is not None:
            print(f"gaussian test: sensitivity {g['sensitivity']:.4g} (>= {g['sensitivity_lower']:.4g}; claim "
                  f"{g['expected_sensitivity']:.4g}), noise std {g['noise_std']:.4g} (<= {g['noise_std_upper']:.4g}; "
                  f"claim {g['expected_noise_std']:.4g}) -> epsilon lower bound {g['epsilon_lower_bound']:.4f}")
        elif config.test != "one_run":
            print("gaussian test: not applicable (a non-private run, or canaries of several images each trained "
                  "per image: the test's model samples a canary as a whole)")
        secret = "secret noise" if config.insecure_fixed_noise_seed < 0 else "INSECURE fixed noise seed"
        print(f"audited: dpft train's Trainer (engine {result.engine}, dtype {config.dtype}, {secret})")
        print(f"privacy unit {config.unit}, {config.images_per_canary} image(s) per canary")
        print(f"canaries {result.num_canaries} ({result.num_included} included), noise multiplier "
              f"{result.noise_multiplier:.4f}, steps {config.steps}, q {result.sampling_rate:.4g}")
    if not result.passed:
        failed = [f"one-run lower bound {result.epsilon_lower_bound:.4f}"] if not result.one_run_passed \
            and config.test != "gaussian" else []
        if g is not None and not g["passed"] and config.test != "one_run":
            failed.append(f"gaussian lower bound {g['epsilon_lower_bound']:.4f} (measured sensitivity "
                          f"{g['sensitivity']:.4g} vs C {g['expected_sensitivity']:.4g}, noise std "
                          f"{g['noise_std']:.4g} vs {g['expected_noise_std']:.4g})")
        print(f"AUDIT FAILED: {'; '.join(failed)} exceeds claimed epsilon {result.epsilon_claimed:.4f} (a correct "
              f"run fails with probability <= {1 - result.confidence:.0%}: rerun with a fresh secret before "
              "concluding)", file=sys.stderr)
        return 1
    return 0


def _jsonable(v):
    """JSON-safe: non-finite floats as strings, recursively."""
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v
