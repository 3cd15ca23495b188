"""Accounting (dp-accounting PLD/RDP), calibration, the Ledger and the `dpft accountant` CLI."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import dp_accounting
import pytest

from dpft import cli
from dpft.privacy import accounting


def direct_epsilon(q, sigma, steps, delta, accountant):
    """dp-accounting called directly on the same event (independent of our helpers)."""
    if accountant == "pld":
        acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    else:
        acc = dp_accounting.rdp.RdpAccountant(orders=list(accounting.RDP_ORDERS))
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return acc.compose(event).get_epsilon(delta)


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
@pytest.mark.parametrize("q,sigma,steps,delta", [(0.01, 1.0, 1000, 1e-5), (0.1, 2.0, 50, 1e-6)])
def test_epsilon_equals_dp_accounting_directly(q, sigma, steps, delta, accountant):
    eps = accounting.compute_epsilon(q, sigma, steps, delta, accountant=accountant)
    assert eps == pytest.approx(direct_epsilon(q, sigma, steps, delta, accountant), rel=1e-12)


def test_make_accountant_is_the_runs_accountant_and_dpsgd_pld_its_own_pieces():
    """Individual accounting composes `dpsgd_pld` pieces where an accountant cannot share them: the
    pieces are the PLD accountant's own construction (equal epsilons, alone and composed in order),
    and the RDP accountant uses RDP_ORDERS."""
    assert list(accounting.make_accountant("rdp").orders) == list(accounting.RDP_ORDERS)
    for q, sigma, steps in [(0.01, 1.0, 1000), (0.3, 0.8, 7)]:
        by_accountant = accounting.epsilon_of_event(accounting.dpsgd_event(q, sigma, steps), 1e-5, "pld")
        assert accounting.pld_epsilon([accounting.dpsgd_pld(q, sigma, steps)], 1e-5) == by_accountant
        for _ in range(2):  # compute_epsilon reuses the step's cached PLD: the same number every time
            assert accounting.compute_epsilon(q, sigma, steps, 1e-5, "pld") == by_accountant
    segments = [(0.05, 2.2, 6), (0.05, 1.1, 9)]
    acc = accounting.make_accountant("pld").compose(dp_accounting.ComposedDpEvent(
        [accounting.dpsgd_event(*s) for s in segments]))
    assert accounting.pld_epsilon([accounting.dpsgd_pld(*s) for s in segments], 1e-5) == acc.get_epsilon(1e-5)
    ledger = accounting.Ledger()
    for q, sigma, n in segments:
        ledger.record(q, sigma, n)
    assert ledger.epsilon(1e-5, "pld") == acc.get_epsilon(1e-5) == ledger.epsilon(1e-5, "pld")
    with pytest.raises(ValueError, match="accountant"):
        accounting.make_accountant("gdp")


def test_epsilon_known_values_and_orderings():
    # DESIGN.md: q=0.01, sigma=1, 10,000 steps, delta=1e-5 -> 6.19 (PLD)
    assert accounting.compute_epsilon(0.01, 1.0, 10_000, 1e-5) == pytest.approx(6.19, rel=0.01)
    # q = 1, one step: the Gaussian mechanism, whose exact epsilon is known analytically
    exact = dp_accounting.get_epsilon_gaussian(1.5, 1e-5)
    pld = accounting.compute_epsilon(1.0, 1.5, 1, 1e-5)
    assert exact <= pld + 1e-9 and pld == pytest.approx(exact, rel=0.01)
    # RDP is an upper bound, looser than PLD; more noise -> less epsilon; more steps -> more
    rdp = accounting.compute_epsilon(0.01, 1.0, 1000, 1e-5, accountant="rdp")
    assert rdp > accounting.compute_epsilon(0.01, 1.0, 1000, 1e-5)
    assert accounting.compute_epsilon(0.01, 2.0, 1000, 1e-5) < accounting.compute_epsilon(0.01, 1.0, 1000, 1e-5)
    assert accounting.compute_epsilon(0.01, 1.0, 2000, 1e-5) > accounting.compute_epsilon(0.01, 1.0, 1000, 1e-5)


@pytest.mark.parametrize("bad", [dict(sampling_rate=0.0), dict(sampling_rate=1.2), dict(noise_multiplier=0.0),
                                 dict(steps=0), dict(delta=1.0), dict(delta=0.0), dict(accountant="gdp")])
def test_compute_epsilon_rejects_invalid_values(bad):
    args = dict(sampling_rate=0.01, noise_multiplier=1.0, steps=10, delta=1e-5, accountant="pld") | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        accounting.compute_epsilon(**args)


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
@pytest.mark.parametrize("target", [1.0, 8.0])
def test_calibration_round_trips(target, accountant):
    q, steps, delta = 0.01, 1000, 1e-5
    sigma = accounting.calibrate_noise_multiplier(target, q, steps, delta, accountant=accountant)
    eps = accounting.compute_epsilon(q, sigma, steps, delta, accountant=accountant)
    assert eps <= target
    assert eps >= 0.98 * target
    # and a slightly smaller sigma would exceed the target (it is the smallest, to 1%)
    assert accounting.compute_epsilon(q, 0.99 * sigma, steps, delta, accountant=accountant) > target


def test_calibration_unreachable_raises():
    with pytest.raises(ValueError, match="unreachable"):
        accounting.calibrate_noise_multiplier(1e-4, 1.0, 1000, 1e-5)
    with pytest.raises(ValueError, match="too large"):
        accounting.calibrate_noise_multiplier(1e4, 0.01, 10, 1e-5)
    with pytest.raises(ValueError, match="target_epsilon"):
        accounting.calibrate_noise_multiplier(-1.0, 0.01, 10, 1e-5)


def test_ledger_records_merges_and_accounts():
    ledger = accounting.Ledger()
    assert ledger.epsilon(1e-5) == 0.0 and ledger.total_steps == 0
    ledger.record(0.01, 1.0, n=300)
    ledger.record(0.01, 1.0)
    ledger.record(0.01, 1.0, n=199)
    assert len(ledger.entries) == 1 and ledger.total_steps == 500
    # resuming in pieces == one run of the total length
    assert ledger.epsilon(1e-5) == pytest.approx(accounting.compute_epsilon(0.01, 1.0, 500, 1e-5), rel=1e-12)
    ledger.record(0.02, 1.5, n=100)
    ledger.record(0.01, 1.0, n=10)
    assert [e.steps for e in ledger.entries] == [500, 100, 10] and ledger.total_steps == 610
    direct = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    for q, s, n in [(0.01, 1.0, 500), (0.02, 1.5, 100), (0.01, 1.0, 10)]:
        direct.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), n)
    assert ledger.epsilon(1e-5) == pytest.approx(direct.get_epsilon(1e-5), rel=1e-9)
    rdp = dp_accounting.rdp.RdpAccountant(orders=list(accounting.RDP_ORDERS)).compose(ledger.dp_event())
    assert ledger.epsilon(1e-5, "rdp") == pytest.approx(rdp.get_epsilon(1e-5), rel=1e-12)
    ledger.record(0.01, 0.0)
    assert math.isinf(ledger.epsilon(1e-5))
    with pytest.raises(ValueError, match="sampling_rate"):
        ledger.record(0.0, 1.0)


def test_ledger_json_round_trip():
    ledger = accounting.Ledger()
    ledger.record(0.013, 1.1, n=7)
    ledger.record(0.02, 0.9, n=3)
    text = ledger.to_json()
    data = json.loads(text)  # plain JSON data, no pickles
    assert data["entries"][0] == {"sampling_rate": 0.013, "noise_multiplier": 1.1, "steps": 7}
    back = accounting.Ledger.from_json(text)
    assert back == ledger and back.total_steps == 10
    assert back.epsilon(1e-5) == ledger.epsilon(1e-5)
    with pytest.raises(ValueError, match="format"):
        accounting.Ledger.from_json('{"entries": []}')
    with pytest.raises(ValueError, match=r"entries\[0\]"):
        accounting.Ledger.from_json(json.dumps({"format": accounting.LEDGER_FORMAT, "entries": [{"steps": 1}]}))


BASE = ["accountant", "--sampling-rate", "0.01", "--steps", "1000", "--delta", "1e-5"]


def test_cli_prints_epsilon_and_json(capsys):
    assert cli.main(BASE + ["--noise-multiplier", "1.0"]) == 0
    out = capsys.readouterr().out
    want = accounting.compute_epsilon(0.01, 1.0, 1000, 1e-5)
    assert f"{want:.6g}" in out
    assert cli.main(BASE + ["--noise-multiplier", "1.0", "--json", "--accountant", "rdp"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"epsilon", "delta", "noise_multiplier", "sampling_rate", "steps", "accountant"} <= data.keys()
    assert data["epsilon"] == pytest.approx(accounting.compute_epsilon(0.01, 1.0, 1000, 1e-5, "rdp"))
    assert data["steps"] == 1000 and data["accountant"] == "rdp"


def test_cli_calibrates(capsys):
    assert cli.main(BASE + ["--target-epsilon", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["epsilon"] <= 2.0 and data["epsilon"] >= 0.98 * 2
    assert data["noise_multiplier"] == pytest.approx(accounting.calibrate_noise_multiplier(2.0, 0.01, 1000, 1e-5))
    assert cli.main(BASE + ["--target-epsilon", "2"]) == 0
    assert "noise_multiplier" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["accountant", "--sampling-rate", "1.5", "--noise-multiplier", "1", "--steps", "10", "--delta", "1e-5"],
    ["accountant", "--sampling-rate", "0", "--noise-multiplier", "1", "--steps", "10", "--delta", "1e-5"],
    ["accountant", "--sampling-rate", "0.1", "--noise-multiplier", "0", "--steps", "10", "--delta", "1e-5"],
    ["accountant", "--sampling-rate", "0.1", "--noise-multiplier", "1", "--steps", "0", "--delta", "1e-5"],
    ["accountant", "--sampling-rate", "0.1", "--noise-multiplier", "1", "--steps", "10", "--delta", "1"],
    ["accountant", "--sampling-rate", "0.1", "--noise-multiplier", "1", "--steps", "ten", "--delta", "1e-5"],
    ["accountant", "--sampling-rate", "0.1", "--steps", "10", "--delta", "1e-5"],
    ["accountant", "--sampling-rate", "0.1", "--noise-multiplier", "1", "--target-epsilon", "1", "--steps", "10",
     "--delta", "1e-5"],
    ["accountant", "--sampling-rate", "1", "--target-epsilon", "0.0001", "--steps", "1000", "--delta", "1e-5"],
    ["accountant", "--sampling-rate", "0.1", "--noise-multiplier", "1", "--steps", "10", "--delta", "1e-5",
     "--accountant", "gdp"],
])
def test_cli_invalid_values_exit_2_with_one_line(argv, capsys):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dpft accountant: error:")
    assert "Traceback" not in captured.err


def dpft_executable() -> str:
    return str(Path(sys.executable).with_name("dpft"))


def test_cli_subprocess():
    bad = subprocess.run([dpft_executable()] + BASE[:2] + ["2", "--noise-multiplier", "1", "--steps", "5",
                                                           "--delta", "1e-5"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "sampling-rate" in bad.stderr
    assert "Traceback" not in bad.stderr
    good = subprocess.run([dpft_executable()] + BASE + ["--noise-multiplier", "1.0", "--json"], capture_output=True,
                          text=True, timeout=120)
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["epsilon"] == pytest.approx(accounting.compute_epsilon(0.01, 1.0, 1000, 1e-5))
