"""`dpft accountant`: epsilon of (q, sigma, steps, delta), or sigma for a target epsilon.

  dpft accountant --sampling-rate Q --noise-multiplier S --steps T --delta D [--accountant pld|rdp] [--json]
  dpft accountant --target-epsilon E --sampling-rate Q --steps T --delta D [--accountant pld|rdp] [--json]
  ... [--bands B]   BandMF (privacy.mechanism=bandmf) with B bands: cyclic Poisson at rate B*Q, amplified event

Imports no jax. All values are parsed here (not by argparse) so that every invalid value
gives one line on stderr and exit code 2 (via dpft.errors.UsageError). The work is bounded:
the noise multiplier must lie in `SIGMA_RANGE` (below it the PLD accountant runs for minutes
on an epsilon in the thousands; above it the arithmetic overflows) and steps <= `MAX_STEPS`.
"""
from __future__ import annotations

import argparse
import json
import math

from dpft.errors import UsageError
from dpft.privacy import accounting
from dpft.privacy import limits
from dpft.privacy.accounting import SIGMA_RANGE

MAX_STEPS = limits.MAX_STEPS
# PLD's memory grows with the epsilon it represents (an epsilon of 10^4 at 10^7 steps needs
# tens of GiB): above this RDP upper bound the PLD accountant is not run.
PLD_EPSILON_LIMIT = 100.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sampling-rate", metavar="Q", help="Poisson sampling rate per update, in (0, 1]")
    parser.add_argument("--noise-multiplier", metavar="S", help="noise multiplier sigma > 0 (gives epsilon)")
    parser.add_argument("--target-epsilon", metavar="E", help="target epsilon > 0 (gives the noise multiplier)")
    parser.add_argument("--steps", metavar="T", help="number of optimizer updates, int >= 1")
    parser.add_argument("--delta", metavar="D", help="delta in (0, 1)")
    parser.add_argument("--accountant", default="pld", metavar="pld|rdp", help="accountant (default: pld)")
    parser.add_argument("--bands", metavar="B", help="BandMF with B bands (privacy.mechanism=bandmf; default: DP-SGD)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _float(name: str, text: str | None) -> float:
    if text is None:
        raise UsageError(f"--{name} is required")
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"--{name}: not a number: {text!r}") from None
    if not math.isfinite(value):
        raise UsageError(f"--{name}: must be finite, got {text!r}")
    return value


def _parse(args: argparse.Namespace) -> dict:
    if (args.noise_multiplier is None) == (args.target_epsilon is None):
        raise UsageError("give exactly one of --noise-multiplier (to get epsilon) or --target-epsilon "
                         "(to get the noise multiplier)")
    q = _float("sampling-rate", args.sampling_rate)
    if not 0 < q <= 1:
        raise UsageError(f"--sampling-rate: must be in (0, 1], got {args.sampling_rate}")
    if args.steps is None:
        raise UsageError("--steps is required")
    try:
        steps = int(args.steps)
    except ValueError:
        raise UsageError(f"--steps: not an integer: {args.steps!r}") from None
    if not 1 <= steps <= MAX_STEPS:
        raise UsageError(f"--steps: must be in [1, {MAX_STEPS:.0e}], got {args.steps}")
    delta = _float("delta", args.delta)
    if not 0 < delta < 1:
        raise UsageError(f"--delta: must be in (0, 1), got {args.delta}")
    if args.accountant not in accounting.ACCOUNTANTS:
        raise UsageError(f"--accountant: must be one of {', '.join(accounting.ACCOUNTANTS)}, got {args.accountant!r}")
    out = {"sampling_rate": q, "steps": steps, "delta": delta, "accountant": args.accountant}
    if args.bands is not None:
        try:
            bands = int(args.bands)
        except ValueError:
            raise UsageError(f"--bands: not an integer: {args.bands!r}") from None
        if not 1 <= bands <= steps or bands * q > 1:
            raise UsageError(f"--bands: must be in [1, --steps={steps}] with bands * sampling rate <= 1, got "
                             f"{args.bands}")
        out["bands"] = bands
    if args.noise_multiplier is not None:
        sigma = _float("noise-multiplier", args.noise_multiplier)
        if not SIGMA_RANGE[0] <= sigma <= SIGMA_RANGE[1]:
            raise UsageError(f"--noise-multiplier: must be in [{SIGMA_RANGE[0]:g}, {SIGMA_RANGE[1]:g}] (below: no "
                             f"meaningful privacy and minutes of accounting; above: overflow), got {args.noise_multiplier}")
        out["noise_multiplier"] = sigma
    else:
        eps = _float("target-epsilon", args.target_epsilon)
        if not eps > 0:
            raise UsageError(f"--target-epsilon: must be > 0, got {args.target_epsilon}")
        out["target_epsilon"] = eps
    return out


def run(args: argparse.Namespace) -> int:
    p = _parse(args)
    q, steps, delta, acc, bands = p["sampling_rate"], p["steps"], p["delta"], p["accountant"], p.get("bands")
    if "target_epsilon" in p:
        try:
            sigma = accounting.calibrate_noise_multiplier(p["target_epsilon"], q, steps, delta, accountant=acc,
                                                          bands=bands)
        except ValueError as e:
            raise UsageError(str(e)) from None
        p["noise_multiplier"] = sigma
    if acc == "pld":  # bound PLD's work: the RDP accountant is fast and an upper bound
        rough = accounting.compute_epsilon(q, p["noise_multiplier"], steps, delta, accountant="rdp", bands=bands)
        if rough > PLD_EPSILON_LIMIT:
            raise UsageError(f"epsilon is about {rough:.3g} (RDP upper bound) for q={q:g}, noise_multiplier="
                             f"{p['noise_multiplier']:g}, steps={steps}: no meaningful privacy, and the PLD "
                             f"accountant would need too much memory for it; use --accountant rdp to print it")
    try:
        p["epsilon"] = accounting.compute_epsilon(q, p["noise_multiplier"], steps, delta, accountant=acc, bands=bands)
    except (ValueError, OverflowError, MemoryError) as e:  # dp-accounting's numerical limits (e.g. FFT length)
        raise UsageError(f"the {acc} accountant cannot compute epsilon for q={q:g}, "
                         f"noise_multiplier={p['noise_multiplier']:g}, steps={steps}: {e}") from None
    mech = "" if bands is None else f", BandMF with {bands} bands"
    if args.json:
        print(json.dumps(p, sort_keys=True))
    elif "target_epsilon" in p:
        print(f"noise_multiplier = {p['noise_multiplier']:.6g}  (achieves epsilon = {p['epsilon']:.6g} <= "
              f"{p['target_epsilon']:g} at delta = {delta:g}; q = {q:g}, steps = {steps}, accountant = {acc}{mech})")
    else:
        print(f"epsilon = {p['epsilon']:.6g}  (delta = {delta:g}; q = {q:g}, noise_multiplier = "
              f"{p['noise_multiplier']:g}, steps = {steps}, accountant = {acc}{mech})")
    return 0
