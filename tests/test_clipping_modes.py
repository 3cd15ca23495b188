"""Clipping modes are records (dpft.privacy.clipping): adding one is one record plus one registry
line -- proved with a toy "scaled_flat" mode (flat clipping times 1/2) that flows through the vmap
engine (against brute-force numpy clipping), the book-keeping engine (only when its record lists
it), the plan (sensitivity, contribution norm of individual accounting, engine choice) and the run
config (choices, hyper-parameters, engine support). An unknown mode is refused everywhere, naming
the value and the choices; `--config.privacy.gamma` reaches the engine."""
from __future__ import annotations

import dataclasses
import functools
import json
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dpft.config import base as cb
from dpft.config.validation import validate
from dpft.errors import UsageError
from dpft.privacy import adapters, bookkeeping, clipping, engine, keys, sensitivity
from dpft.privacy import plan as plan_lib
from dpft.privacy.engine import ClippingConfig
from dpft.config import run_plan
from dpft.train import canary_audit

TOY_MODE = '''
"""A toy clipping mode: flat clipping scaled by one half, g * min(1, C / ||g||) / 2."""
import dataclasses

import jax.numpy as jnp
import numpy as np

from dpft.privacy.clipping import ClippingMode


def _factor(norm, bound, hyper):
    return 0.5 * bound / jnp.maximum(norm, bound)


SCALED_FLAT = ClippingMode(
    private=True, factor=_factor, sensitivity=lambda hyper, params: 0.5 * float(hyper.clip_norm),
    contribution=lambda norms, hyper, sens: 0.5 * np.minimum(norms, hyper.clip_norm),
    hyper=("clip_norm",), engines=("vmap",), audit=False)
# The same mode, declaring that the book-keeping engine implements it (one factor per example).
SCALED_FLAT_BK = dataclasses.replace(SCALED_FLAT, engines=("vmap", "bookkeeping"))
'''

B, D, NUM_CLASSES = 8, 6, 3
MASK = np.array([1, 1, 0, 1, 1, 1, 0, 1], np.float32)
SECRET = keys.RunSecret.insecure_fixed(0)
BUILTIN = "flat, per_layer, automatic, none"


@pytest.fixture
def toy_mode(tmp_path, monkeypatch):
    """Writes the toy mode's file on sys.path and adds ONE registry line per toy mode."""
    (tmp_path / "toy_clipping.py").write_text(textwrap.dedent(TOY_MODE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(clipping.MODES.entries, "scaled_flat", "toy_clipping:SCALED_FLAT")
    monkeypatch.setitem(clipping.MODES.entries, "scaled_flat_bk", "toy_clipping:SCALED_FLAT_BK")
    yield
    sys.modules.pop("toy_clipping", None)


class TinyMLP(nnx.Module):
    """x [K, D] -> logits [K, NUM_CLASSES] through standard nnx.Linear layers (book-keeping taps them)."""

    def __init__(self):
        rngs = nnx.Rngs(0)
        self.hidden = nnx.Linear(D, 5, rngs=rngs)
        self.head = nnx.Linear(5, NUM_CLASSES, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(jnp.tanh(self.hidden(x)))


LOSS_FN, PARAMS, _ = adapters.nnx_loss_fn(TinyMLP(), adapters.softmax_cross_entropy_loss)
RS = np.random.RandomState(0)
BATCH = {"image": jnp.asarray(RS.randn(B, 1, D) * np.linspace(0.2, 3.0, B)[:, None, None], jnp.float32),
         "label": jnp.asarray(RS.randint(0, NUM_CLASSES, (B, 1)), jnp.int32),
         "mask": jnp.asarray(MASK), "example_id": jnp.arange(B, dtype=jnp.int32)}
RNG = jax.random.key(0)


def brute_force_grads() -> np.ndarray:
    """Per-example gradients float64 [B, P], one jax.grad per example (the engine's key per example)."""
    grad = jax.jit(jax.grad(lambda p, v, r: LOSS_FN(p, v, r)[0]))
    rows = []
    for i in range(B):
        g = grad(PARAMS, {"image": BATCH["image"][i], "label": BATCH["label"][i]}, jax.random.fold_in(RNG, i))
        rows.append(np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(g)]))
    return np.stack(rows)


GRADS = brute_force_grads()
NORMS = np.linalg.norm(GRADS, axis=1)
C = float(np.median(NORMS[MASK > 0]))  # some real examples are clipped, some are not


def flat(tree) -> np.ndarray:
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


@functools.lru_cache(maxsize=None)
def _compiled(fn, clipping_config: ClippingConfig):
    return jax.jit(lambda p, b: fn(LOSS_FN, p, b, RNG, clipping=clipping_config, microbatch_size=4))


def run(fn, clipping_config: ClippingConfig, batch=BATCH):
    """(clipped sum, stats) of `batch` with engine `fn` (compiled once per engine and clipping)."""
    return _compiled(fn, clipping_config)(PARAMS, batch)


def _plan(clipping_config: ClippingConfig, **kw) -> plan_lib.PrivacyPlan:
    args = dict(enabled=True, num_examples=1000, batch_size=100, num_updates=20, epsilon=4.0,
                clipping=clipping_config, params=PARAMS, secret=SECRET)
    return plan_lib.make_plan(**{**args, **kw})


# ----------------------------------------------------------------------------- the toy mode


def test_toy_mode_runs_through_the_vmap_engine_as_brute_force_numpy_clipping(toy_mode):
    assert 0 < np.sum(NORMS[MASK > 0] > C) < np.sum(MASK)
    cfg = ClippingConfig("scaled_flat", clip_norm=C)
    grad_sum, stats = run(engine.clipped_grad_sum, cfg)
    factors = 0.5 * np.minimum(1.0, C / NORMS)
    want = np.sum((MASK * factors)[:, None] * GRADS, axis=0)
    np.testing.assert_allclose(flat(grad_sum), want, rtol=2e-5, atol=1e-6)  # float32 sums of ~1: a few ulps
    np.testing.assert_allclose(np.asarray(stats["norms"]), MASK * NORMS, rtol=1e-5)
    assert engine.sensitivity(cfg, PARAMS) == pytest.approx(0.5 * C)


def test_toy_mode_in_the_plan_sensitivity_contribution_and_engine(toy_mode):
    cfg = ClippingConfig("scaled_flat", clip_norm=C)
    plan = _plan(cfg)
    assert plan.sensitivity == pytest.approx(0.5 * C) and plan.grad_method == "vmap"  # auto: vmap only
    n = np.array([0.0, 0.3, 0.7, 1.0, 3.0]) * C
    np.testing.assert_allclose(plan.contribution_norm(n), 0.5 * np.minimum(n, C))
    assert plan.contribution_norm(n)[2] < min(n[2], plan.sensitivity)  # not the generic bound min(n, S)
    # What the plan charges is what the engine adds: removing example i moves the clipped sum by c(n_i).
    real = np.flatnonzero(MASK)
    moved = sensitivity.removal_distances(lambda b: run(engine.clipped_grad_sum, cfg, b)[0], BATCH, real)
    np.testing.assert_allclose(moved, plan.contribution_norm(NORMS[real]), rtol=1e-4)
    with pytest.raises(plan_lib.PlanError, match="grad_method='bookkeeping' does not support clipping='scaled_flat'"):
        _plan(cfg, grad_method="bookkeeping")
    assert _plan(ClippingConfig("scaled_flat_bk", clip_norm=C)).grad_method == "bookkeeping"


def test_bookkeeping_refuses_the_toy_mode_unless_its_record_lists_it(toy_mode):
    with pytest.raises(ValueError, match="ClippingConfig.mode='scaled_flat' is not supported; use one of "
                                         r"\('flat', 'automatic', 'scaled_flat_bk'\)"):
        run(bookkeeping.bk_clipped_grad_sum, ClippingConfig("scaled_flat", clip_norm=C))
    cfg = ClippingConfig("scaled_flat_bk", clip_norm=C)
    bk_sum, bk_stats = run(bookkeeping.bk_clipped_grad_sum, cfg)
    want = np.sum((MASK * 0.5 * np.minimum(1.0, C / NORMS))[:, None] * GRADS, axis=0)
    np.testing.assert_allclose(flat(bk_sum), want, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(bk_stats["norms"]), MASK * NORMS, rtol=1e-5)


def test_toy_mode_is_a_run_config_choice_with_its_engines_and_hyper_parameters(toy_mode):
    c = cb.base_config()
    c.privacy.clipping = "scaled_flat"
    c.privacy.clip_norm = 2.0
    c.privacy.delta = 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about
        validate(c, num_examples=10_000)
    assert run_plan.clipping_config(c) == ClippingConfig("scaled_flat", clip_norm=2.0)
    assert run_plan.privacy_plan(c, 10_000, PARAMS, SECRET).sensitivity == pytest.approx(1.0)
    c.train.grad_method = "bookkeeping"
    with pytest.raises(UsageError, match=r"config.train.grad_method='bookkeeping' does not support "
                                         r"config.privacy.clipping='scaled_flat' \(use 'auto' or 'vmap'\)"):
        validate(c, num_examples=10_000)
    c.privacy.clipping = "scaled_flat_bk"
    validate(c, num_examples=10_000)
    c.privacy.clip_norm = 0.0
    with pytest.raises(UsageError, match=r"config.privacy.clip_norm=0.0 must be > 0 and finite "
                                         r"\(read by config.privacy.clipping='scaled_flat_bk'\)"):
        validate(c, num_examples=10_000)
    c.privacy.clip_norm, c.privacy.gamma = 1.0, 0.5
    with pytest.warns(UserWarning, match=r"config.privacy.gamma=0.5 has no effect: config.privacy.clipping="
                                         r"'scaled_flat_bk' does not read it \(read by automatic\)"):
        validate(c, num_examples=10_000)
    c.privacy.enabled = False  # the baseline: no clipping, the toy mode is not read
    assert run_plan.clipping_config(c) == engine.NO_CLIPPING


# ----------------------------------------------------------------------------- unknown modes


def test_an_unknown_mode_is_refused_everywhere_naming_the_value_and_the_choices():
    unknown = rf"unknown clipping mode 'bogus'; choose from {BUILTIN}"
    with pytest.raises(UsageError, match=unknown):
        clipping.get("bogus")
    with pytest.raises(UsageError, match=unknown):
        ClippingConfig("bogus")
    with pytest.raises(UsageError, match=unknown):
        dataclasses.replace(ClippingConfig("flat"), mode="bogus")
    with pytest.raises(UsageError, match=unknown):
        plan_lib.resolve_grad_method("auto", True, "bogus")
    c = cb.base_config()
    c.privacy.clipping = "bogus"
    with pytest.raises(UsageError, match=r"config.privacy.clipping='bogus' is not one of flat, per_layer, automatic"):
        validate(c, num_examples=10_000)
    with pytest.raises(UsageError, match=unknown):
        run_plan.clipping_config(c)
    with pytest.raises(ValueError, match=r"audit config: clipping_mode='bogus': unknown clipping mode; "
                                         r"choose from 'flat', 'none'"):
        canary_audit.AuditConfig(clipping_mode="bogus").validate()
    with pytest.raises(ValueError, match=r"clipping_mode='automatic': a clipping mode the audit does not support; "
                                         r"choose from 'flat', 'none'"):
        canary_audit.AuditConfig(clipping_mode="automatic").validate()


# ----------------------------------------------------------------------------- gamma from the run config


def test_config_privacy_gamma_reaches_the_engine_and_the_plan():
    c = cb.load_config("configs/digits_demo.py", ["--config.privacy.clipping=automatic",
                                                  "--config.privacy.gamma=0.5", f"--config.privacy.clip_norm={C}"])
    cfg = run_plan.clipping_config(c)
    assert cfg == ClippingConfig("automatic", clip_norm=C, gamma=0.5)
    grad_sum, _ = run(engine.clipped_grad_sum, cfg)
    want = np.sum((MASK * C / (NORMS + 0.5))[:, None] * GRADS, axis=0)
    np.testing.assert_allclose(flat(grad_sum), want, rtol=2e-5, atol=1e-6)
    plan = run_plan.privacy_plan(c, 1000, PARAMS, SECRET)
    np.testing.assert_allclose(plan.contribution_norm(NORMS), C * NORMS / (NORMS + 0.5))
    assert plan.to_dict()["clipping"] == {"mode": "automatic", "clip_norm": C, "gamma": 0.5}
    with pytest.raises(UsageError, match=r"config.privacy.gamma=0.0 must be > 0"):
        validate(cb.load_config("configs/digits_demo.py", ["--config.privacy.clipping=automatic",
                                                           "--config.privacy.gamma=0"]), num_examples=10_000)


def test_configs_saved_before_gamma_existed_load_with_its_default():
    new = cb.load_config("configs/digits_demo.py")  # as `dpft train` saves it
    old = json.loads(cb.config_to_json(new))
    del old["privacy"]["gamma"]
    up = cb.config_from_json(json.dumps(old))
    assert up.privacy.gamma == clipping.HYPER_PARAMS["gamma"].default == 0.01
    assert cb.config_to_json(up) == cb.config_to_json(new)
    bare = cb.base_config(locked=False)  # a config object that lacks the field
    del bare.privacy["gamma"]
    bare.privacy.clipping, bare.privacy.delta = "automatic", 1e-5
    with pytest.raises(UsageError, match="config.privacy.gamma is missing"):  # consumers read fields: upgrade first
        validate(bare, num_examples=10_000)
    validate(cb.upgrade(bare), num_examples=10_000)
    assert run_plan.clipping_config(cb.upgrade(bare)).gamma == 0.01
    del bare.privacy["clip_norm"]  # a field every config has had: missing is an error, not a default
    with pytest.raises(UsageError, match="config.privacy.clip_norm is missing"):
        validate(cb.upgrade(bare), num_examples=10_000)


# ----------------------------------------------------------------------------- every record


@pytest.mark.parametrize("name", clipping.names())
def test_each_registered_record_is_consistent(name):
    """Contribution <= sensitivity; for one factor per example, the contribution IS n * factor(n)."""
    record = clipping.get(name)
    cfg = ClippingConfig(name, clip_norm=0.7, gamma=0.05)
    s = engine.sensitivity(cfg, PARAMS)
    n = np.array([0.0, 1e-3, 0.1, 0.7, 0.71, 5.0, 1e4])
    if not record.private:
        assert s == 0.0 and record.contribution is None and record.factor is None
        return
    c = record.contribution(n, cfg, s)
    assert np.all(c >= 0) and np.all(c <= s * (1 + 1e-12)) and np.all(np.diff(c) >= 0)
    if record.leaf_bounds is None:
        np.testing.assert_allclose(c, n * np.asarray(engine.clip_factors(jnp.asarray(n, jnp.float32), cfg)),
                                   rtol=1e-6)


def test_registry_tables_agree_with_the_engines_and_the_run_config():
    assert tuple(plan_lib.GRAD_METHODS) == clipping.ENGINES
    assert set(clipping.AUTO_ENGINE_ORDER) == set(clipping.ENGINES)
    defaults = cb.base_config().privacy
    for name, param in clipping.HYPER_PARAMS.items():
        assert hasattr(ClippingConfig(), name)
        assert getattr(ClippingConfig(), name) == param.default
        if param.run_config:
            assert defaults[name] == param.default
    assert clipping.names(private=True) == ("flat", "per_layer", "automatic")
    assert clipping.names(audit=True) == ("flat", "none")
    assert clipping.names(engine="bookkeeping") == ("flat", "automatic", "none")
    with pytest.raises(ValueError, match="book-keeping engine needs one factor per example"):
        dataclasses.replace(clipping.PER_LAYER, engines=("vmap", "bookkeeping"))
    with pytest.raises(ValueError, match="not in HYPER_PARAMS"):
        dataclasses.replace(clipping.FLAT, hyper=("clip_norm", "scale"))
