"""dpft.config.build: run options in data.options, imbalance subsampling, eval crop."""
import numpy as np
import pytest

from dpft.config import build
from dpft.config.base import base_config
from dpft.errors import UsageError


def _digits_config(*, imbalance=None, **fields):
    """A digits config: `fields` go to config.data (typed run options) or, if not a data field,
    to config.data.options (loader options); `imbalance` updates config.data.imbalance."""
    c = base_config(locked=False)
    c.data.name = "digits"
    for k, v in fields.items():
        if k in c.data and k != "options":
            c.data[k] = v
        else:
            c.data.options[k] = v
    c.data.imbalance.update(imbalance or {})
    return c


def test_run_options_are_not_passed_to_the_loader():
    c = _digits_config(train_split="public", crop="none", minority_fraction=0.1)
    # (minority_seed: the digits' run-seed option, -1 resolved to the run's seed: DatasetSpec.run_seed_options)
    assert build.loader_options(c) == {"minority_fraction": 0.1, "minority_seed": int(c.seed)}
    assert build.train_split_name(c) == "public" and build.augment_config(c).crop == "none"


@pytest.mark.parametrize("fraction", [0.01, 0.1])
def test_imbalance_options_subsample_the_training_split(fraction):
    c = _digits_config(minority_fraction=0.2, imbalance=dict(attribute="group", group="minority",
                                                             fraction=fraction, seed=3))
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
    with pytest.raises(UsageError, match=r"config.data.imbalance.fraction=0.1 needs config.data.imbalance.attribute"):
        build.load_tables(_digits_config(imbalance=dict(fraction=0.1, group="minority")))


def test_eval_crop_follows_the_training_crop():
    c = _digits_config(crop="pad_crop")
    assert build.augment_config(c).eval_crop_fraction == 1.0
    c = _digits_config(crop="random_resized")
    assert build.augment_config(c).eval_crop_fraction == 0.875
    c = _digits_config(crop="random_resized", eval_crop_fraction=0.9)
    assert build.augment_config(c).eval_crop_fraction == 0.9


def test_configs_written_before_the_typed_run_options_are_upgraded():
    import json

    from dpft.config.base import config_from_json, config_to_json, load_config

    new = load_config("configs/digits_demo.py")  # as `dpft train` saves it: loader options included
    old = json.loads(config_to_json(new))
    for key in ("train_split", "crop", "eval_crop_fraction", "worker_processes", "attributes", "imbalance"):
        del old["data"][key]
    old["data"]["options"].update({"train_split": "public", "crop": None, "imbalance_fraction": 0.25,
                                   "imbalance_attribute": "group", "imbalance_group": "minority",
                                   "attributes": ["group"], "minority_fraction": 0.1})
    up = config_from_json(json.dumps(old))
    assert up.data.train_split == "public" and up.data.crop == "auto"  # None: the default
    assert (up.data.imbalance.fraction, up.data.imbalance.attribute, up.data.imbalance.group,
            up.data.imbalance.seed) == (0.25, "group", "minority", -1)
    assert up.data.attributes == ("group",) and up.data.options.to_dict() == new.data.options.to_dict()
    assert set(up.data.keys()) == set(new.data.keys())
    # Today's configs pass through unchanged.
    assert config_to_json(config_from_json(config_to_json(new))) == config_to_json(new)
