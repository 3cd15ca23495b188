"""BandMF (`privacy.mechanism="bandmf"`): correlated noise (C^-1 Z)_t from the run's secret normals, the
cyclic Poisson selection, jax_privacy's strategy, sensitivity and amplified accounting, the config and a
`dpft train` run that resumes bitwise. References are computed here independently: a dense numpy C^-1 Z,
jax_privacy called directly, dp_accounting's accountants."""
from __future__ import annotations

import functools
import glob
import json
import os
import shutil

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpft import cli, distributed, errors
from dpft.config.base import load_config
from dpft.config.validation import validate
from dpft.privacy import accounting, bandmf, keys, noise, sampling
from dpft.privacy import plan as plan_lib
from dpft.privacy.engine import ClippingConfig
from dpft.train import step as step_lib
from dpft.workdir import checkpointing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(REPO, "configs", "digits_demo.py")
PARAMS = {"w": np.zeros([3, 2], np.float32), "b": np.zeros([5], np.float32)}
CLIP = 0.5
SECRET = keys.RunSecret.insecure_fixed(11)


def _plan(mechanism="bandmf", bands=3, updates=6, **kw):
    args = dict(enabled=True, num_examples=1000, batch_size=50, num_updates=updates, epsilon=4.0,
                clipping=ClippingConfig(mode="flat", clip_norm=CLIP), params=PARAMS, secret=SECRET,
                mechanism=mechanism, bands=bands)
    args.update(kw)
    return plan_lib.make_plan(**args)


def _realised_noise(plan, updates: int, n_devices: int = 1) -> np.ndarray:
    """[updates, n_params] the noise the real apply step added: SGD at lr 1 on a zero gradient sum, so
    params_t+1 - params_t = -noise_t / B; returned as noise_t / (sigma * S_total)."""
    mesh = distributed.make_data_mesh(jax.devices()[:n_devices])
    opt = optax.sgd(1.0)
    cfg = step_lib.StepConfig(plan=plan, microbatch_size=1)
    params = jax.tree.map(jnp.asarray, PARAMS)
    state = distributed.replicate(step_lib.init_state(params, opt, cfg), mesh)
    apply = step_lib.make_apply_fn(opt, cfg, mesh)
    scale = plan.noise_multiplier * plan.sensitivity * (plan.strategy.sensitivity if plan.strategy else 1.0)
    rows = []
    for _ in range(updates):
        before = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(state["params"])])
        state, _ = apply(state, step_lib.zeros_accumulator(params, mesh), plan.noise_base_key())
        after = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(state["params"])])
        rows.append((before - after) * plan.expected_batch_size / scale)
    return np.stack(rows)


def _secret_normals(plan, updates: int) -> np.ndarray:
    """[updates, n_params] Z: the run's secret standard normals of each update, in leaf order."""
    shapes = [np.shape(x) for x in jax.tree.leaves(PARAMS)]
    return np.stack([np.concatenate([np.asarray(z, np.float64).ravel() for z in noise.standard_normals(
        noise.noise_key(plan.noise_base_key(), t), shapes)]) for t in range(updates)])


# ----------------------------------------------------------------------------- the noise

def test_realised_noise_is_the_dense_c_inverse_z_of_the_secret_normals():
    """6 updates of the real apply step with b = 3: the added noise equals sigma S sens(C) C^-1 Z for the
    dense banded Toeplitz C (numpy) and Z the secret normals; not DP-SGD's Z (the test can fail)."""
    plan = _plan(bands=3, updates=6)
    assert plan.correlated and plan.bands == 3
    c = np.asarray(plan.strategy.coefs)
    dense = np.zeros([6, 6])
    for j in range(3):
        dense += c[j] * np.eye(6, k=-j)
    z = _secret_normals(plan, 6)
    want = np.linalg.solve(dense, z)
    got = _realised_noise(plan, 6)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
    assert np.max(np.abs(got[1:] - z[1:])) > 0.1  # correlated: not DP-SGD's noise
    np.testing.assert_allclose(got[0], z[0] / c[0], rtol=2e-4, atol=2e-4)


def test_noise_is_the_same_on_eight_devices():
    """The noise state is replicated: 8 devices add the noise 1 device adds."""
    if jax.device_count() < 8:
        pytest.skip("needs the 8 fake CPU devices of tests/conftest.py")
    plan = _plan(bands=3, updates=6)
    np.testing.assert_allclose(_realised_noise(plan, 4, 8), _realised_noise(plan, 4, 1), rtol=1e-6, atol=1e-6)


def test_one_band_is_dp_sgds_noise_bit_for_bit():
    b1, sgd = _plan(bands=1), _plan(mechanism="dpsgd")
    assert b1.strategy.coefs == (1.0,) and b1.strategy.sensitivity == 1.0 and not b1.correlated
    assert b1.noise_multiplier == sgd.noise_multiplier  # the same event: ceil(T/1) rounds at rate 1*q
    np.testing.assert_array_equal(_realised_noise(b1, 3), _realised_noise(sgd, 3))
    # privatize_correlated with one band adds exactly privatize's noise
    g = {"w": jnp.ones([7])}
    key = noise.noise_key(b1.noise_base_key(), 4)
    a, _ = noise.privatize_correlated(g, key, noise.init_noise_state(g, 1), coefs=(1.0,), noise_multiplier=0.9,
                                      clip_norm=CLIP, expected_batch_size=50.0)
    b = noise.privatize(g, key, noise_multiplier=0.9, clip_norm=CLIP, expected_batch_size=50.0)
    np.testing.assert_array_equal(a["w"], b["w"])
    for t in range(5):  # and the selection is Poisson's, draw for draw
        np.testing.assert_array_equal(b1.selection(t), sgd.selection(t))


def test_a_resumed_run_continues_with_its_checkpoints_strategy():
    """`wiring.use_strategy` (what a resume does when the checkpoint's plan records other coefficients):
    the plan, its sensitivity and the compiled apply all use the recorded strategy."""
    import types

    from dpft.train import wiring

    plan = _plan(bands=3, updates=6)
    mesh = distributed.make_data_mesh(jax.devices()[:1])
    parts = types.SimpleNamespace(plan=plan, step_cfg=step_lib.StepConfig(plan=plan, microbatch_size=1),
                                  optimizer=optax.sgd(1.0), mesh=mesh, apply=None)
    wiring.use_strategy(parts, [1.0, 0.5, 0.25])
    assert parts.plan.strategy.coefs == (1.0, 0.5, 0.25) and parts.step_cfg.plan is parts.plan
    assert parts.plan.strategy.sensitivity == pytest.approx(float(np.sqrt(1 + 0.25 + 0.0625)), rel=1e-6)
    assert callable(parts.apply)
    want = np.linalg.solve(bandmf.dense_strategy([1.0, 0.5, 0.25], 4), _secret_normals(plan, 4))
    np.testing.assert_allclose(_realised_noise(parts.plan, 4), want, rtol=2e-4, atol=2e-4)
    with pytest.raises(ValueError, match="3 coefficients"):
        wiring.use_strategy(parts, [1.0, 0.5])


def test_every_process_uses_process_0s_strategy(monkeypatch):
    """With several processes, `privacy_setup.shared_strategy` gives every process process 0's coefficients
    bit for bit (here process 0's differ in the last bit: another machine's optimisation)."""
    from dpft.train import privacy_setup

    plan = _plan(bands=3, updates=6)
    theirs = np.nextafter(np.asarray(plan.strategy.coefs), 2.0)
    sent = {}

    def broadcast(words):
        sent["words"] = np.array(words)
        return np.asarray(theirs, "<f8").view("<u4")

    monkeypatch.setattr(privacy_setup.distributed, "together", lambda fn, name: fn)
    monkeypatch.setattr(privacy_setup.multihost_utils, "broadcast_one_to_all", broadcast)
    assert privacy_setup.shared_strategy(plan) is plan  # one process: nothing sent
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    shared = privacy_setup.shared_strategy(plan)
    assert np.array_equal(sent["words"].view("<f8"), np.asarray(plan.strategy.coefs))
    assert shared.strategy.coefs == tuple(theirs) and shared.strategy.coefs != plan.strategy.coefs
    assert privacy_setup.shared_strategy(_plan(mechanism="dpsgd")).strategy is None


# ----------------------------------------------------------------------------- strategy, sensitivity, epsilon

def test_strategy_and_sensitivity_are_jax_privacys():
    from jax_privacy.matrix_factorization import banded, toeplitz

    plan = _plan(bands=3, updates=6)
    want = np.asarray(toeplitz.optimize_banded_toeplitz(6, 3), np.float64)
    np.testing.assert_allclose(plan.strategy.coefs, want, rtol=1e-6)
    # one participation: jax_privacy's Toeplitz sensitivity; the column-normalised banded form of the same
    # strategy has column norm 1 and b-min-sep sensitivity^2 = the participations of one example
    assert plan.strategy.sensitivity == pytest.approx(float(np.sqrt(toeplitz.sensitivity_squared(want))), rel=1e-6)
    dense = np.asarray(banded.ColumnNormalizedBanded.from_banded_toeplitz(6, jnp.asarray(want)).materialize())
    np.testing.assert_allclose(dense[:, 0] * plan.strategy.sensitivity, bandmf.dense_strategy(want, 6)[:, 0],
                               rtol=1e-5)
    cnb = banded.ColumnNormalizedBanded.from_banded_toeplitz(6, jnp.asarray(want))
    assert banded.minsep_sensitivity_squared(cnb, min_sep=3, max_participations=1) == 1
    # a strategy from a file: its own sensitivity ||c|| scales the noise
    unnormalised = bandmf.make_strategy(_save(np.array([2.0, 1.0, 0.5])), 3, 6)
    assert unnormalised.sensitivity == pytest.approx(float(np.sqrt(toeplitz.sensitivity_squared(
        jnp.asarray([2.0, 1.0, 0.5])))), rel=1e-6)


def _save(coefs) -> str:
    import tempfile
    path = os.path.join(tempfile.mkdtemp(), "strategy.npy")
    np.save(path, np.asarray(coefs))
    return path


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_epsilon_is_jax_privacys_amplified_event_and_calibration_hits_the_target(accountant):
    from jax_privacy.experimental import accounting as jp_accounting

    plan = _plan(bands=3, updates=30, accountant=accountant)
    q, sigma, delta = plan.sampling_rate, plan.noise_multiplier, plan.delta
    event = jp_accounting.amplified_bandmf_event(sigma, 30, num_bands=3, sampling_prob=3 * q)
    acc = (dp_accounting.pld.PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
                                           value_discretization_interval=accounting.PLD_DISCRETIZATION)
           if accountant == "pld" else dp_accounting.rdp.RdpAccountant(list(accounting.RDP_ORDERS)))
    want = acc.compose(event).get_epsilon(delta)
    assert plan.epsilon_after(30) == pytest.approx(want, rel=1e-9)
    assert want <= 4.0 and want == pytest.approx(4.0, rel=2e-3)  # calibrated to the target
    ledger = plan.new_ledger()
    ledger.record(q, sigma, 30)
    assert ledger.epsilon(delta, accountant) == pytest.approx(want, rel=1e-9)
    again = accounting.Ledger.from_json(ledger.to_json())
    assert again.bands == 3 and again.to_dict()["mechanism"] == {"name": "bandmf", "bands": 3}
    assert again.epsilon(delta, accountant) == pytest.approx(want, rel=1e-9)
    sgd = _plan(mechanism="dpsgd", updates=30, accountant=accountant)
    assert sgd.new_ledger().to_dict()["format"] == accounting.LEDGER_FORMAT  # DP-SGD's ledger unchanged
    assert sgd.noise_multiplier != sigma


def test_dpft_accountant_bands_gives_the_plans_epsilon_and_sigma(capsys):
    plan = _plan(bands=3, updates=30)
    base = ["accountant", "--sampling-rate", str(plan.sampling_rate), "--steps", "30", "--delta", str(plan.delta),
            "--bands", "3", "--json"]
    assert cli.main(base + ["--noise-multiplier", repr(plan.noise_multiplier)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bands"] == 3 and out["epsilon"] == pytest.approx(plan.epsilon_after(30), rel=1e-9)
    assert cli.main(base + ["--target-epsilon", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["noise_multiplier"] == pytest.approx(plan.noise_multiplier, rel=1e-6)
    assert cli.main(base[:-3] + ["--bands", "40", "--noise-multiplier", "1"]) == 2  # more bands than steps
    assert "--bands" in capsys.readouterr().err


def test_ledger_check_refuses_a_ledger_of_another_mechanism():
    from dpft.workdir import ledger_check

    plan = _plan(bands=3)
    wrong = accounting.Ledger()  # a DP-SGD ledger for a BandMF plan: a smaller epsilon
    wrong.record(plan.sampling_rate, plan.noise_multiplier, 2)
    with pytest.raises(errors.CheckpointError, match="mechanism 'dpsgd'"):
        ledger_check.check_ledger(wrong, updates=2, sampling_rate=plan.sampling_rate,
                                  noise_multiplier=plan.noise_multiplier, private=True, bands=3)
    right = plan.new_ledger()
    right.record(plan.sampling_rate, plan.noise_multiplier, 2)
    ledger_check.check_ledger(right, updates=2, sampling_rate=plan.sampling_rate,
                              noise_multiplier=plan.noise_multiplier, private=True, bands=3)


# ----------------------------------------------------------------------------- selection

def test_selection_is_a_partition_respecting_cyclic_poisson():
    """Each example is only ever selected at updates congruent to its group mod b, the groups partition
    [0, N) (each example's group uniform and independent: sizes about N/b, an example's group does not
    depend on N), depend on the secret, and each is sampled at rate b q."""
    n, b, q, seed = 1001, 4, 0.02, keys.selection_entropy(SECRET)
    groups = [sampling.group_members(seed, n, b, g) for g in range(b)]
    assert sorted(np.concatenate(groups).tolist()) == list(range(n))
    assert all(abs(len(g) - n / b) < 4 * np.sqrt(n / b) for g in groups)
    fewer = [sampling.group_members(seed, n - 1, b, g) for g in range(b)]  # one example removed
    assert all(np.array_equal(f, g[g < n - 1]) for f, g in zip(fewer, groups))
    group_of = np.empty(n, np.int64)
    for g, members in enumerate(groups):
        group_of[members] = g
    counts = np.zeros(b)
    for t in range(400):
        sel = sampling.cyclic_poisson_selection(seed, t, n, q, b)
        assert np.all(group_of[sel] == t % b), t
        counts[t % b] += len(sel)
    assert counts.sum() / 400 == pytest.approx(n * q, rel=0.1)  # expected batch q N
    other = sampling.group_members(keys.selection_entropy(keys.RunSecret.insecure_fixed(12)), n, b, 0)
    assert not np.array_equal(other, groups[0])  # the partition comes from the secret
    plan = _plan(bands=3, updates=6)
    np.testing.assert_array_equal(plan.selection(4), sampling.cyclic_poisson_selection(
        plan.selection_seed(), 4, 1000, plan.sampling_rate, 3))


def test_data_pipeline_selects_like_the_plan():
    from dpft.data import pipeline
    from dpft.data import digits

    table = digits.load_splits()["train"]
    plan = _plan(bands=3, updates=6, num_examples=len(table), batch_size=30)
    it = pipeline.TrainIterator(table, pipeline.TrainConfig(sampling_rate=plan.sampling_rate, physical_batch_size=16,
                                                            selection_seed=plan.selection_seed(), bands=plan.bands))
    for t in range(6):
        np.testing.assert_array_equal(it.selection(t), plan.selection(t))


def test_patient_units_are_selected_by_cyclic_poisson(tmp_path):
    """privacy.unit=patient: the groups and the selection are over patients; an update's batches hold the
    images of exactly the patients of its group that cyclic Poisson selected."""
    from dpft.data import fake, load_splits, pipeline
    from dpft.data.augment import AugmentConfig
    from dpft.privacy import units

    fake.write_fake_chexpert(str(tmp_path), n_patients=30, n_valid_patients=3, seed=1)
    table = load_splits("chexpert", str(tmp_path))["train"]
    index = units.UnitIndex.from_patient_ids(table.column("patient_id"), cap=2)
    cfg = pipeline.TrainConfig(sampling_rate=0.3, physical_batch_size=4, selection_seed=11, bands=3)
    it = pipeline.TrainIterator(table, cfg, AugmentConfig(image_size=8, augmult=1, crop="none", flip=False),
                                units=index)
    group_of = np.empty(index.num_units, np.int64)
    for g in range(3):
        group_of[sampling.group_members(11, index.num_units, 3, g)] = g
    seen = 0
    for u in range(6):
        chosen = sampling.cyclic_poisson_selection(11, u, index.num_units, 0.3, 3)
        ids = np.concatenate([b["example_id"] for b in it.update_batches()])
        assert sorted(ids[ids >= 0].tolist()) == chosen.tolist() and np.all(group_of[chosen] == u % 3)
        seen += len(chosen)
    assert seen > 0


# ----------------------------------------------------------------------------- sensitivity in bf16

@pytest.mark.slow  # 15-33 s on 2 shared cores (the bf16 NFNet's compile)
def test_clipped_sum_sensitivity_is_measured_for_the_bandmf_plan_in_bf16():
    """The BandMF plan's engine in bf16 compute (float32: tests/test_privacy_plan.py measures the same engines
    for DP-SGD): removing one of 16 aligned examples moves its clipped sum by at most C (1 + 1e-4), and the
    noise is scaled by C times the strategy's sensitivity."""
    dtype = jnp.bfloat16
    from dpft import models
    from dpft.privacy import adapters
    from dpft.privacy.sensitivity import aligned_batch, removal_distances

    model = models.create("nfnet_nano", 10, seed=0, dtype=dtype)
    loss_fn, params, _ = adapters.nnx_loss_fn(model, adapters.softmax_cross_entropy_loss)
    c = 0.01
    plan = plan_lib.make_plan(enabled=True, num_examples=1000, batch_size=50, num_updates=6, epsilon=4.0,
                              clipping=ClippingConfig(mode="flat", clip_norm=c), params=params, secret=SECRET,
                              mechanism="bandmf", bands=3)
    rng = np.random.default_rng(0)
    batch = aligned_batch({"image": rng.standard_normal([1, 8, 8, 3]).astype(np.float32),
                           "label": np.zeros([1], np.int32)}, 16)
    sum_fn = jax.jit(lambda b: plan.clipped_sum(loss_fn, params, b, jax.random.key(0), microbatch_size=16)[0])
    d = removal_distances(sum_fn, batch, [0, 7, 15])
    assert np.all(d <= plan.sensitivity * (1 + 1e-4)) and np.all(d >= c * (1 - 1e-3)), d / c
    g = jax.tree.map(jnp.zeros_like, sum_fn(batch))
    out, _ = plan.noisy_mean_correlated(g, plan.noise_base_key(), 0, plan.init_noise_state(g))
    z0 = noise.standard_normals(noise.noise_key(plan.noise_base_key(), 0), [x.shape for x in jax.tree.leaves(g)])
    scale = plan.noise_multiplier * c * plan.strategy.sensitivity / plan.strategy.coefs[0] / plan.expected_batch_size
    for x, z in zip(jax.tree.leaves(out), z0):
        np.testing.assert_allclose(np.asarray(x), scale * np.asarray(z), rtol=1e-5, atol=1e-9)


# ----------------------------------------------------------------------------- config

def _digits(*extra):
    return load_config(DIGITS, list(extra))


def test_config_defaults_to_dpsgd_and_old_configs_upgrade():
    from dpft.config.upgrade import upgrade

    c = _digits()
    assert c.privacy.mechanism == "dpsgd" and c.privacy.bandmf.bands == 1
    old = json.loads(c.to_json())
    del old["privacy"]["mechanism"], old["privacy"]["bandmf"]
    up = upgrade(old)
    assert up.privacy.mechanism == "dpsgd" and up.privacy.bandmf.bands == 1
    assert up.privacy.bandmf.strategy == "optimized"


@pytest.mark.parametrize("overrides,field", [
    (["--config.privacy.mechanism=bandmf", "--config.privacy.bandmf.bands=1000"], "privacy.bandmf.bands"),
    (["--config.privacy.mechanism=bandmf", "--config.privacy.bandmf.bands=3", "--config.individual.enabled=True"],
     "individual.enabled"),
    (["--config.privacy.bandmf.bands=3"], "privacy.bandmf.bands"),  # bands without bandmf
    (["--config.privacy.mechanism=bandmf", "--config.privacy.bandmf.strategy=nope.txt"], "privacy.bandmf.strategy"),
    (["--config.privacy.mechanism=bandmf", "--config.privacy.bandmf.strategy=/no/such.npy"],
     "privacy.bandmf.strategy"),
    (["--config.privacy.mechanism=dpmf"], "privacy.mechanism"),
])
def test_validation_refuses_what_the_accountant_does_not_cover(overrides, field):
    with pytest.raises(errors.ConfigError) as info:
        validate(_digits(*overrides), num_examples=1500)
    msg = str(info.value)
    assert f"config.{field}=" in msg and "\n" not in msg, msg


def test_bands_times_batch_beyond_the_data_is_refused():
    with pytest.raises(errors.ConfigError, match=r"config.privacy.bandmf.bands=20 times config.train.batch_size"):
        validate(_digits("--config.privacy.mechanism=bandmf", "--config.privacy.bandmf.bands=20"), num_examples=1500)
    validate(_digits("--config.privacy.mechanism=bandmf", "--config.privacy.bandmf.bands=4"), num_examples=1500)


def test_a_strategy_file_is_the_runs_strategy(tmp_path):
    from dpft.config import run_plan

    path = str(tmp_path / "c.npy")
    np.save(path, np.array([1.0, 0.6, 0.3]))
    config = _digits("--config.privacy.mechanism=bandmf", "--config.privacy.bandmf.bands=3",
                     f"--config.privacy.bandmf.strategy={path}", "--config.train.num_updates=6",
                     "--config.train.batch_size=50")
    validate(config, num_examples=1000)
    plan = run_plan.privacy_plan(config, 1000, PARAMS, SECRET)
    assert plan.strategy.coefs == (1.0, 0.6, 0.3) and plan.strategy.source == path
    assert plan.to_dict()["bandmf"]["strategy_sensitivity"] == pytest.approx(np.sqrt(1.45), rel=1e-6)
    np.save(path, np.array([1.0, 0.6]))  # two coefficients for three bands
    with pytest.raises(errors.UsageError, match="3 band"):
        run_plan.privacy_plan(config, 1000, PARAMS, SECRET)
    np.save(path, np.array([1.0, 2.5, 1.2]))  # x^2 + 2.5x + 1.2 has a root of modulus 1.85: C^-1 unstable
    with pytest.raises(errors.UsageError, match="unstable .* modulus 1.85"):
        run_plan.privacy_plan(config, 1000, PARAMS, SECRET)


def test_the_stability_check_is_what_the_noise_recursion_does():
    """C^-1 Z over 80 updates: bounded for the file strategy accepted above and for jax-privacy's optimum,
    exploding for the refused one (the check's reason)."""
    z = np.random.default_rng(0).standard_normal((80, 1))
    y = {}
    for name, c in (("ok", [1.0, 0.6, 0.3]), ("optimized", list(bandmf.optimized_coefs(80, 4))),
                    ("unstable", [1.0, 2.5, 1.2])):
        y[name] = np.linalg.solve(bandmf.dense_strategy(np.array(c), 80), z)
    assert np.abs(y["ok"]).max() < 10 and np.abs(y["optimized"]).max() < 10
    assert np.abs(y["unstable"]).max() > 1e15
    bandmf.check_coefs(np.array([1.0, 0.6, 0.3]), 3, "ok")
    with pytest.raises(ValueError, match="unstable"):
        bandmf.check_coefs(np.array([1.0, 2.5, 1.2]), 3, "unstable")


def test_example_level_patients_get_no_dp_sgd_group_epsilon_and_say_so():
    """On data with several images per patient, an example-level BandMF plan states no patient epsilon (the
    group analysis is DP-SGD's): `not_computed` says so, the start line too, never a number."""
    from dpft.config import run_plan
    from dpft.train import run_log

    config = _digits("--config.privacy.mechanism=bandmf", "--config.privacy.bandmf.bands=2",
                     "--config.train.num_updates=6", "--config.train.batch_size=50")
    ids = [f"p{i // 2}" for i in range(1000)]  # two images per patient
    plan = run_plan.privacy_plan(config, 1000, PARAMS, SECRET, patient_ids=ids)
    assert plan.mechanism == "bandmf" and plan.patients["epsilon_of_the_patient_with_the_most_images"] is None
    assert "dpsgd only" in plan.patients["not_computed"] and plan.patients["max_images"] == 2
    (line,) = run_log.patient_lines(plan, plan.epsilon_after(6))
    assert "privacy.unit='patient'" in line and "epsilon" not in line.split(";")[0]
    sgd = run_plan.privacy_plan(_digits("--config.train.num_updates=6", "--config.train.batch_size=50"), 1000,
                                PARAMS, SECRET, patient_ids=ids)
    assert sgd.patients["epsilon_of_the_patient_with_the_most_images"] > sgd.epsilon_after(6)


# ----------------------------------------------------------------------------- dpft train, resumed bitwise

E2E_UPDATES = 4


def _train_args(workdir) -> list[str]:
    return ["train", "--config", DIGITS, "--workdir", str(workdir), "--config.model.name=nfnet_nano",
            "--config.data.image_size=16", "--config.data.eval_image_size=16", "--config.data.augmult=1",
            f"--config.train.num_updates={E2E_UPDATES}", "--config.train.batch_size=64",
            "--config.train.physical_batch_size=32", "--config.train.microbatch_size=4",
            "--config.train.lr_schedule.name=constant", "--config.train.eval_every=0",
            "--config.train.checkpoint_every=2", "--config.eval.splits=test",
            "--config.privacy.mechanism=bandmf", "--config.privacy.bandmf.bands=2", "--config.privacy.epsilon=8"]


def _restore(workdir, step):
    with checkpointing.Checkpointer(str(workdir)) as ckpt:
        return ckpt.restore(step)


@pytest.mark.slow
def test_dpft_train_bandmf_resumes_bitwise_and_evaluate_recomputes_its_epsilon(tmp_path, capsys):
    a = tmp_path / "a"
    assert cli.main(_train_args(a)) == 0, capsys.readouterr().err[-3000:]
    assert "BandMF (b=2 bands and cyclic Poisson groups, strategy optimized" in capsys.readouterr().out
    full = _restore(a, E2E_UPDATES)
    assert "noise_state" in full.pytrees  # b - 1 = 1 correlated noise vector per parameter
    ns = jax.tree.leaves(full.pytrees["noise_state"])
    assert all(x.shape[0] == 1 for x in ns) and any(np.any(np.asarray(x) != 0) for x in ns)
    with open(a / "privacy_plan.json") as f:
        plan = json.load(f)
    assert plan["mechanism"] == "bandmf" and plan["bands"] == 2 and plan["sampling"] == "cyclic_poisson"
    with open(a / "ledger.json") as f:
        ledger = accounting.Ledger.from_dict(json.load(f))
    assert ledger.bands == 2 and ledger.total_steps == E2E_UPDATES
    from jax_privacy.experimental import accounting as jp_accounting
    event = jp_accounting.amplified_bandmf_event(plan["noise_multiplier"], E2E_UPDATES, num_bands=2,
                                                 sampling_prob=2 * plan["sampling_rate"])
    want = dp_accounting.pld.PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
                                           value_discretization_interval=accounting.PLD_DISCRETIZATION
                                           ).compose(event).get_epsilon(plan["delta"])
    assert ledger.epsilon(plan["delta"]) == pytest.approx(want, rel=1e-9) and want <= 8.0

    b = tmp_path / "b"  # resumed from the checkpoint at update 2 (its secret and noise state)
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoints" / str(E2E_UPDATES))
    shutil.rmtree(b / "predictions")
    capsys.readouterr()
    assert cli.main(_train_args(b)) == 0, capsys.readouterr().err[-3000:]
    assert f"resumed from {b / 'checkpoints'}/2" in capsys.readouterr().out
    resumed = _restore(b, E2E_UPDATES)
    assert set(full.pytrees) == set(resumed.pytrees)
    for name in full.pytrees:
        for x, y in zip(jax.tree.leaves(full.pytrees[name]), jax.tree.leaves(resumed.pytrees[name])):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
    assert full.json_items["ledger"] == resumed.json_items["ledger"]
    at2 = _restore(a, 2)  # not trivially equal
    assert any(np.any(np.asarray(x) != np.asarray(y)) for x, y in
               zip(jax.tree.leaves(at2.pytrees["params"]), jax.tree.leaves(full.pytrees["params"])))

    capsys.readouterr()
    assert cli.main(["evaluate", "--workdir", str(a), "--split", "test", "--bootstrap", "10", "--no-plots"]) == 0, \
        capsys.readouterr().err[-3000:]
    metrics = glob.glob(str(a / "eval" / "*" / "metrics.json"))
    assert metrics
    with open(metrics[0]) as f:
        assert json.load(f)["meta"]["epsilon"] == pytest.approx(want, rel=1e-9)
