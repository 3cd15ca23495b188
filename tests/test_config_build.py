"""dpft.config.build: run options in data.options, imbalance subsampling, eval crop."""
import numpy as np
import pytest

from dpft.config import build
from dpft.config.base import base_config
from dpft.errors import UsageError


def _digits_config(**options):
    c = base_config(locked=False)
    c.data.name = "digits"
    c.data.options.update(options)
    return c


def test_run_options_are_not_passed_to_the_loader():
    c = _digits_config(train_split="public", crop="none", minority_fraction=0.1)
    loader, run = build.data_options(c)
    assert loader == {"minority_fraction": 0.1}
    assert run == {"train_split": "public", "crop": "none"}
    assert build.train_split_name(c) == "public"


@pytest.mark.parametrize("fraction", [0.01, 0.1])
def test_imbalance_options_subsample_the_training_split(fraction):
    c = _digits_config(minority_fraction=0.2, imbalance_attribute="group", imbalance_group="minority",
                       imbalance_fraction=fraction, imbalance_seed=3)
    tables = build.load_tables(c)
    groups = tables["train"].column("attr:group")
    share = float(np.mean(groups == "minority"))
    n_other = int(np.sum(groups != "minority"))
    # Rounding to whole examples: within one example of the asked share.
    assert abs(share * len(groups) - fraction * n_other / (1 - fraction)) <= 1.0
    # The evaluation splits are untouched.
    full = build.load_tables(_digits_config(minority_fraction=0.2))
    assert len(tables["test"]) == len(full["test"])


def test_imbalance_needs_attribute_and_group():
    with pytest.raises(UsageError, match="imbalance_attribute"):
        build.load_tables(_digits_config(imbalance_fraction=0.1, imbalance_group="minority"))


def test_eval_crop_follows_the_training_crop():
    c = _digits_config(crop="pad_crop")
    assert build.augment_config(c).eval_crop_fraction == 1.0
    c = _digits_config(crop="random_resized")
    assert build.augment_config(c).eval_crop_fraction == 0.875
    c = _digits_config(crop="random_resized", eval_crop_fraction=0.9)
    assert build.augment_config(c).eval_crop_fraction == 0.9
