"""Empirical auditing: statistics vs brute force / scipy, and audits of real and broken engines."""
import json
import math

import numpy as np
import pytest
import scipy.stats

from dpft import cli
from dpft.privacy import audit
from dpft.train import canary_audit


def brute_tail(r, v, eps):
    """P[Binomial(r, e^eps / (1 + e^eps)) >= v] by explicit summation of binomial terms."""
    p = math.exp(eps) / (1 + math.exp(eps))
    return sum(math.comb(r, j) * p**j * (1 - p) ** (r - j) for j in range(v, r + 1))


def brute_p_value(m, r, v, eps, delta):
    beta = brute_tail(r, v, eps)
    alpha = max([(brute_tail(r, v - i, eps) - beta) / i for i in range(1, v + 1)], default=0.0)
    return min(1.0, beta + 2 * m * delta * alpha)


@pytest.mark.parametrize("m,r,v", [(10, 6, 5), (20, 12, 12), (30, 20, 9), (8, 8, 0)])
@pytest.mark.parametrize("eps", [0.0, 0.3, 1.7])
@pytest.mark.parametrize("delta", [0.0, 1e-3])
def test_p_value_matches_brute_force(m, r, v, eps, delta):
    np.testing.assert_allclose(audit.one_run_p_value(m, r, v, eps, delta), brute_p_value(m, r, v, eps, delta),
                               rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("m,r,v,delta", [(20, 10, 10, 0.0), (40, 30, 26, 0.0), (40, 30, 26, 1e-4),
                                         (100, 60, 50, 1e-3)])
def test_lower_bound_is_the_smallest_not_rejected_eps_on_a_grid(m, r, v, delta):
    bound = audit.one_run_epsilon_lower_bound(m, r, v, delta=delta, significance=0.05)
    grid = np.arange(0, 5, 0.004)
    rejected = np.array([brute_p_value(m, r, v, e, delta) < 0.05 for e in grid])
    assert rejected[0] and not rejected[-1]
    first_kept = grid[np.argmin(rejected)]
    assert np.all(rejected[grid < first_kept])  # rejection region is an interval from 0
    assert first_kept - 0.004 <= bound <= first_kept + 1e-9


def test_lower_bound_monotone():
    m, r = 200, 100
    by_v = [audit.one_run_epsilon_lower_bound(m, r, v) for v in range(50, 101, 5)]
    assert by_v[0] == 0.0 and np.all(np.diff(by_v) >= 0) and by_v[-1] > 1
    assert np.all(np.diff([b for b in by_v if b > 0]) > 0)
    by_delta = [audit.one_run_epsilon_lower_bound(m, r, 90, delta=d) for d in (0, 1e-6, 1e-4, 1e-3)]
    assert np.all(np.diff(by_delta) <= 1e-12) and by_delta[-1] < by_delta[0]
    by_conf = [audit.one_run_epsilon_lower_bound(m, r, 90, significance=a) for a in (0.001, 0.01, 0.05, 0.2)]
    assert np.all(np.diff(by_conf) > 0)
    ps = [audit.one_run_p_value(m, r, 90, e, 1e-4) for e in np.linspace(0, 5, 30)]
    assert np.all(np.diff(ps) >= 0)
    # all r guesses right, pure DP: p^r = significance in closed form
    np.testing.assert_allclose(audit.one_run_epsilon_lower_bound(m, r, r),
                               math.log(0.05 ** (1 / r) / (1 - 0.05 ** (1 / r))), rtol=1e-7)
    with pytest.raises(ValueError, match="v=5, r=4"):
        audit.one_run_epsilon_lower_bound(10, 4, 5)


def test_best_guess_bound_bonferroni_and_random_scores():
    rng = np.random.default_rng(0)
    included = rng.random(400) < 0.5
    pairs = audit.guess_counts(400, (0.1, 0.5, 1.0))
    assert pairs == [(20, 20), (100, 100), (200, 200)]
    perfect = audit.best_guess_bound(included + 0.01 * rng.random(400), included, delta=0.0, pairs=pairs)
    expected = max(audit.one_run_epsilon_lower_bound(400, 2 * k, 2 * k, significance=0.05 / 3)
                   for k in (20, 100) if k <= min(included.sum(), (~included).sum()))
    np.testing.assert_allclose(perfect.epsilon_lower_bound, expected)
    assert perfect.correct == perfect.num_guesses
    noise = audit.best_guess_bound(rng.random(400), included, delta=1e-5, pairs=pairs)
    assert noise.epsilon_lower_bound < 0.5


def test_clopper_pearson_matches_scipy():
    for k, n in [(0, 10), (3, 10), (10, 10), (47, 120)]:
        ci = scipy.stats.binomtest(k, n).proportion_ci(confidence_level=0.9, method="exact")
        np.testing.assert_allclose(audit.clopper_pearson_interval(k, n, 0.1), (ci.low, ci.high), atol=1e-10)
    tp, fp, tn, fn, delta = 90, 10, 95, 5, 1e-5
    tpr = scipy.stats.binomtest(tp, tp + fn).proportion_ci(confidence_level=0.975, method="exact")
    fpr = scipy.stats.binomtest(fp, fp + tn).proportion_ci(confidence_level=0.975, method="exact")
    want = max(math.log((tpr.low - delta) / fpr.high), math.log((1 - fpr.high - delta) / (1 - tpr.low)), 0)
    got = audit.clopper_pearson_epsilon_lower_bound(tp, fp, tn, fn, delta, alpha=0.05)
    np.testing.assert_allclose(got, want, rtol=1e-10)
    assert got > 1  # a strong attack gives a real bound ...
    assert audit.clopper_pearson_epsilon_lower_bound(50, 50, 50, 50, delta, alpha=0.05) == 0.0  # ... chance none


AUDIT = dict(num_canaries=1000, steps=100, sampling_rate=0.1, epsilon=1.0, delta=1e-5)


def test_non_private_run_gives_large_bound():
    res = canary_audit.run_audit({**AUDIT, "clipping_mode": "none", "noise_multiplier": 0.0})
    assert res.epsilon_lower_bound > 2 and math.isinf(res.epsilon_claimed) and res.passed


def test_broken_engine_is_caught_and_real_engine_passes():
    broken = canary_audit.run_audit({**AUDIT, "noise_scale_for_testing": 0.1})
    np.testing.assert_allclose(broken.epsilon_claimed, 1.0, atol=1e-3)  # sigma calibrated to epsilon 1
    assert broken.epsilon_lower_bound > 2 * broken.epsilon_claimed and not broken.passed
    # A correct engine passes with probability >= 95 % per run, whatever the secret; the secrets are fixed
    # (public, test-only) so the test is reproducible, and several of them so one lucky draw cannot decide it.
    bounds = []
    for secret in range(6):
        real = canary_audit.run_audit({**AUDIT, "seed": secret % 2, "insecure_fixed_noise_seed": secret})
        assert real.passed and real.noise_multiplier == broken.noise_multiplier
        bounds.append(real.epsilon_lower_bound)
    assert np.median(bounds) < 0.5 * broken.epsilon_claimed < broken.epsilon_lower_bound / 4
    again = canary_audit.run_audit({**AUDIT, "seed": 1, "insecure_fixed_noise_seed": 5})
    assert again.epsilon_lower_bound == bounds[5]  # a fixed secret reproduces the run exactly


def test_canary_patients_break_a_per_image_claim_and_not_a_per_patient_one():
    """Canaries with 10 images each: trained per image (unit example), one canary moves the sum by up
    to 10 C per update, so the audit's bound exceeds the example-level epsilon (the claim is not a
    per-patient one); trained per patient (one clipped gradient per canary), the same sigma passes."""
    example = canary_audit.run_audit({**AUDIT, "images_per_canary": 10, "insecure_fixed_noise_seed": 1})
    assert not example.passed and example.epsilon_lower_bound > 2 * example.epsilon_claimed
    patient = canary_audit.run_audit({**AUDIT, "images_per_canary": 10, "unit": "patient",
                                      "insecure_fixed_noise_seed": 1})
    assert patient.passed and patient.noise_multiplier == example.noise_multiplier
    assert patient.epsilon_lower_bound < 0.5 * patient.epsilon_claimed


def test_cli_reports_and_fails_loudly(capsys):
    assert cli.main(["audit", "--canaries", "1000", "--steps", "100", "--json", "--insecure-fixed-noise-seed", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["passed"] and out["epsilon_lower_bound"] <= out["epsilon_claimed"]
    assert cli.main(["audit", "--unit", "patient", "--images-per-canary", "4", "--insecure-fixed-noise-seed", "3"]) == 0
    assert "privacy unit patient, 4 image(s) per canary" in capsys.readouterr().out
    assert cli.main(["audit", "--noise-scale-for-testing", "0.1"]) == 1
    captured = capsys.readouterr()
    assert "AUDIT FAILED: empirical lower bound" in captured.err and "exceeds claimed epsilon 1.0" in captured.err
    assert "claimed epsilon" in captured.out
    assert cli.main(["audit", "--canaries", "1"]) == 2
    assert "num_canaries=1" in capsys.readouterr().err
