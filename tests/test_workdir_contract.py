"""The workdir contract (`dpft.workdir.contract`): the one place training and evaluation read the
names, the parameter choice and the epsilon of a run from."""
import math
import os

import pytest

from dpft.config import base as cb
from dpft.errors import UsageError
from dpft.privacy import accounting
from dpft.workdir import contract


def _config(*, ema_decay: float, polyak: bool, params: str = "ema"):
    c = cb.base_config(locked=False)
    c.train.ema_decay, c.train.polyak, c.eval.params = ema_decay, polyak, params
    return c


@pytest.mark.parametrize("ema_decay, polyak, requested, expected", [
    (0.999, False, None, ("ema", "ema")),  # the run's eval.params
    (0.0, False, None, ("params", "raw")),  # no EMA kept: the raw params
    (0.999, True, "polyak", ("polyak", "polyak")),
    (0.999, False, "polyak", ("params", "raw")),  # not kept: raw (dpft evaluate refuses this earlier)
    (0.999, True, "raw", ("params", "raw")),
])
def test_eval_params_picks_a_kept_average_else_the_raw_params(ema_decay, polyak, requested, expected):
    config = _config(ema_decay=ema_decay, polyak=polyak)
    assert contract.eval_params(config, requested) == expected
    assert set(contract.averages_kept(config)) == {n for n, kept in (("ema", ema_decay > 0), ("polyak", polyak)) if kept}


def test_epsilon_comes_from_the_ledger_at_the_plans_delta_and_accountant():
    ledger = accounting.Ledger()
    private = {"enabled": True, "delta": 1e-5, "accountant": "rdp"}
    assert contract.epsilon_spent(ledger, private) == 0.0  # before the first update
    assert contract.epsilon_spent(ledger, {"enabled": False}) == math.inf
    assert contract.predictions_privacy(ledger, {"enabled": False}) == (None, None, None)
    for _ in range(3):
        ledger.record(0.01, 1.0)
    eps = accounting.compute_epsilon(0.01, 1.0, 3, 1e-5, "rdp")
    assert contract.epsilon_spent(ledger, private) == pytest.approx(eps, rel=1e-9)
    assert contract.predictions_privacy(ledger, private) == (pytest.approx(eps, rel=1e-9), 1e-5, True)
    insecure = dict(private, guarantee_valid=False)  # public noise: epsilon is nominal
    assert contract.predictions_privacy(ledger, insecure) == (pytest.approx(eps, rel=1e-9), 1e-5, False)


def test_paths_splits_and_items():
    c = _config(ema_decay=0.0, polyak=False)
    c.eval.splits = ("test",)
    assert contract.prediction_splits(c) == ["test", "validation"]
    c.eval.splits = ("validation", "test")
    assert contract.prediction_splits(c) == ["validation", "test"]
    assert contract.predictions_path("/w", 6, "test") == os.path.join("/w", "predictions", "6", "test.npz")
    assert contract.predictions_path("gs://b/w", 6, "test") == "gs://b/w/predictions/6/test.npz"
    assert contract.eval_dir("/w", 6) == os.path.join("/w", "eval", "6")
    assert not {contract.OPT_STATE, contract.SECRET} & set(contract.EVAL_ITEMS)  # evaluation never reads them
    assert set(contract.PARAMS_ITEMS.values()) <= set(contract.EVAL_ITEMS)


def test_read_config_names_a_workdir_without_one(tmp_path):
    with pytest.raises(UsageError, match="no config.json"):
        contract.read_config(str(tmp_path))
    c = cb.load_config("configs/digits_demo.py")  # as `dpft train` writes it
    (tmp_path / contract.CONFIG_FILE).write_text(cb.config_to_json(c))
    assert contract.read_config(str(tmp_path)).to_dict() == c.to_dict()
