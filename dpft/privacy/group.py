"""Group privacy of a patient in an example-level DP-SGD run: what (epsilon, delta) per IMAGE means
for a patient who has several images.

DP-SGD at the example level samples each image on its own (Poisson, rate q), so in one update a
patient with k images contributes J of them, J ~ Binomial(k, q), and the clipped sum moves by at
most J * S (S the sensitivity of one example; the noise is N(0, (sigma S)^2)). Relative to S this
is the mixture-of-Gaussians mechanism: output N(0, sigma^2) without the patient and
sum_j P(J = j) N(j, sigma^2) with them (Binomial weights, j = 0..k). dp-accounting's PLD accountant
composes that event exactly (`MixtureOfGaussiansDpEvent`, add-or-remove neighbours), which is much
tighter than the group-privacy bound k * epsilon. For k = 1 it is the run's own epsilon (the same
Poisson-subsampled Gaussian).

The mixture's PLD is discretised at `GROUP_DISCRETIZATION` = 1e-2, ten times coarser than the run's
(`accounting.PLD_DISCRETIZATION`): dp-accounting builds a mixture PLD point by point in Python, and
a pessimistic PLD is never below the exact epsilon at any interval. Measured against 1e-3
(q, sigma, T, k): (0.29, 0.49, 6, 2) 21.1797 vs 21.1796, 0.8 s vs 5.8 s; (0.023, 3, 2000, 10)
22.848 vs 22.810 (+0.17%), 0.12 s vs 1.0 s; (0.023, 3, 2000, 40) 169.57 vs 169.55, 0.38 s vs 3.0 s;
(0.01, 1, 5000, 5) 33.49 vs 33.41 (+0.24%), 0.38 s vs 2.9 s; at small epsilons the excess is
absolute, up to +0.021 (0.933 vs 0.913 for q = 0.01, sigma = 1, 200 updates, delta = 1e-5, k = 1).

dp-accounting's RDP accountant has no mixture event: the patient's epsilon is always PLD, also for
runs accounted with RDP (stated in the plan). Pure functions; scipy gives the Binomial weights.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Iterable, Sequence

import dp_accounting
from dp_accounting import dp_event
import numpy as np
from scipy import stats

from dpft.privacy import accounting

#: The accountant of a patient's epsilon (the only one of dp-accounting that composes mixtures).
GROUP_ACCOUNTANT = "pld"
#: Its PLD value discretisation (module docstring: pessimistic, at most +0.08 above 1e-3, 7x faster).
GROUP_DISCRETIZATION = 1e-2


@dataclasses.dataclass(frozen=True)
class PatientCounts:
    """How the private training examples group into patients.

    num_patients: distinct patient ids. max_images: images of the patient with the most (k).
    histogram: {images per patient: number of patients}.
    """

    num_patients: int
    max_images: int
    histogram: dict[int, int]

    @classmethod
    def from_ids(cls, patient_ids: Iterable[str]) -> "PatientCounts":
        """From the `patient_id` of every training example (one entry per example)."""
        per_patient = collections.Counter(str(p) for p in patient_ids)
        if not per_patient:
            raise ValueError("no patient ids: the training split is empty")
        hist = collections.Counter(per_patient.values())
        return cls(num_patients=len(per_patient), max_images=max(per_patient.values()),
                   histogram=dict(sorted(hist.items())))


def binomial_weights(group_size: int, sampling_rate: float) -> tuple[list[float], list[float]]:
    """(shifts j = 0..k, P(J = j)) for J ~ Binomial(k, q), in units of one example's sensitivity."""
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate!r}")
    j = np.arange(int(group_size) + 1)
    probs = stats.binom.pmf(j, int(group_size), float(sampling_rate))
    return [float(x) for x in j], [float(p) for p in probs / probs.sum()]


def group_event(sampling_rate: float, noise_multiplier: float, steps: int, group_size: int) -> dp_accounting.DpEvent:
    """`steps` updates as seen by a group of `group_size` examples, each Poisson-sampled at `sampling_rate`."""
    shifts, probs = binomial_weights(group_size, sampling_rate)
    return dp_accounting.SelfComposedDpEvent(
        dp_event.MixtureOfGaussiansDpEvent(float(noise_multiplier), shifts, probs), int(steps))


def group_epsilon(history: Sequence[tuple[float, float, int]], group_size: int, delta: float,
                  discretization: float = GROUP_DISCRETIZATION) -> float:
    """Epsilon at `delta` of a group of `group_size` examples over `history`, a list of
    (sampling_rate, noise_multiplier, steps) pieces run in order (a ledger's entries, or a plan's one);
    dp-accounting's PLD accountant at `discretization`."""
    if not history:
        return 0.0
    events = [group_event(q, sigma, steps, group_size) for q, sigma, steps in history if steps > 0]
    return accounting.epsilon_of_event(dp_accounting.ComposedDpEvent(events), delta, GROUP_ACCOUNTANT,
                                       pld_discretization=discretization)


def noise_for_group_epsilon(target_epsilon: float, sampling_rate: float, steps: int, delta: float, group_size: int,
                            *, tolerance: float = 1e-3, discretization: float = GROUP_DISCRETIZATION) -> float:
    """The smallest sigma (to relative `tolerance`, rounded up) at which a group of `group_size` examples has
    epsilon <= `target_epsilon` after `steps` updates at `sampling_rate` (`group_epsilon`, bisection; epsilon
    falls as sigma grows). An example-level run with this sigma protects its patients with up to
    `group_size` images as a patient-level run at `target_epsilon` does (the demo's unit comparison)."""
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon!r}")

    def eps(sigma: float) -> float:
        return group_epsilon([(sampling_rate, sigma, steps)], group_size, delta, discretization)

    lo, hi = 0.1, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ValueError(f"no sigma <= 1e4 gives epsilon {target_epsilon} to a group of {group_size}")
    while (hi - lo) > tolerance * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if eps(mid) <= target_epsilon else (mid, hi)
    return hi


def patient_report(counts: PatientCounts, sampling_rate: float, noise_multiplier: float, steps: int,
                   delta: float, run_epsilon: float) -> dict:
    """The plan's "patients" entry: counts, and the epsilon of the patient with the most images
    after `steps` updates (`run_epsilon` when every patient has one image: the same event)."""
    k = counts.max_images
    eps = float(run_epsilon) if k == 1 else group_epsilon([(sampling_rate, noise_multiplier, steps)], k, delta)
    return {"count": counts.num_patients, "max_images": k,
            "images_per_patient": {str(n): m for n, m in counts.histogram.items()},
            "epsilon_of_the_patient_with_the_most_images": eps, "accountant": GROUP_ACCOUNTANT,
            "discretization": GROUP_DISCRETIZATION if k > 1 else accounting.PLD_DISCRETIZATION}


__all__ = ["GROUP_ACCOUNTANT", "GROUP_DISCRETIZATION", "PatientCounts", "binomial_weights", "group_event",
           "group_epsilon", "noise_for_group_epsilon", "patient_report"]
