"""Empirical privacy auditing: a lower bound on epsilon from ONE training run.

Method (Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1) Training Run",
arXiv:2305.08846):

1. m canaries, each included in the training set independently with probability 1/2.
2. Train once through the production step (`dpft.train.canary_audit`: the same privacy
   plan, engine, compute dtype, secret noise and selection and step functions as `dpft train`).
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
`dpft.train.canary_audit` because it trains with the training step.

Canaries there are "Dirac" gradient canaries (white-box, the strongest cheap setting):
a linear model w in R^m, the loss of canary i is -<w, s e_i> (s = `canary_scale` * C,
so its gradient, after clipping, is exactly -C e_i whatever w is). The data set holds only
the included canaries; DP must hold for every data set, so this one is allowed. Plain SGD
(no momentum) makes the final model reveal the sum of all noisy updates, and the score of
canary i, its loss reduction loss_i(w_0) - loss_i(w_T) = s * (w_T - w_0)_i, is its
coordinate of that sum: ~ (times sampled) * C + N(0, T sigma^2 C^2) (up to the public
1 / expected batch size). Excluded canaries score pure noise.

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
