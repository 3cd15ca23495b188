"""`dpft audit`: empirical epsilon lower bound (one run, Dirac canaries) vs the accountant.

Exit codes: 0 the bound does not exceed the claimed epsilon; 1 it does ("AUDIT FAILED");
2 invalid input (every value is checked by `check_args` before anything is trained).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys

from dpft.errors import UsageError
from dpft.privacy.accounting import SIGMA_RANGE

MAX_SEED = 2**32 - 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = _defaults()
    parser.add_argument("--epsilon", type=float, default=d.epsilon,
                        help="target epsilon; the noise multiplier is calibrated to it (default %(default)s)")
    parser.add_argument("--noise-multiplier", type=float, default=None,
                        help="use this sigma instead of calibrating to --epsilon")
    parser.add_argument("--canaries", type=int, default=d.num_canaries, help="number of canaries m (%(default)s)")
    parser.add_argument("--steps", type=int, default=d.steps, help="optimizer updates T (%(default)s)")
    parser.add_argument("--sampling-rate", type=float, default=d.sampling_rate, help="Poisson rate q (%(default)s)")
    parser.add_argument("--delta", type=float, default=d.delta, help="delta (%(default)s)")
    parser.add_argument("--confidence", type=float, default=d.confidence, help="confidence of the bound (%(default)s)")
    parser.add_argument("--accountant", choices=("pld", "rdp"), default=d.accountant)
    parser.add_argument("--seed", type=int, default=d.seed,
                        help="public seed of canary inclusion and init (the noise secret is fresh per run)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=d.dtype,
                        help="compute dtype of the audited step, as config.model.dtype (%(default)s)")
    parser.add_argument("--grad-method", choices=("auto", "bookkeeping", "vmap"), default=d.grad_method,
                        help="engine of the audited step, as config.train.grad_method (%(default)s)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--insecure-fixed-noise-seed", type=int, default=-1,
                        help="fix the noise secret to this public number (reproducible tests only; -1 = fresh)")
    # Deliberately breaks DP (scales the noise); only for testing that the audit can fail.
    parser.add_argument("--noise-scale-for-testing", type=float, default=1.0, help=argparse.SUPPRESS)


def _defaults():
    from dpft.train.canary_audit import AuditConfig

    return AuditConfig()


def check_args(args: argparse.Namespace) -> None:
    """Raise UsageError (one line) for any non-finite or out-of-range value, before any training."""
    floats = {"epsilon": args.epsilon, "noise-multiplier": args.noise_multiplier, "sampling-rate": args.sampling_rate,
              "delta": args.delta, "confidence": args.confidence, "noise-scale-for-testing": args.noise_scale_for_testing}
    for name, v in floats.items():
        if v is not None and not math.isfinite(v):
            raise UsageError(f"--{name}: must be a finite number, got {v}")
    sigma = args.noise_multiplier
    if sigma is not None and sigma != 0 and not SIGMA_RANGE[0] <= sigma <= SIGMA_RANGE[1]:
        raise UsageError(f"--noise-multiplier: must be 0 or in [{SIGMA_RANGE[0]:g}, {SIGMA_RANGE[1]:g}], got {sigma}")
    if not 0 <= args.seed <= MAX_SEED:
        raise UsageError(f"--seed: must be in [0, {MAX_SEED}], got {args.seed}")
    if not -1 <= args.insecure_fixed_noise_seed <= MAX_SEED:
        raise UsageError(f"--insecure-fixed-noise-seed: must be -1 (off) or in [0, {MAX_SEED}], "
                         f"got {args.insecure_fixed_noise_seed}")
    if not 1 <= args.steps <= 10**6:
        raise UsageError(f"--steps: must be in [1, 1e6], got {args.steps}")


def run(args: argparse.Namespace) -> int:
    from dpft.train import canary_audit as audit

    check_args(args)

    config = audit.AuditConfig(
        num_canaries=args.canaries, steps=args.steps, sampling_rate=args.sampling_rate, epsilon=args.epsilon,
        noise_multiplier=args.noise_multiplier, delta=args.delta, confidence=args.confidence,
        accountant=args.accountant, seed=args.seed, noise_scale_for_testing=args.noise_scale_for_testing,
        dtype=args.dtype, grad_method=args.grad_method, insecure_fixed_noise_seed=args.insecure_fixed_noise_seed)
    try:
        config.validate()
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
