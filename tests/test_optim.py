"""dpft.config.optim: learning-rate schedules and optimizers against their formulas."""
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpft.config import base as cb
from dpft.config import optim


def _train_cfg(**kw):
    """config.train with `--config.train.<k>=<v>` overrides (the command-line path)."""
    return cb.apply_overrides(cb.base_config(), [f"--config.train.{k}={v}" for k, v in kw.items()]).train


def test_schedules_match_formulas():
    t = _train_cfg(**{"num_updates": 100, "optimizer.learning_rate": 2.0})
    s = optim.make_schedule(t)
    assert [float(s(i)) for i in (0, 50, 99)] == [2.0, 2.0, 2.0]
    t = _train_cfg(**{"num_updates": 100, "optimizer.learning_rate": 2.0, "lr_schedule.name": "cosine"})
    s = optim.make_schedule(t)
    for i in (0, 25, 50, 100):
        assert float(s(i)) == pytest.approx(2.0 * 0.5 * (1 + np.cos(np.pi * i / 100)), abs=1e-6)
    t = _train_cfg(**{"num_updates": 100, "optimizer.learning_rate": 2.0, "lr_schedule.name": "warmup_cosine",
                      "lr_schedule.warmup_steps": 10})
    s = optim.make_schedule(t)
    assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(1.0) and float(s(10)) == pytest.approx(2.0)
    assert float(s(55)) == pytest.approx(2.0 * 0.5 * (1 + np.cos(np.pi * 45 / 90)), abs=1e-6)
    assert float(s(100)) == pytest.approx(0.0, abs=1e-6)
    t = _train_cfg(**{"num_updates": 100, "optimizer.learning_rate": 2.0, "lr_schedule.warmup_steps": 4})
    s = optim.make_schedule(t)
    assert float(s(2)) == pytest.approx(1.0) and float(s(50)) == pytest.approx(2.0)


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam", "adamw"])
def test_optimizers_first_steps_match_hand_computation(name):
    t = _train_cfg(**{"optimizer.name": name, "optimizer.learning_rate": 0.1, "optimizer.momentum": 0.9,
                      "optimizer.weight_decay": 0.01})
    opt = optim.make_optimizer(t)
    p = {"w": jnp.asarray([1.0, -2.0])}
    g = {"w": jnp.asarray([0.5, 0.25])}
    state = opt.init(p)
    upd, state = opt.update(g, state, p)
    p1 = optax.apply_updates(p, upd)
    w, gw = np.array([1.0, -2.0]), np.array([0.5, 0.25])
    if name in ("sgd", "momentum"):
        want = w - 0.1 * (gw + 0.01 * w)  # first momentum step equals plain SGD
    elif name == "adam":
        want = w - 0.1 * np.sign(gw + 0.01 * w)  # bias-corrected first Adam step ~ sign
    else:
        want = w - 0.1 * (np.sign(gw) + 0.01 * w)  # decoupled weight decay
    np.testing.assert_allclose(np.asarray(p1["w"]), want, rtol=1e-5)
    if name == "momentum":  # second step uses the momentum buffer
        upd2, _ = opt.update(g, state, p1)
        d1 = gw + 0.01 * w
        d2 = gw + 0.01 * np.asarray(p1["w"])
        np.testing.assert_allclose(np.asarray(upd2["w"]), -0.1 * (0.9 * d1 + d2), rtol=1e-5)
