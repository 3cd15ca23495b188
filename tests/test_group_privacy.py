"""The epsilon of a patient with k images in an example-level run (dpft.privacy.group), checked
against independent computations: the run's own accountant for k = 1 (a different dp-accounting
path: the Poisson-subsampled Gaussian), a brute-force hockey-stick divergence of the one-update
mixture by numerical integration, and the classical group-privacy bound for many updates."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, stats

from dpft.privacy import accounting, group


@pytest.mark.parametrize("q, sigma, steps", [(0.01, 1.0, 200), (0.1, 2.0, 30), (0.5, 5.0, 4)])
def test_one_image_per_patient_is_the_runs_epsilon(q, sigma, steps):
    run = accounting.compute_epsilon(q, sigma, steps, 1e-5)
    same = group.group_epsilon([(q, sigma, steps)], 1, 1e-5, discretization=accounting.PLD_DISCRETIZATION)
    assert same == pytest.approx(run, rel=1e-6)
    # the report's coarser discretisation: pessimistic (never below) and close (measured: +0.0006..+0.021)
    coarse = group.group_epsilon([(q, sigma, steps)], 1, 1e-5)
    assert run * (1 - 1e-6) <= coarse <= run + 0.05, (coarse, run)


def _brute_force_epsilon(q: float, sigma: float, k: int, delta: float) -> float:
    """Smallest epsilon whose hockey-stick divergence, in both directions, between N(0, sigma^2) and
    sum_j Binom(j; k, q) N(j, sigma^2) is <= delta (one update; numerical integration on a fine grid)."""
    j = np.arange(k + 1)
    w = stats.binom.pmf(j, k, q)
    x, dx = np.linspace(-14 * sigma, k + 14 * sigma, 2_000_001, retstep=True)
    base = stats.norm.pdf(x, scale=sigma)
    mix = sum(wj * stats.norm.pdf(x, loc=jj, scale=sigma) for jj, wj in zip(j, w))

    def divergence(eps):
        add = np.sum(np.maximum(mix - math.exp(eps) * base, 0.0)) * dx
        remove = np.sum(np.maximum(base - math.exp(eps) * mix, 0.0)) * dx
        return max(add, remove)

    return optimize.brentq(lambda e: divergence(e) - delta, 1e-6, 60.0, xtol=1e-7)


@pytest.mark.parametrize("q, sigma, k", [(0.3, 1.0, 2), (0.2, 1.5, 4), (0.6, 2.0, 3)])
def test_one_update_equals_brute_force_hockey_stick(q, sigma, k):
    want = _brute_force_epsilon(q, sigma, k, 1e-3)
    got = group.group_epsilon([(q, sigma, 1)], k, 1e-3)
    # PLD is pessimistic (never below) and its discretisation (1e-3) costs a little
    assert want - 1e-4 <= got <= want + 0.01, (got, want)


def test_many_updates_between_one_image_and_the_group_privacy_bound():
    q, sigma, steps, delta = 0.02, 1.2, 100, 1e-5
    example = accounting.compute_epsilon(q, sigma, steps, delta)
    previous = example
    for k in (2, 3, 5):
        got = group.group_epsilon([(q, sigma, steps)], k, delta)
        assert got > previous  # more images, less privacy
        previous = got
        # classical group privacy: (eps1, delta1) per image -> (k eps1, k e^{(k-1) eps1} delta1) per group;
        # with delta1 small enough that the group's delta is <= delta, k * eps1 bounds the group's epsilon
        delta1 = delta / (k * math.exp((k - 1) * 3.0))
        eps1 = accounting.compute_epsilon(q, sigma, steps, delta1)
        assert eps1 <= 3.0 and got <= k * eps1


def test_a_history_of_pieces_composes_in_order():
    one = group.group_epsilon([(0.05, 1.0, 6)], 3, 1e-5)
    two = group.group_epsilon([(0.05, 1.0, 2), (0.05, 1.0, 4)], 3, 1e-5)
    assert two == pytest.approx(one, rel=1e-3)
    assert group.group_epsilon([], 3, 1e-5) == 0.0


def test_patient_counts_and_bad_arguments():
    counts = group.PatientCounts.from_ids(["a", "b", "a", "c", "a", "b"])
    assert (counts.num_patients, counts.max_images, counts.histogram) == (3, 3, {1: 1, 2: 1, 3: 1})
    with pytest.raises(ValueError, match="empty"):
        group.PatientCounts.from_ids([])
    with pytest.raises(ValueError, match="group_size"):
        group.binomial_weights(0, 0.1)
    with pytest.raises(ValueError, match="sampling_rate"):
        group.binomial_weights(2, 0.0)
    shifts, probs = group.binomial_weights(3, 0.25)
    assert shifts == [0.0, 1.0, 2.0, 3.0] and sum(probs) == pytest.approx(1.0)
    assert probs[3] == pytest.approx(0.25 ** 3)


@pytest.mark.slow  # quick tier: see docs/running.md
def test_the_plan_of_a_chexpert_run_states_the_patient_with_the_most_images(tmp_path):
    """Through the run's set-up on a fake CheXpert in the real on-disk format: the plan counts the
    patients (parsed here from the image paths, not the loader's patient_id), states the epsilon of the one with the most
    images, and the run's announcement warns with it."""
    import collections
    import re

    from dpft.config import build
    from dpft.config.base import base_config
    from dpft.data import fake
    from dpft.config import run_plan
    from dpft.train import run_log
    from dpft.privacy import keys

    root = fake.write_fake_chexpert(str(tmp_path / "chexpert"), n_patients=30, n_valid_patients=6, image_size=16)
    c = base_config(locked=False)
    c.data.name, c.data.root = "chexpert", root
    c.privacy.epsilon, c.privacy.delta = 4.0, 1e-4
    c.train.batch_size, c.train.num_updates = 8, 20
    tables = build.load_tables(c)
    table = tables["train"]
    plan = run_plan.privacy_plan(c, len(table), {"w": np.zeros(3, np.float32)}, keys.RunSecret.insecure_fixed(1),
                                      patient_ids=build.patient_ids(c, table))
    per_patient = collections.Counter(re.search(r"patient\d+", str(r["image"])).group() for r in table.records())
    d = plan.to_dict()
    assert d["unit"] == "example" and d["num_units"] == len(table) == sum(per_patient.values())
    pt = d["patients"]
    assert pt["count"] == len(per_patient) and pt["max_images"] == max(per_patient.values()) > 1
    want = group.group_epsilon([(plan.sampling_rate, plan.noise_multiplier, plan.num_updates)], pt["max_images"],
                               plan.delta)
    assert pt["epsilon_of_the_patient_with_the_most_images"] == pytest.approx(want, rel=1e-9)
    assert pt["discretization"] == group.GROUP_DISCRETIZATION == 1e-2  # the plan says how it was computed
    # pessimistic: never below the same epsilon at the run's finer discretisation
    fine = group.group_epsilon([(plan.sampling_rate, plan.noise_multiplier, plan.num_updates)], pt["max_images"],
                               plan.delta, discretization=1e-3)
    assert fine * (1 - 1e-9) <= want <= fine + 0.1
    assert want > plan.epsilon_after(plan.num_updates)
    lines = run_log.announcement(plan, c)
    assert any(l.startswith("WARNING: privacy unit: one example") and f"{want:.4g}" in l for l in lines), lines
    # digits: one image per unit, nothing read, no warning
    c.data.name, c.data.root = "digits", ""
    assert build.patient_ids(c, build.load_tables(c)["train"]) is None
