"""dpft.config.run_plan: the privacy plan of a run config."""
import numpy as np
import pytest

from dpft.config.base import base_config
from dpft.errors import UsageError
from dpft.privacy import accounting, keys
from dpft.config import run_plan

PARAMS = {"w": np.zeros(3, np.float32)}
SECRET = keys.RunSecret.insecure_fixed(0)


def test_privacy_plan_calibrates_sigma_to_the_target():
    c = base_config(locked=False)
    c.privacy.epsilon, c.train.batch_size, c.train.num_updates = 2.0, 100, 50
    plan = run_plan.privacy_plan(c, 1000, PARAMS, SECRET)
    assert plan.sampling_rate == pytest.approx(0.1) and plan.delta == pytest.approx(1e-3)
    eps = accounting.compute_epsilon(0.1, plan.noise_multiplier, 50, 1e-3)
    assert eps <= 2.0 and eps == pytest.approx(2.0, rel=0.02)
    assert plan.epsilon_after(50) == pytest.approx(eps)


def test_privacy_plan_with_fixed_sigma_stops_within_budget():
    c = base_config(locked=False)
    c.privacy.epsilon, c.privacy.noise_multiplier = 1.0, 1.0
    c.train.batch_size, c.train.num_updates = 100, 10_000
    plan = run_plan.privacy_plan(c, 1000, PARAMS, SECRET)
    assert plan.num_updates < 10_000
    assert accounting.compute_epsilon(0.1, 1.0, plan.num_updates, 1e-3) <= 1.0
    assert accounting.compute_epsilon(0.1, 1.0, plan.num_updates + 1, 1e-3) > 1.0


def test_non_private_plan_has_no_noise_and_refuses_a_batch_above_n():
    c = base_config(locked=False)
    c.privacy.enabled = False
    plan = run_plan.privacy_plan(c, 1000, PARAMS, SECRET)
    assert plan.noise_multiplier == 0.0 and not plan.enabled
    c.train.batch_size = 2000
    with pytest.raises(UsageError, match="batch_size=2000"):
        run_plan.privacy_plan(c, 1000, PARAMS, SECRET)
