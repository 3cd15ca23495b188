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


# ----------------------------------------------------------------------------- the Gaussian test

def _model_scores(rng, n, q, steps, sigma, ratio=1.0, noise=1.0):
    """Scores of n included and n excluded canaries under the test's model (C = 1)."""
    x_out = rng.normal(0, noise * sigma * math.sqrt(steps), n)
    x_in = rng.binomial(steps, q, n) * ratio + rng.normal(0, noise * sigma * math.sqrt(steps), n)
    return x_in, x_out


def test_gaussian_test_statistics_equal_scipys_intervals_and_the_accountant():
    """Each number by an independent route: the sensitivity's lower bound is the lower end of scipy's
    Welch interval (normal), the noise's upper bound the chi-square interval of the variance, the bound the
    accountant's epsilon at their ratio."""
    from dpft.privacy import accounting
    rng = np.random.default_rng(0)
    q, steps, sigma = 0.1, 50, 2.0
    x_in, x_out = _model_scores(rng, 400, q, steps, sigma, ratio=1.5)
    g = audit.gaussian_audit(x_in, x_out, sampling_rate=q, steps=steps, clip_norm=1.0, noise_multiplier=sigma,
                             delta=1e-5, confidence=0.9, accountant="pld", claimed_epsilon=1.0)
    diff = scipy.stats.ttest_ind(x_in, x_out, equal_var=False).confidence_interval(0.9)  # two-sided 90 % = 95 % one side
    se = math.sqrt(np.var(x_in, ddof=1) / 400 + np.var(x_out, ddof=1) / 400)
    np.testing.assert_allclose(g.sensitivity_lower * q * steps, np.mean(x_in) - np.mean(x_out) - 1.6448536 * se,
                               rtol=1e-6)  # confidence 0.9 over two bounds: each one-sided at 95 %
    np.testing.assert_allclose(g.sensitivity_lower * q * steps, diff.low, rtol=2e-3)  # Welch's t ~ normal here
    assert diff.low < g.sensitivity * q * steps < diff.high
    var_hi = 399 * np.var(x_out, ddof=1) / scipy.stats.chi2.ppf(0.05, 399)
    np.testing.assert_allclose(g.noise_std_upper, math.sqrt(var_hi / steps), rtol=1e-12)
    assert g.noise_std < g.noise_std_upper
    np.testing.assert_allclose(g.epsilon_lower_bound, accounting.compute_epsilon(
        q, g.noise_std_upper / g.sensitivity_lower, steps, 1e-5), rtol=1e-12)
    assert g.expected_noise_std == sigma and g.num_included == g.num_excluded == 400


def test_gaussian_test_false_alarms_stay_below_its_level_and_it_catches_a_doubled_sensitivity():
    """Under the model, a correct run (ratios 1) fails in <= 1 - confidence of runs, and the simulated
    detection rate agrees with `gaussian_audit` itself (which calls the accountant) run by run."""
    from dpft.privacy import accounting
    q, steps = 0.1, 100
    sigma = accounting.calibrate_noise_multiplier(1.0, q, steps, 1e-5)
    common = dict(num_included=500, num_excluded=500, sampling_rate=q, steps=steps, noise_multiplier=sigma)
    assert audit.gaussian_detection_rate(**common, trials=4000) <= 0.05
    assert audit.gaussian_detection_rate(**common, sensitivity_ratio=2.0) >= 0.9
    assert audit.gaussian_detection_rate(**common, noise_ratio=0.4) >= 0.9
    rng = np.random.default_rng(3)
    outcomes = []
    for ratio in (1.0, 1.7, 2.0, 3.0):
        for _ in range(5):
            x_in, x_out = _model_scores(rng, 500, q, steps, sigma, ratio)
            g = audit.gaussian_audit(x_in, x_out, sampling_rate=q, steps=steps, clip_norm=1.0, noise_multiplier=sigma,
                                     delta=1e-5, confidence=0.95, accountant="pld", claimed_epsilon=1.0)
            rule = g.sensitivity_lower > 0 and g.noise_std_upper < sigma * g.sensitivity_lower
            assert (not g.passed) == rule  # the simulation's shortcut is the test's decision
            outcomes.append(g.passed)
    assert any(outcomes) and not all(outcomes)
    found = audit.smallest_detected_break(**common)
    assert 1.0 < found <= 2.0
    assert audit.gaussian_detection_rate(**common, sensitivity_ratio=found) >= 0.9
    assert audit.gaussian_detection_rate(**common, sensitivity_ratio=found - 0.05) < 0.9
    with pytest.raises(ValueError, match="needs >= 30 included"):
        audit.gaussian_audit(x_in[:10], x_out, sampling_rate=q, steps=steps, clip_norm=1.0, noise_multiplier=sigma,
                             delta=1e-5, confidence=0.95, accountant="pld", claimed_epsilon=1.0)


# ----------------------------------------------------------------------------- audits through the Trainer

AUDIT = dict(num_canaries=1000, steps=100, sampling_rate=0.1, epsilon=1.0, delta=1e-5)


def test_canary_data_and_model_put_each_canary_on_its_own_coordinate():
    """The canary data set holds the included canaries (k images each, a patient per canary); the
    canary model's clipped gradient of canary i is C e_i on w, exactly, through the vmap engine."""
    import jax
    import jax.numpy as jnp
    from dpft import models
    from dpft.config import build
    from dpft.data import canaries, load_splits
    from dpft.models import canary as canary_model
    from dpft.privacy import adapters, engine
    from dpft.train import privacy_setup
    assert canary_model.IMAGE_SIZES == canaries.SIZES
    tables = load_splits("canaries", None, num_canaries=50, images_per_canary=3, seed=4)
    included = np.flatnonzero(canaries.canary_inclusion(50, 4))
    train = tables["train"]
    assert len(train) == 3 * len(included) and {train[i]["patient_id"] for i in range(len(train))} == \
        {str(i) for i in included}
    model = models.create("canary_linear_32", 2)
    loss_fn, params, _ = adapters.nnx_loss_fn(model, privacy_setup.per_view_loss("multiclass"))
    aug = build.augment_config(canary_audit.run_config(canary_audit.AuditConfig(num_canaries=50), 1.0, num_devices=1))
    from dpft.data.augment import train_views
    rows = [train[3 * j] for j in range(4)]
    batch = {"image": jnp.asarray(np.stack([train_views(r["image"], np.random.default_rng(0), aug) for r in rows])),
             "label": jnp.ones([4, 1], jnp.int32), "mask": jnp.ones([4], jnp.float32)}
    clipping = engine.ClippingConfig(mode="flat", clip_norm=0.7)
    total, _ = jax.jit(lambda p, b: engine.clipped_grad_sum(loss_fn, p, b, jax.random.key(0), clipping=clipping,
                                                            microbatch_size=4))(params, batch)
    w = np.asarray(canary_model.weight_of_pixels(total))
    want = np.zeros(32 * 32)
    want[[int(r["patient_id"]) for r in rows]] = -0.7
    np.testing.assert_allclose(w, want, atol=1e-6)


def test_non_private_run_gives_large_bound():
    res = canary_audit.run_audit({**AUDIT, "steps": 30, "clipping_mode": "none", "noise_multiplier": 0.0})
    assert res.epsilon_lower_bound > 2 and math.isinf(res.epsilon_claimed) and res.passed and res.gaussian is None


@pytest.mark.slow
def test_broken_engines_are_caught_and_the_real_engine_passes():
    """Too little noise (sigma x 0.1) fails both tests; a doubled sensitivity (clipped at 2C, noise of C:
    true epsilon 2.4 against the claimed 1) passes the one-run test and fails the Gaussian test, which
    measures the sensitivity near 2C and the noise near sigma C; the real engine passes both for several
    secrets (fixed, public, test-only: reproducible), and a fixed secret reproduces its run exactly."""
    broken = canary_audit.run_audit({**AUDIT, "noise_scale_for_testing": 0.1, "insecure_fixed_noise_seed": 0})
    np.testing.assert_allclose(broken.epsilon_claimed, 1.0, atol=3e-3)  # sigma calibrated to epsilon 1, q = B / N
    assert broken.epsilon_lower_bound > 2 * broken.epsilon_claimed and not broken.passed
    assert not broken.one_run_passed and not broken.gaussian["passed"]
    doubled = canary_audit.run_audit({**AUDIT, "num_canaries": 4096, "sensitivity_scale_for_testing": 2.0,
                                      "insecure_fixed_noise_seed": 1})
    g = doubled.gaussian
    assert doubled.one_run_passed and not g["passed"] and not doubled.passed
    assert g["epsilon_lower_bound"] > doubled.epsilon_claimed
    assert g["sensitivity_lower"] > 1.0 and abs(g["sensitivity"] - 2.0) < 0.5
    assert abs(g["noise_std"] / g["expected_noise_std"] - 1) < 0.1
    bounds = []
    for secret in range(3):
        real = canary_audit.run_audit({**AUDIT, "seed": secret % 2, "insecure_fixed_noise_seed": secret})
        assert real.passed and real.noise_multiplier == broken.noise_multiplier, real
        assert real.gaussian["sensitivity_lower"] < 1.0 < real.gaussian["noise_std_upper"] / real.noise_multiplier
        bounds.append(real.epsilon_lower_bound)
    assert np.median(bounds) < 0.5 * broken.epsilon_claimed < broken.epsilon_lower_bound / 4
    again = canary_audit.run_audit({**AUDIT, "seed": 0, "insecure_fixed_noise_seed": 2})
    assert again.epsilon_lower_bound == bounds[2] and again.gaussian == real.gaussian  # a fixed secret repeats the run


@pytest.mark.slow
def test_canary_patients_break_a_per_image_claim_and_not_a_per_patient_one():
    """Canaries with 10 images each: trained per image (unit example), one canary moves the sum by up
    to 10 C per update, so the audit's bound exceeds the example-level epsilon (the claim is not a
    per-patient one); trained per patient (one clipped gradient per canary), the same sigma passes, and the
    Gaussian test measures one C per canary patient."""
    example = canary_audit.run_audit({**AUDIT, "images_per_canary": 10, "insecure_fixed_noise_seed": 1})
    assert not example.passed and example.epsilon_lower_bound > 2 * example.epsilon_claimed
    assert example.gaussian is None  # its model samples a canary as a whole
    patient = canary_audit.run_audit({**AUDIT, "images_per_canary": 10, "unit": "patient",
                                      "insecure_fixed_noise_seed": 1})
    assert patient.passed and patient.noise_multiplier == example.noise_multiplier
    assert patient.epsilon_lower_bound < 0.5 * patient.epsilon_claimed
    assert patient.gaussian["sensitivity_lower"] < 1.0


def test_cli_reports_and_fails_loudly(capsys, tmp_path):
    assert cli.main(["audit", "--canaries", "1000", "--steps", "40", "--json", "--insecure-fixed-noise-seed", "3",
                     "--workdir", str(tmp_path / "run")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["passed"] and out["epsilon_lower_bound"] <= out["epsilon_claimed"]
    assert out["gaussian"]["passed"] and out["gaussian"]["epsilon_lower_bound"] <= out["epsilon_claimed"]
    assert (tmp_path / "run" / "privacy_plan.json").is_file()  # the Trainer's own workdir, kept
    assert cli.main(["audit", "--canaries", "1000", "--steps", "40", "--sensitivity-scale-for-testing", "3",
                     "--insecure-fixed-noise-seed", "3"]) == 1
    captured = capsys.readouterr()
    assert "AUDIT FAILED: gaussian lower bound" in captured.err and "exceeds claimed epsilon" in captured.err
    assert "gaussian test: sensitivity" in captured.out and "audited: dpft train's Trainer" in captured.out
    assert "update 40/40" in captured.err  # the Trainer's progress
    assert cli.main(["audit", "--power", "--canaries", "1000"]) == 0
    assert "detects in 90% of runs a sensitivity >=" in capsys.readouterr().out
    assert cli.main(["audit", "--canaries", "1"]) == 2
    assert "num_canaries=1" in capsys.readouterr().err
