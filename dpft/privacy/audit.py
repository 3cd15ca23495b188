"""Empirical privacy auditing: lower bounds on epsilon from ONE training run (one-run and Gaussian tests).

Method (Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1) Training Run",
arXiv:2305.08846):

1. m canaries, each included in the training set independently with probability 1/2.
2. Train once with the production Trainer (`dpft.train.canary_audit`: the same privacy plan,
   data iterator, engine, compute dtype, secret noise and selection and step functions as `dpft train`).
3. Score every canary; guess "included" for the k+ highest scores, "excluded" for the
   k- lowest, abstain on the rest: r = k+ + k- guesses, v of them correct.
4. Under (eps, delta)-DP, P[v' >= v] <= p_value(m, r, v, eps, delta) (their Theorem 5.2,
   evaluated as in their Appendix D):
     beta  = P[Binomial(r, p) >= v],  p = e^eps / (1 + e^eps)
     alpha = max_{i = 1..v} P[v - i <= Binomial(r, p) < v] / i
     p_value = min(1, beta + 2 m delta alpha)      (delta = 0: exactly beta, Theorem 5.1)
   The lower bound at confidence 1 - a is the eps where p_value = a (p_value increases
   with eps); every smaller eps is rejected.
5. Search over (k+, k-): the paper reports the max over a few guess counts. We account
   for that search with a Bonferroni correction: each of the G candidates is tested at
   level a / G, so the max is still a valid (1 - a) lower bound.

This module holds the statistics (pure functions); the audit run lives in
`dpft.train.canary_audit` because it trains with the production Trainer.

Canaries there are "Dirac" gradient canaries (white-box, the strongest cheap setting): the
model is one linear unit over the pixels of canary images with one white pixel each
(`dpft.models.canary`), so canary i's gradient, after clipping, is exactly C e_i on w (w_i its
coordinate). The data set holds only the included canaries; DP must hold for every data set,
so this one is allowed. Plain SGD (no momentum) makes the final model reveal the sum of all
noisy updates: the score of canary i, (w_T - w_0)_i B / lr, is ~ (times sampled) * C +
N(0, T sigma^2 C^2). Excluded canaries score pure noise.

The Gaussian test (`gaussian_audit`) reads the same scores parametrically: the excluded canaries
measure the noise, the included ones the sensitivity; far more power than the one-run bound
against a wrong C or sigma, under the assumption that the run is a subsampled Gaussian mechanism.

Also `clopper_pearson_epsilon_lower_bound`: the classical threshold-attack bound.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
import scipy.optimize
import scipy.special
import scipy.stats

# ---------------------------------------------------------------------------------------
# Statistics (pure functions).
# ---------------------------------------------------------------------------------------


def one_run_p_value(m: int, r: int, v: int, eps: float, delta: float = 0.0) -> float:
    """Upper bound on P[>= v correct of r guesses] for an (eps, delta)-DP run with m canaries.

    Theorem 5.1 (delta = 0: the Binomial(r, e^eps/(1+e^eps)) tail) and Theorem 5.2 /
    Appendix D (delta > 0) of Steinke, Nasr & Jagielski 2023.
    """
    _check_counts(m, r, v)
    if not eps >= 0 or not 0 <= delta <= 1:
        raise ValueError(f"one_run_p_value: need eps >= 0 and delta in [0, 1]; got eps={eps}, delta={delta}")
    p = float(scipy.special.expit(eps))
    beta = float(scipy.stats.binom.sf(v - 1, r, p))  # P[Bin(r, p) >= v]
    if delta == 0 or v == 0:
        return min(1.0, beta)
    i = np.arange(1, v + 1)
    below = np.cumsum(scipy.stats.binom.pmf(v - i, r, p))  # P[v - i <= Bin < v], i = 1..v
    alpha = float(np.max(below / i))
    return min(1.0, beta + 2 * m * delta * alpha)


def one_run_epsilon_lower_bound(m: int, r: int, v: int, *, delta: float = 0.0,
                                significance: float = 0.05) -> float:
    """Largest eps rejected at level `significance`: solves one_run_p_value(eps) = significance.

    Returns 0.0 when even eps = 0 is not rejected. Non-decreasing in v (more correct
    guesses can only raise the bound).
    """
    _check_counts(m, r, v)
    if not 0 < significance < 1:
        raise ValueError(f"significance must be in (0, 1); got {significance}")

    def excess(eps: float) -> float:  # > 0 while eps is rejected
        return significance - one_run_p_value(m, r, v, eps, delta)

    if excess(0.0) <= 0:
        return 0.0
    lo, hi = 0.0, 1.0
    while excess(hi) > 0:
        lo, hi = hi, 2 * hi
        if hi > 1e3:  # p-value of all-correct guesses tends to 1 only as eps -> inf
            return math.inf
    return float(scipy.optimize.brentq(excess, lo, hi, xtol=1e-9, rtol=1e-10))


def _check_counts(m: int, r: int, v: int) -> None:
    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= correct v <= guesses r <= canaries m; got v={v}, r={r}, m={m}")


def guess_counts(num_canaries: int, fractions: Sequence[float]) -> list[tuple[int, int]]:
    """Candidate (k+, k-) pairs: k+ = k- = round(f * m / 2) for each fraction f in (0, 1]."""
    pairs = []
    for f in fractions:
        if not 0 < f <= 1:
            raise ValueError(f"guess fraction must be in (0, 1]; got {f}")
        k = max(1, int(round(f * num_canaries / 2)))
        if (k, k) not in pairs:
            pairs.append((k, k))
    return pairs


@dataclasses.dataclass(frozen=True)
class GuessOutcome:
    """The best (k+, k-) of the search and its outcome."""

    epsilon_lower_bound: float
    k_pos: int
    k_neg: int
    num_guesses: int
    correct: int


def best_guess_bound(scores: np.ndarray, included: np.ndarray, *, delta: float, confidence: float = 0.95,
                     pairs: Sequence[tuple[int, int]]) -> GuessOutcome:
    """Max over (k+, k-) in `pairs` of the one-run lower bound, Bonferroni-corrected.

    scores: float [m], higher = "more likely included"; included: bool [m], the truth.
    Ties are broken by canary index (deterministic; scores are continuous in practice).
    """
    scores, included = np.asarray(scores, np.float64), np.asarray(included, bool)
    m = scores.shape[0]
    if included.shape != (m,):
        raise ValueError(f"scores {scores.shape} and included {included.shape} differ")
    order = np.argsort(-scores, kind="stable")  # descending
    significance = (1 - confidence) / max(1, len(pairs))
    best = GuessOutcome(0.0, 0, 0, 0, 0)
    for k_pos, k_neg in pairs:
        if k_pos + k_neg > m:
            continue
        correct = int(included[order[:k_pos]].sum() + (~included[order[m - k_neg:]]).sum())
        bound = one_run_epsilon_lower_bound(m, k_pos + k_neg, correct, delta=delta, significance=significance)
        if bound > best.epsilon_lower_bound or best.num_guesses == 0:
            best = GuessOutcome(bound, k_pos, k_neg, k_pos + k_neg, correct)
    return best


def clopper_pearson_interval(k: int, n: int, alpha: float) -> tuple[float, float]:
    """Two-sided (1 - alpha) Clopper-Pearson interval of a binomial proportion k / n."""
    if not (0 <= k <= n and n > 0):
        raise ValueError(f"need 0 <= k <= n, n > 0; got k={k}, n={n}")
    lo = 0.0 if k == 0 else float(scipy.stats.beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(scipy.stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def clopper_pearson_epsilon_lower_bound(tp: int, fp: int, tn: int, fn: int, delta: float,
                                        alpha: float = 0.05) -> float:
    """Epsilon lower bound of one threshold attack at confidence 1 - alpha.

    (eps, delta)-DP implies TPR <= e^eps FPR + delta and TNR <= e^eps FNR + delta. With
    Clopper-Pearson intervals (each rate two-sided at level alpha / 2, so both hold jointly
    with probability >= 1 - alpha): eps >= max(log((TPR_lo - delta) / FPR_hi),
    log((TNR_lo - delta) / FNR_hi), 0).
    """
    if min(tp, fp, tn, fn) < 0 or tp + fn == 0 or fp + tn == 0:
        raise ValueError(f"need non-negative counts with positives and negatives; got tp={tp}, fp={fp}, "
                         f"tn={tn}, fn={fn}")
    tpr_lo, tpr_hi = clopper_pearson_interval(tp, tp + fn, alpha / 2)
    fpr_lo, fpr_hi = clopper_pearson_interval(fp, fp + tn, alpha / 2)
    candidates = [0.0]
    for num, den in ((tpr_lo - delta, fpr_hi), (1 - fpr_hi - delta, 1 - tpr_lo)):
        if num > 0:
            candidates.append(math.inf if den <= 0 else math.log(num / den))
    return max(candidates)


# ---------------------------------------------------------------------------------------
# The Gaussian test: measured sensitivity and noise of the subsampled Gaussian mechanism.
# ---------------------------------------------------------------------------------------

#: Fewest included and excluded canaries the Gaussian test accepts (its intervals are normal/chi-square ones).
GAUSSIAN_MIN_CANARIES = 30


@dataclasses.dataclass(frozen=True)
class GaussianAudit:
    """The Gaussian test's measurements, in units of the run's scores (the clip norm's scale).

    sensitivity: one unit's contribution to an update's sum (estimate, lower confidence bound);
    noise_std: the noise's standard deviation per update and coordinate (estimate, upper bound);
    noise_multiplier_upper: noise_std_upper / sensitivity_lower (inf when the lower bound is <= 0);
    epsilon_lower_bound: the accountant's epsilon of (q, noise_multiplier_upper, T): a lower confidence
    bound on the run's epsilon if the run is a Poisson-subsampled Gaussian mechanism.
    """

    sensitivity: float
    sensitivity_lower: float
    noise_std: float
    noise_std_upper: float
    noise_multiplier_upper: float
    epsilon_lower_bound: float
    claimed_epsilon: float
    passed: bool
    confidence: float
    num_included: int
    num_excluded: int
    expected_sensitivity: float = 0.0  # what the claim says: C
    expected_noise_std: float = 0.0  # sigma C

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _gaussian_bounds(x_in: np.ndarray, x_out: np.ndarray, sampling_rate: float, steps: int, confidence: float
                     ) -> tuple[np.ndarray, ...]:
    """(sensitivity, its lower bound, noise std, its upper bound) from scores [..., n_in] and [..., n_out]
    (leading axes: independent runs), each bound at level (1 - confidence) / 2."""
    n_in, n_out = x_in.shape[-1], x_out.shape[-1]
    alpha = (1.0 - confidence) / 2.0
    var_out, var_in = np.var(x_out, axis=-1, ddof=1), np.var(x_in, axis=-1, ddof=1)
    noise_std = np.sqrt(var_out / steps)
    noise_std_upper = np.sqrt((n_out - 1) * var_out / float(scipy.stats.chi2.ppf(alpha, n_out - 1)) / steps)
    diff = np.mean(x_in, axis=-1) - np.mean(x_out, axis=-1)
    se = np.sqrt(var_in / n_in + var_out / n_out)
    scale = sampling_rate * steps
    return diff / scale, (diff - float(scipy.stats.norm.ppf(1.0 - alpha)) * se) / scale, noise_std, noise_std_upper


def gaussian_audit(scores_in: np.ndarray, scores_out: np.ndarray, *, sampling_rate: float, steps: int,
                   clip_norm: float, noise_multiplier: float, delta: float, confidence: float,
                   accountant: str, claimed_epsilon: float) -> GaussianAudit:
    """Tests the claim that the run is T updates of Poisson(q)-subsampled Gaussian noise sigma C on a sum
    of contributions of norm <= C, from the canary scores of one run.

    Model (white-box Dirac canaries, `dpft.train.canary_audit`): an excluded canary's score is the sum of
    its noise coordinates, ~ N(0, T s^2) (s the noise std per update); an included canary's adds
    Binomial(T, q) x D (D its contribution per sampled update). So
      s^2 = var(excluded) / T: upper bound from the chi-square interval of the variance;
      D = (mean(included) - mean(excluded)) / (q T): lower bound from the normal interval of the difference;
    each at level (1 - confidence) / 2 (Bonferroni). The mechanism with sensitivity D and noise s has the
    noise multiplier s / D, and epsilon falls as it grows, so the accountant's epsilon at
    s_upper / D_lower is a lower confidence bound on the epsilon of the run as it ran. Passed: that bound
    <= the claim. The claim's own C and sigma C are reported beside (expected_*), not used.
    """
    from dpft.privacy import accounting

    x_in, x_out = np.asarray(scores_in, np.float64), np.asarray(scores_out, np.float64)
    n_in, n_out = len(x_in), len(x_out)
    if min(n_in, n_out) < GAUSSIAN_MIN_CANARIES:
        raise ValueError(f"gaussian_audit: needs >= {GAUSSIAN_MIN_CANARIES} included and excluded canaries, "
                         f"got {n_in} and {n_out}; use more canaries")
    if not (0 < confidence < 1 and 0 < sampling_rate <= 1 and steps >= 1):
        raise ValueError(f"gaussian_audit: confidence in (0, 1), q in (0, 1], steps >= 1 required; got "
                         f"{confidence}, {sampling_rate}, {steps}")
    sensitivity, sensitivity_lower, noise_std, noise_std_upper = (
        float(v) for v in _gaussian_bounds(x_in, x_out, sampling_rate, steps, confidence))
    if sensitivity_lower <= 0:
        multiplier, eps = math.inf, 0.0
    else:
        multiplier = noise_std_upper / sensitivity_lower
        low, high = accounting.SIGMA_RANGE
        eps = 0.0 if multiplier >= high else accounting.compute_epsilon(
            sampling_rate, max(multiplier, low), steps, delta, accountant)
    return GaussianAudit(
        sensitivity=sensitivity, sensitivity_lower=sensitivity_lower, noise_std=noise_std,
        noise_std_upper=noise_std_upper, noise_multiplier_upper=multiplier, epsilon_lower_bound=float(eps),
        claimed_epsilon=float(claimed_epsilon), passed=bool(eps <= claimed_epsilon), confidence=confidence,
        num_included=n_in, num_excluded=n_out, expected_sensitivity=float(clip_norm),
        expected_noise_std=float(noise_multiplier * clip_norm))


def gaussian_detection_rate(*, num_included: int, num_excluded: int, sampling_rate: float, steps: int,
                            noise_multiplier: float, sensitivity_ratio: float = 1.0, noise_ratio: float = 1.0,
                            confidence: float = 0.95, trials: int = 2000, seed: int = 0) -> float:
    """The share of runs whose `gaussian_audit` fails, for a run that contributes `sensitivity_ratio` x C
    per sampled unit and adds noise `noise_ratio` x sigma C, against the claim (C, sigma): simulated under
    the test's model, `trials` runs (C = 1). The test fails iff noise_std_upper / sensitivity_lower <
    sigma (epsilon falls with the noise multiplier), so no accountant is needed."""
    rng = np.random.default_rng(seed)
    noise = noise_ratio * noise_multiplier * math.sqrt(steps)
    x_out = rng.normal(0.0, noise, (trials, num_excluded))
    x_in = (rng.binomial(steps, sampling_rate, (trials, num_included)) * sensitivity_ratio
            + rng.normal(0.0, noise, (trials, num_included)))
    _, lower, _, upper = _gaussian_bounds(x_in, x_out, sampling_rate, steps, confidence)
    return float(np.mean((lower > 0) & (upper < noise_multiplier * lower)))


def smallest_detected_break(*, num_included: int, num_excluded: int, sampling_rate: float, steps: int,
                            noise_multiplier: float, confidence: float = 0.95, power: float = 0.9,
                            kind: str = "sensitivity") -> float:
    """The Gaussian test's power: the smallest sensitivity ratio (kind "sensitivity", > 1) or the largest
    noise ratio (kind "noise", < 1) that it detects in at least `power` of runs (simulated,
    `gaussian_detection_rate`; bisection to 0.01)."""
    if kind not in ("sensitivity", "noise"):
        raise ValueError(f"smallest_detected_break: kind must be 'sensitivity' or 'noise', got {kind!r}")

    def detects(r: float) -> bool:
        ratios = {"sensitivity_ratio": r} if kind == "sensitivity" else {"noise_ratio": r}
        return gaussian_detection_rate(num_included=num_included, num_excluded=num_excluded,
                                       sampling_rate=sampling_rate, steps=steps, noise_multiplier=noise_multiplier,
                                       confidence=confidence, **ratios) >= power

    good, bad = (64.0, 1.0) if kind == "sensitivity" else (1e-3, 1.0)  # detected, not detected
    if not detects(good):
        return math.inf if kind == "sensitivity" else 0.0
    while abs(good - bad) > 0.01:
        mid = math.sqrt(good * bad)
        good, bad = (mid, bad) if detects(mid) else (good, mid)
    return good
