"""Empirical privacy auditing: a lower bound on epsilon from ONE training run.

Method (Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1) Training Run",
arXiv:2305.08846):

1. m canaries, each included in the training set independently with probability 1/2.
2. Train once with the real DP engine (`clipped_grad_sum`, `privatize`, Poisson
   sampling from `dpft.privacy.sampling`).
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

Canaries here are "Dirac" gradient canaries (white-box, the strongest cheap setting):
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
from typing import Any, Mapping, Sequence

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
# The audit run.
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AuditConfig:
    """What the audit trains (plain data).

    epsilon: target epsilon the noise multiplier is calibrated to (ignored if
      noise_multiplier is set). noise_multiplier: explicit sigma (0 = no noise).
    clipping_mode: an engine ClippingConfig mode ("flat"; "none" = non-private SGD).
    noise_scale_for_testing: passed to `privatize`; != 1 breaks DP on purpose (tests).
    guess_fractions: the (k+ = k-) candidates as fractions of m / 2 (Bonferroni over them).
    """

    num_canaries: int = 1000
    steps: int = 100
    sampling_rate: float = 0.1
    epsilon: float | None = 1.0
    noise_multiplier: float | None = None
    delta: float = 1e-5
    clip_norm: float = 1.0
    clipping_mode: str = "flat"
    canary_scale: float = 10.0
    learning_rate: float = 1.0
    noise_scale_for_testing: float = 1.0
    confidence: float = 0.95
    accountant: str = "pld"
    physical_batch_size: int = 128
    seed: int = 0
    guess_fractions: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4, 0.7, 1.0)

    def validate(self) -> None:
        def bad(field: str, value: Any, want: str) -> ValueError:
            return ValueError(f"audit config: {field}={value!r}: {want}")

        if not (isinstance(self.num_canaries, int) and self.num_canaries >= 2):
            raise bad("num_canaries", self.num_canaries, "need an int >= 2")
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise bad("steps", self.steps, "need an int >= 1")
        if not 0 < self.sampling_rate <= 1:
            raise bad("sampling_rate", self.sampling_rate, "need 0 < q <= 1")
        if self.noise_multiplier is None and not (self.epsilon is not None and self.epsilon > 0):
            raise bad("epsilon", self.epsilon, "need epsilon > 0 (or an explicit noise_multiplier)")
        if self.noise_multiplier is not None and not self.noise_multiplier >= 0:
            raise bad("noise_multiplier", self.noise_multiplier, "need sigma >= 0")
        if not 0 < self.delta < 1:
            raise bad("delta", self.delta, "need 0 < delta < 1")
        if not 0 < self.confidence < 1:
            raise bad("confidence", self.confidence, "need 0 < confidence < 1")
        if self.clipping_mode not in ("flat", "none"):
            raise bad("clipping_mode", self.clipping_mode, "the audit supports 'flat' and 'none'")
        if not self.canary_scale >= 1:
            raise bad("canary_scale", self.canary_scale, "need >= 1 (canary gradients must be clipped)")
        if not (isinstance(self.physical_batch_size, int) and self.physical_batch_size >= 1):
            raise bad("physical_batch_size", self.physical_batch_size, "need an int >= 1")
        if not self.noise_scale_for_testing >= 0:
            raise bad("noise_scale_for_testing", self.noise_scale_for_testing, "need >= 0")


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """Outcome of `run_audit`; passed = epsilon_lower_bound <= epsilon_claimed."""

    epsilon_lower_bound: float
    epsilon_claimed: float
    num_canaries: int
    num_guesses: int
    correct: int
    passed: bool
    noise_multiplier: float = 0.0
    delta: float = 0.0
    confidence: float = 0.95
    k_pos: int = 0
    k_neg: int = 0
    num_included: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _loss_fn(params: Any, views: Mapping[str, Any], rng: Any):
    """Linear loss of one example: -mean_K <w, x_k> (gradient -mean_K x_k, independent of w)."""
    import jax.numpy as jnp

    del rng
    loss = -jnp.mean(views["image"] @ params["w"])
    return loss, {}


def canary_inclusion(num_canaries: int, seed: int) -> np.ndarray:
    """bool [m]: canary i is in the training set (independent fair coins from `seed`)."""
    return np.random.default_rng([seed, 0xA0D1]).random(num_canaries) < 0.5


def train_canaries(config: AuditConfig, noise_multiplier: float, included: np.ndarray) -> np.ndarray:
    """Trains the linear model on the included Dirac canaries; returns scores float [m].

    Uses the real engine: Poisson selection per update, `clipped_grad_sum` over fixed-shape
    padded physical batches, `privatize` once per update with `noise_key(seed, t)`.
    """
    import jax
    import jax.numpy as jnp

    from dpft.privacy import engine, noise, sampling

    m = config.num_canaries
    members = np.flatnonzero(included)  # example j of the training set is canary members[j]
    scale = config.canary_scale * config.clip_norm
    clipping = engine.ClippingConfig(mode=config.clipping_mode, clip_norm=config.clip_norm)
    params = {"w": jnp.zeros([m], jnp.float32)}
    clip_norm = engine.sensitivity(clipping, params)
    # Public constant: depends on m (public), not on the secret number of included canaries.
    expected = sampling.expected_batch_size(m, config.sampling_rate)
    bsz = config.physical_batch_size

    @jax.jit
    def grad_sum_fn(params, ids, mask, rng):
        rows = jnp.where(mask[:, None] > 0, jax.nn.one_hot(ids, m, dtype=jnp.float32) * scale, 0.0)
        batch = {"image": rows[:, None, :], "mask": mask, "example_id": ids}
        return engine.clipped_grad_sum(_loss_fn, params, batch, rng, clipping=clipping,
                                       microbatch_size=bsz)[0]

    @jax.jit
    def apply_update(params, grad_sum, t):
        noisy = noise.privatize(grad_sum, noise.noise_key(config.seed, t), noise_multiplier=noise_multiplier,
                                clip_norm=clip_norm, expected_batch_size=expected,
                                noise_scale_for_testing=config.noise_scale_for_testing)
        return jax.tree.map(lambda p, g: p - config.learning_rate * g, params, noisy)

    rng = jax.random.key(config.seed)
    initial_losses = -scale * np.asarray(params["w"], np.float64)
    lookup = np.append(members, 0)  # training-set position -> canary id; padding (-1) -> 0, masked
    for t in range(config.steps):
        selected = (sampling.poisson_selection(config.seed, t, len(members), config.sampling_rate)
                    if len(members) else np.zeros([0], np.int64))
        grad_sum = engine.zeros_like_grad_sum(params)
        for idx, mask in sampling.physical_batches(selected, bsz):
            canary_ids = jnp.asarray(lookup[idx], jnp.int32)
            grad_sum = engine.accumulate(grad_sum, grad_sum_fn(params, canary_ids, jnp.asarray(mask),
                                                               jax.random.fold_in(rng, t)))
        params = apply_update(params, grad_sum, t)
    final_losses = -scale * np.asarray(params["w"], np.float64)
    return initial_losses - final_losses  # loss reduction of each canary


def claimed_epsilon(config: AuditConfig, noise_multiplier: float) -> float:
    """The accountant's epsilon for the run (inf for a non-private run)."""
    from dpft.privacy import accounting

    if config.clipping_mode == "none" or noise_multiplier == 0:
        return math.inf
    return accounting.compute_epsilon(config.sampling_rate, noise_multiplier, config.steps, config.delta,
                                      config.accountant)


def resolve_noise_multiplier(config: AuditConfig) -> float:
    """Explicit sigma, else calibrated to config.epsilon for (q, steps, delta)."""
    from dpft.privacy import accounting

    if config.noise_multiplier is not None:
        return float(config.noise_multiplier)
    return accounting.calibrate_noise_multiplier(config.epsilon, config.sampling_rate, config.steps,
                                                 config.delta, config.accountant)


def run_audit(config: AuditConfig | Mapping[str, Any]) -> AuditResult:
    """One training run with m canaries -> empirical epsilon lower bound vs the claim."""
    if not isinstance(config, AuditConfig):
        config = AuditConfig(**dict(config))
    config.validate()
    sigma = resolve_noise_multiplier(config)
    included = canary_inclusion(config.num_canaries, config.seed)
    scores = train_canaries(config, sigma, included)
    claimed = claimed_epsilon(config, sigma)
    best = best_guess_bound(scores, included, delta=config.delta, confidence=config.confidence,
                            pairs=guess_counts(config.num_canaries, config.guess_fractions))
    return AuditResult(
        epsilon_lower_bound=best.epsilon_lower_bound, epsilon_claimed=claimed,
        num_canaries=config.num_canaries, num_guesses=best.num_guesses, correct=best.correct,
        passed=bool(best.epsilon_lower_bound <= claimed), noise_multiplier=sigma, delta=config.delta,
        confidence=config.confidence, k_pos=best.k_pos, k_neg=best.k_neg, num_included=int(included.sum()))
