"""dpft.train.setup: run options in data.options, imbalance subsampling, the privacy plan."""
import numpy as np
import pytest

from dpft.errors import UsageError
from dpft.privacy import accounting, keys
from dpft.train import setup
from dpft.train.config_base import base_config


PARAMS = {"w": np.zeros(3, np.float32)}
SECRET = keys.RunSecret.insecure_fixed(0)


def _digits_config(**options):
    c = base_config(locked=False)
    c.data.name = "digits"
    c.data.options.update(options)
    return c


def test_run_options_are_not_passed_to_the_loader():
    c = _digits_config(train_split="public", crop="none", minority_fraction=0.1)
    loader, run = setup.data_options(c)
    assert loader == {"minority_fraction": 0.1}
    assert run == {"train_split": "public", "crop": "none"}
    assert setup.train_split_name(c) == "public"


@pytest.mark.parametrize("fraction", [0.01, 0.1])
def test_imbalance_options_subsample_the_training_split(fraction):
    c = _digits_config(minority_fraction=0.2, imbalance_attribute="group", imbalance_group="minority",
                       imbalance_fraction=fraction, imbalance_seed=3)
    tables = setup.load_tables(c)
    groups = tables["train"].column("attr:group")
    share = float(np.mean(groups == "minority"))
    n_other = int(np.sum(groups != "minority"))
    # Rounding to whole examples: within one example of the asked share.
    assert abs(share * len(groups) - fraction * n_other / (1 - fraction)) <= 1.0
    # The evaluation splits are untouched.
    full = setup.load_tables(_digits_config(minority_fraction=0.2))
    assert len(tables["test"]) == len(full["test"])


def test_imbalance_needs_attribute_and_group():
    with pytest.raises(UsageError, match="imbalance_attribute"):
        setup.load_tables(_digits_config(imbalance_fraction=0.1, imbalance_group="minority"))


def test_eval_crop_follows_the_training_crop():
    c = _digits_config(crop="pad_crop")
    assert setup.augment_config(c).eval_crop_fraction == 1.0
    c = _digits_config(crop="random_resized")
    assert setup.augment_config(c).eval_crop_fraction == 0.875
    c = _digits_config(crop="random_resized", eval_crop_fraction=0.9)
    assert setup.augment_config(c).eval_crop_fraction == 0.9


def test_privacy_plan_calibrates_sigma_to_the_target():
    c = base_config(locked=False)
    c.privacy.epsilon, c.train.batch_size, c.train.num_updates = 2.0, 100, 50
    plan = setup.privacy_plan(c, 1000, PARAMS, SECRET)
    assert plan.sampling_rate == pytest.approx(0.1) and plan.delta == pytest.approx(1e-3)
    eps = accounting.compute_epsilon(0.1, plan.noise_multiplier, 50, 1e-3)
    assert eps <= 2.0 and eps == pytest.approx(2.0, rel=0.02)
    assert plan.epsilon_after(50) == pytest.approx(eps)


def test_privacy_plan_with_fixed_sigma_stops_within_budget():
    c = base_config(locked=False)
    c.privacy.epsilon, c.privacy.noise_multiplier = 1.0, 1.0
    c.train.batch_size, c.train.num_updates = 100, 10_000
    plan = setup.privacy_plan(c, 1000, PARAMS, SECRET)
    assert plan.num_updates < 10_000
    assert accounting.compute_epsilon(0.1, 1.0, plan.num_updates, 1e-3) <= 1.0
    assert accounting.compute_epsilon(0.1, 1.0, plan.num_updates + 1, 1e-3) > 1.0


def test_non_private_plan_has_no_noise_and_refuses_a_batch_above_n():
    c = base_config(locked=False)
    c.privacy.enabled = False
    plan = setup.privacy_plan(c, 1000, PARAMS, SECRET)
    assert plan.noise_multiplier == 0.0 and not plan.enabled
    c.train.batch_size = 2000
    with pytest.raises(UsageError, match="batch_size=2000"):
        setup.privacy_plan(c, 1000, PARAMS, SECRET)
