"""Individual privacy accounting: checked against dp_accounting's RdpAccountant and PLDAccountant directly,
and against the run's own ledger epsilon (`dpft.privacy.accounting`)."""
import functools
import hashlib
import json
import os
import types
from collections import Counter

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib

from dpft.privacy import accounting
from dpft.privacy.individual import epsilons, files, groups, hook
from dpft.privacy.individual.norms import NormRecorder, round_up_to_grid

Q, SIGMA, DELTA, C = 0.05, 1.1, 1e-5, 1.0
ORDERS = [1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0]  # few orders: fast brute-force tests


@pytest.fixture
def few_orders(monkeypatch):
    """A run whose RDP accountant uses ORDERS: individual RDP follows the run's orders (fast tests)."""
    monkeypatch.setattr(accounting, "RDP_ORDERS", tuple(ORDERS))


def accountant_eps(q, sigma, steps, delta=DELTA, orders=ORDERS):
    acc = dp_accounting.rdp.RdpAccountant(orders=orders)
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


def brute_force_eps(norm_rows, update_indices, num_updates, clip_norm=C):
    """Per example: one RdpAccountant, composing every update's event explicitly."""
    n = norm_rows.shape[1]
    out = np.zeros(n)
    for i in range(n):
        acc = dp_accounting.rdp.RdpAccountant(orders=ORDERS)
        for t in range(num_updates):
            j = np.searchsorted(update_indices, t, side="right") - 1
            norm = clip_norm if j < 0 else min(norm_rows[j, i], clip_norm)
            if norm > 0:
                acc.compose(dp_accounting.PoissonSampledDpEvent(
                    Q, dp_accounting.GaussianDpEvent(SIGMA * clip_norm / norm)))
        out[i] = acc.get_epsilon(DELTA)
    return out


def eps_of(rec, num_updates, **kw):
    args = dict(sampling_rate=Q, noise_multiplier=SIGMA, sensitivity=C, num_updates=num_updates, delta=DELTA,
                accountant="rdp")
    args.update(kw)
    return epsilons.individual_epsilons(rec, **args)


def direct_epsilon(accountant, q, sigma, steps, delta=DELTA):
    """dp-accounting's own accountant at the run's settings, called directly (not via dpft.privacy.accounting)."""
    if accountant == "pld":
        acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    else:
        acc = dp_accounting.rdp.RdpAccountant(orders=list(accounting.RDP_ORDERS))
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_always_clipped_gets_the_run_ledger_epsilon_and_a_small_norm_its_scaled_noise(accountant):
    """With the run's own accountant (PLD at its discretisation, RDP at RDP_ORDERS): norm >= C at every
    record -> exactly the run's ledger epsilon; norm n < C throughout -> the epsilon of sigma C / n."""
    t = 30
    rec = NormRecorder(num_examples=4, grid_width=1 / 64, every=10)
    for u in range(0, t, 10):
        rec.record_all(u, np.array([2 * C, C, C / 2, C / 4]))
    got = eps_of(rec, t, accountant=accountant)
    ledger = accounting.Ledger()
    ledger.record(Q, SIGMA, t)
    run = ledger.epsilon(DELTA, accountant)
    np.testing.assert_allclose(got[:2], run, rtol=1e-9)
    np.testing.assert_allclose(got[2], direct_epsilon(accountant, Q, 2 * SIGMA, t), rtol=1e-9)
    np.testing.assert_allclose(got[3], direct_epsilon(accountant, Q, 4 * SIGMA, t), rtol=1e-9)
    assert got[3] < got[2] < run


def test_always_clipped_gets_worst_case_and_half_norm_gets_double_sigma(few_orders):
    rec = NormRecorder(num_examples=4, grid_width=1 / 64, every=5)
    for u in range(0, 20, 5):
        rec.record_all(u, np.array([C, 3.7 * C, C / 2, 0.0]))
    eps = eps_of(rec, 20)
    worst = accountant_eps(Q, SIGMA, 20)
    np.testing.assert_allclose(eps[:2], worst, rtol=1e-12)
    np.testing.assert_allclose(eps[2], accountant_eps(Q, 2 * SIGMA, 20), rtol=1e-12)
    assert eps[3] == 0.0
    assert eps[2] < worst / 2  # and the halved norm really helps
    np.testing.assert_allclose(accounting.compute_epsilon(Q, SIGMA, 20, DELTA, "rdp"), worst, rtol=1e-12)


def test_matches_brute_force_per_update_composition(few_orders):
    rng = np.random.default_rng(0)
    n, updates = 6, [2, 5, 9]
    rows = rng.uniform(0, 1.5 * C, size=(3, n))
    rows[1, 0] = 0.0
    rec = NormRecorder(n, grid_width=1 / 1024)
    for u, row in zip(updates, rows):
        rec.record_all(u, row)
    rows_rounded = np.minimum(round_up_to_grid(rows, 1 / 1024) / 1024, C)
    expected = brute_force_eps(rows_rounded, np.array(updates), 12)
    np.testing.assert_allclose(eps_of(rec, 12), expected, rtol=1e-9)


def test_rounding_never_under_estimates(few_orders):
    rng = np.random.default_rng(1)
    norms = rng.uniform(0, 2 * C, size=(4, 40))
    coarse = NormRecorder(40, 0.1)
    for u, row in zip([0, 3, 6, 9], norms):
        coarse.record_all(u, row)
    assert np.all(round_up_to_grid(norms, 0.1) * 0.1 >= norms)
    e_exact, e_coarse = brute_force_eps(norms, np.array([0, 3, 6, 9]), 12), eps_of(coarse, 12)
    assert np.all(e_coarse >= e_exact - 1e-12)
    assert np.mean(e_coarse > e_exact + 1e-9) > 0.5  # the grid really rounded something
    assert np.all(e_coarse <= accountant_eps(Q, SIGMA, 12) + 1e-9)


def test_round_up_exact_on_grid_and_rejects_bad_norms():
    np.testing.assert_array_equal(round_up_to_grid(np.array([0.0, 0.5, 0.51, 1.0]), 0.25), [0, 2, 3, 4])
    with pytest.raises(ValueError, match="finite"):
        round_up_to_grid(np.array([np.nan]), 0.1)


def test_missing_records_and_updates_before_first_record_count_as_worst_case(few_orders):
    rec = NormRecorder(3, 1 / 64)
    rec.record(4, np.array([0, 1, -1]), np.array([0.25, 0.25, 9.0]), mask=np.array([1, 1, 0]))
    rec.record(4, np.array([2]), np.array([0.25]))  # same update: fills the same record
    rec.record(8, np.array([0]), np.array([0.25]))  # examples 1, 2 missed at update 8
    assert rec.num_records == 2
    eps = eps_of(rec, 10)
    expected = brute_force_eps(np.array([[0.25, 0.25, 0.25], [0.25, C, C]]), np.array([4, 8]), 10)
    np.testing.assert_allclose(eps, expected, rtol=1e-9)
    np.testing.assert_allclose(eps[1], eps[2])
    with pytest.raises(ValueError, match="precedes"):
        rec.record(3, np.array([0]), np.array([0.1]))
    with pytest.raises(ValueError, match="num_updates"):
        eps_of(rec, 8)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        rec.record(9, np.array([3]), np.array([0.1]))


def test_vectorised_rdp_to_epsilon_equals_the_rdp_accountant_at_the_run_orders():
    orders = np.asarray(accounting.RDP_ORDERS)
    rng = np.random.default_rng(2)
    rdp = np.abs(rng.standard_normal((50, len(orders)))) * rng.choice([1e-4, 0.1, 10.0], size=(50, 1))
    rdp[0] = 0.0
    rdp[1, :40] = np.inf  # dp-accounting's RDP at orders it cannot bound
    got = epsilons.rdp_to_epsilon(orders, rdp, 1e-6)
    want = [rdp_lib.compute_epsilon(orders, r, 1e-6)[0] for r in rdp]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    for q, sigma, t in [(0.01, 1.0, 500), (0.27, 0.7, 40)]:  # the run's RdpAccountant end to end
        acc = accounting.make_accountant("rdp").compose(accounting.dpsgd_event(q, sigma, t))
        np.testing.assert_allclose(epsilons.rdp_to_epsilon(acc.orders, acc.rdp, DELTA), acc.get_epsilon(DELTA),
                                   rtol=1e-12)


def test_cached_equals_uncached_on_random_input(few_orders):
    rng = np.random.default_rng(3)
    n = 40
    rec = NormRecorder(n, grid_width=0.125, every=3)
    for u in range(0, 15, 3):
        rec.record_all(u, rng.exponential(0.6 * C, size=n))
    cached = eps_of(rec, 16, chunk_size=7)  # several chunks
    rows = np.minimum(rec.bins.astype(float) * 0.125, C)
    uncached = brute_force_eps(rows, rec.update_indices, 16)
    np.testing.assert_allclose(cached, uncached, rtol=1e-9)


def test_results_stable_across_save_and_resume(tmp_path, few_orders):
    rng = np.random.default_rng(4)
    n, norms = 25, rng.uniform(0, 1.3, size=(6, 25))
    straight = NormRecorder(n, 0.05, every=2)
    for k, row in enumerate(norms):
        straight.record_all(2 * k, row)

    first = NormRecorder(n, 0.05, every=2)
    for k, row in enumerate(norms[:4]):  # records at 0, 2, 4, 6
        first.record_all(2 * k, row)
    first.record_all(8, norms[4])  # recorded after the checkpoint at update 8 ...
    files.save_norms(first, tmp_path / "norms.npz")
    assert (os.stat(tmp_path / "norms.npz").st_mode & 0o077) == 0  # per-example norms: owner-only
    resumed = files.load_norms(tmp_path / "norms.npz")
    resumed.truncate(8)  # ... so the resumed run (from the checkpoint at 8) drops it
    for k in (4, 5):
        resumed.record_all(2 * k, norms[k])
    np.testing.assert_array_equal(resumed.bins, straight.bins)
    np.testing.assert_array_equal(eps_of(resumed, 13), eps_of(straight, 13))
    assert resumed.every == 2 and resumed.grid_width == 0.05
    (tmp_path / "bad.npz").write_bytes(b"not npz")
    with pytest.raises(ValueError, match="bad.npz"):
        files.load_norms(tmp_path / "bad.npz")


def test_summarise_quantiles_groups_and_spearman():
    rng = np.random.default_rng(5)
    n = 200
    eps = rng.uniform(0, 3, n)
    sex = np.where(rng.random(n) < 0.4, "F", "M")
    labels = rng.integers(0, 3, n)
    losses = eps * 2 + rng.normal(0, 0.1, n)
    sex[:7] = "X"  # a group of 7 < the minimum group size 20: no statistics at all
    s = groups.summarise(eps, {"sex": sex}, labels, losses, worst_case_epsilon=3.5)
    f = eps[sex == "F"]
    assert s["by_attribute"]["sex"]["F"]["n"] == f.size
    np.testing.assert_allclose(s["by_attribute"]["sex"]["F"]["q25"], np.quantile(f, 0.25))
    np.testing.assert_allclose(s["by_class"]["2"]["q95"], np.quantile(eps[labels == 2], 0.95))
    assert s["by_attribute"]["sex"]["X"] == {"n": 7, "suppressed": True}
    assert s["worst_case_epsilon"] == 3.5 and s["min_group_size"] == 20
    # no minimum or maximum anywhere: each would be one individual's value
    assert "min" not in json.dumps(s).replace("min_group_size", "") and '"max"' not in json.dumps(s)
    bigger = groups.summarise(eps, {"sex": sex}, min_group_size=100)
    assert bigger["by_attribute"]["sex"]["F"]["suppressed"] == (f.size < 100)
    ranks = lambda x: np.argsort(np.argsort(x))  # noqa: E731 (no ties with continuous data)
    np.testing.assert_allclose(s["spearman_loss"]["rho"], np.corrcoef(ranks(eps), ranks(losses))[0, 1])
    multi = groups.summarise(eps, None, np.stack([labels == 0, labels == 1], 1).astype(float),
                          class_names=["a", "b"])
    assert multi["by_class"]["b"]["n"] == int(np.sum(labels == 1))
    json.dumps(s)  # plain data


def test_write_and_read_individual_epsilons(tmp_path):
    path = files.write_individual_epsilons(tmp_path, np.array([3, 1]), np.array([0.5, 1.5]),
                                         {"sex": ["F", "M"]}, summary={"overall": {"max": 1.5}})
    assert os.path.basename(path) == "individual_epsilon.npz"
    with np.load(path, allow_pickle=False) as z:  # the keys the evaluation report reads
        np.testing.assert_array_equal(z["example_id"], [3, 1])
        np.testing.assert_array_equal(z["epsilon"], [0.5, 1.5])
        np.testing.assert_array_equal(z["attr_sex"], ["F", "M"])
    assert (os.stat(path).st_mode & 0o077) == 0  # per-example values: owner-only
    readme = (tmp_path / "INDIVIDUAL_PRIVACY_README.md").read_text().lower()
    assert "sensitive" in readme and "outside this\n  workdir" in readme
    assert files.read_individual_epsilons(path)["epsilon"].shape == (2,)
    with pytest.raises(ValueError, match="'sex'"):
        files.write_individual_epsilons(tmp_path, np.array([3, 1]), np.array([0.5, 1.5]), {"sex": ["F"]})
    from dpft.errors import UsageError
    np.savez(tmp_path / "no_eps.npz", example_id=np.arange(2))
    with pytest.raises(UsageError, match=r"no_eps.npz: field 'epsilon': missing"):
        files.read_individual_epsilons(tmp_path / "no_eps.npz")
    np.savez(tmp_path / "bad_attr.npz", example_id=np.arange(2), epsilon=np.ones(2), attr_sex=np.array(["F"]))
    with pytest.raises(UsageError, match=r"bad_attr.npz: field 'attr_sex': shape \(1,\), expected \(2,\)"):
        files.read_individual_epsilons(tmp_path / "bad_attr.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(UsageError, match="junk.npz: cannot read"):
        files.read_individual_epsilons(tmp_path / "junk.npz")


def test_orders_with_infinite_rdp_do_not_give_nan():
    """At a large sampling rate dp_accounting returns +inf RDP for small orders; examples that
    never reach a level must still get a finite epsilon (regression: 0 * inf = NaN)."""
    q, sigma, delta, t = 0.27, 1.0, 2e-3, 40
    rec = NormRecorder(num_examples=3, grid_width=0.01, every=10)
    for u in range(0, t, 10):
        rec.record_all(u, np.array([5.0, 0.5, 0.08]))
    eps = epsilons.individual_epsilons(rec, sampling_rate=q, noise_multiplier=sigma, sensitivity=1.0,
                                       num_updates=t, delta=delta, accountant="rdp")
    assert np.all(np.isfinite(eps))
    worst = accounting.compute_epsilon(q, sigma, t, delta, "rdp")
    assert eps[0] == pytest.approx(worst, rel=1e-9)
    assert eps[2] < eps[1] < eps[0]


def pld_brute_force(norm_rows, update_indices, num_updates, contribution=lambda n: np.minimum(n, C),
                    sensitivity=C, q=Q, sigma=SIGMA, delta=DELTA):
    """Per example: one dp_accounting PLDAccountant (dpft's discretisation) composing every update."""
    from dpft.privacy.accounting import PLD_DISCRETIZATION

    out = np.zeros(norm_rows.shape[1])
    for i in range(norm_rows.shape[1]):
        acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
        for t in range(num_updates):
            j = np.searchsorted(update_indices, t, side="right") - 1
            c = sensitivity if j < 0 else min(float(contribution(norm_rows[j, i])), sensitivity)
            if c > 0:
                acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma * sensitivity / c)))
        out[i] = acc.get_epsilon(delta)
    return out


def test_pld_individual_epsilons_match_a_pld_accountant_per_example_and_never_exceed_the_run():
    rng = np.random.default_rng(6)
    n, updates, t = 5, [0, 4, 8], 12
    rows = rng.uniform(0, 1.5 * C, size=(3, n))
    rows[:, 0] = 2 * C  # always clipped: exactly the run's epsilon
    rows[1, 1] = 0.0
    rec = NormRecorder(n, grid_width=1 / 256)
    for u, row in zip(updates, rows):
        rec.record_all(u, row)
    rounded = rec.bins.astype(float) / 256
    got = epsilons.individual_epsilons(rec, sampling_rate=Q, noise_multiplier=SIGMA, sensitivity=C, num_updates=t,
                                  delta=DELTA, accountant="pld")
    np.testing.assert_allclose(got, pld_brute_force(rounded, np.array(updates), t), rtol=1e-6)
    from dpft.privacy import accounting
    run = accounting.compute_epsilon(Q, SIGMA, t, DELTA, "pld")
    np.testing.assert_allclose(got[0], run, rtol=1e-6)
    assert np.all(got <= run * (1 + 1e-9)) and got[2] < run


def test_automatic_clipping_charges_its_own_contribution():
    """Automatic clipping adds C n / (n + gamma), not min(n, C): a small-norm example is charged more
    than flat clipping would charge it, a large-norm one slightly less than the worst case."""
    gamma = 0.01
    auto = lambda n: C * np.asarray(n) / (np.asarray(n) + gamma)  # noqa: E731
    rec = NormRecorder(3, grid_width=1 / 1024)
    for u in (0, 5):
        rec.record_all(u, np.array([0.02, 0.3, 50.0]))
    kw = dict(sampling_rate=Q, noise_multiplier=SIGMA, sensitivity=C, num_updates=10, delta=DELTA, accountant="pld")
    got = epsilons.individual_epsilons(rec, contribution=auto, **kw)
    flat = epsilons.individual_epsilons(rec, **kw)
    rounded = rec.bins.astype(float) / 1024
    np.testing.assert_allclose(got, pld_brute_force(rounded, np.array([0, 5]), 10, contribution=auto), rtol=1e-6)
    assert got[0] > flat[0] and got[1] > flat[1]  # min(n, C) = n understates C n / (n + gamma) for small n


def test_pld_histories_equal_the_runs_accountant_composing_each_examples_events():
    """The cached PLD pieces give, per example, exactly what `accounting.make_accountant("pld")` gives for
    the ComposedDpEvent of its segments (one dpsgd_event per contribution level, smallest first)."""
    rng = np.random.default_rng(7)
    n, updates, t = 8, [0, 3, 7], 10
    rec = NormRecorder(n, grid_width=1 / 8)
    for u in updates:
        rec.record_all(u, rng.uniform(0, 1.5 * C, size=n))
    got = epsilons.individual_epsilons(rec, sampling_rate=Q, noise_multiplier=SIGMA, sensitivity=C,
                                       num_updates=t, delta=DELTA, accountant="pld")
    counts = np.diff(updates + [t])
    for i in range(n):
        spent = Counter()
        for j, c in enumerate(counts):
            spent[min(rec.bins[j, i] / 8, C)] += int(c)
        events = [accounting.dpsgd_event(Q, SIGMA * C / level, k) for level, k in sorted(spent.items()) if level > 0]
        acc = accounting.make_accountant("pld").compose(dp_accounting.ComposedDpEvent(events))
        assert got[i] == pytest.approx(acc.get_epsilon(DELTA), rel=1e-12), i


def test_hook_checkpoints_the_record_and_finishes_with_private_files_and_aggregates(tmp_path):
    """The loop's calls: due / record / checkpoint_item / restore / finish (epsilons by the plan)."""
    n, t = 30, 6
    h = hook.IndividualHook.create(n, grid_width=1 / 64, every=3, min_group_size=10)
    rng = np.random.default_rng(8)
    for u in range(t):
        if h.due(u):
            h.record(u, rng.choice([0.25, 0.5, 2.0], n), rng.uniform(0, 1, n))  # few distinct histories: fast
    assert h.recorder.update_indices.tolist() == [0, 3]
    item = h.checkpoint_item(str(tmp_path), t, write=True)
    norms_file = tmp_path / "individual_norms" / f"{t}.npz"
    assert item == {"norms_file": os.path.join("individual_norms", f"{t}.npz"),
                    "sha256": hashlib.sha256(norms_file.read_bytes()).hexdigest()}
    assert h.checkpoint_item(str(tmp_path / "elsewhere"), t, write=False)["sha256"] == item["sha256"]  # other hosts
    assert (os.stat(tmp_path / item["norms_file"]).st_mode & 0o077) == 0
    assert (os.stat(tmp_path / "individual_norms").st_mode & 0o077) == 0
    resumed = hook.IndividualHook.create(n, grid_width=1 / 64, every=3)
    resumed.recorder = hook.IndividualHook.read_norms(str(tmp_path), item)  # what a resume does
    np.testing.assert_array_equal(resumed.recorder.bins, h.recorder.bins)

    def plan_epsilons(rec, updates):
        return epsilons.individual_epsilons(rec, sampling_rate=Q, noise_multiplier=SIGMA, sensitivity=C,
                                            num_updates=updates, delta=DELTA, accountant="pld")
    plan = types.SimpleNamespace(individual_epsilons=plan_epsilons, accountant="pld",
                                 clipping=types.SimpleNamespace(mode="flat"))
    run = accounting.compute_epsilon(Q, SIGMA, t, DELTA, "pld")
    columns = {"example_id": np.arange(n) + 100, "label": np.arange(n) % 2,
               "attr_sex": np.where(np.arange(n) < 12, "F", "M")}
    path = h.finish(str(tmp_path), plan, t, run, columns, task="multiclass", class_names=["a", "b"])
    got = files.read_individual_epsilons(path)
    np.testing.assert_array_equal(got["example_id"], columns["example_id"])
    np.testing.assert_array_equal(got["epsilon"], plan_epsilons(h.recorder, t))
    assert set(got) == {"example_id", "epsilon", "attr_sex", "attr_class"}
    assert (os.stat(path).st_mode & 0o077) == 0
    summary = json.loads((tmp_path / files.JSON_NAME).read_text())
    assert summary["run_epsilon"] == {"value": run, "accountant": "pld"} and summary["clipping"] == "flat"
    assert summary["by_attribute"]["sex"]["F"]["n"] == 12 and summary["min_group_size"] == 10
    assert "min" not in json.dumps(summary).replace("min_group_size", "") and '"max"' not in json.dumps(summary)


def _flip_norms_byte(path) -> None:
    """Flip the last byte of the `bins` array's data in a norms .npz (stored uncompressed)."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = z.getinfo("bins.npy")
    data = bytearray(open(path, "rb").read())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + info.compress_size - 1] ^= 0x01
    open(path, "wb").write(bytes(data))


def test_norms_file_is_written_owner_only_with_the_same_bytes_for_the_same_state(tmp_path):
    """`save_norms` writes the bytes `norms_bytes` gives (no time stamp: equal on every host, so every
    host states the same SHA-256) into a directory made owner-only, also one that was world-readable."""
    rec = NormRecorder(7, 0.25, every=2)
    rec.record_all(0, np.linspace(0, 2, 7))
    h = hook.IndividualHook(rec)
    (tmp_path / "individual_norms").mkdir(mode=0o755)
    os.chmod(tmp_path / "individual_norms", 0o755)
    item = h.checkpoint_item(str(tmp_path), 2, write=True)
    assert (os.stat(tmp_path / "individual_norms").st_mode & 0o777) == 0o700
    assert (tmp_path / item["norms_file"]).read_bytes() == files.norms_bytes(rec) == files.norms_bytes(
        NormRecorder.from_state_dict(rec.state_dict()))
    assert files.norms_sha256(rec) == item["sha256"]
    np.testing.assert_array_equal(hook.IndividualHook.read_norms(str(tmp_path), item).bins, rec.bins)
    _flip_norms_byte(tmp_path / item["norms_file"])
    with pytest.raises(ValueError, match=r"individual_norms/2\.npz'?: SHA-256 .* differs from the recorded"):
        hook.IndividualHook.read_norms(str(tmp_path), item)
    other = hook.IndividualHook(NormRecorder(7, 0.25, every=2)).checkpoint_item(str(tmp_path), 3, write=True)
    os.replace(tmp_path / other["norms_file"], tmp_path / item["norms_file"])  # a valid file of another state
    with pytest.raises(ValueError, match="differs from the recorded"):
        hook.IndividualHook.read_norms(str(tmp_path), item)
    _flip_norms_byte(tmp_path / item["norms_file"])
    old_item = {"norms_file": item["norms_file"]}  # written before the digest was recorded: unchecked
    with pytest.raises(ValueError, match="cannot read norm recorder"):  # ... but zip's CRC still refuses it
        hook.IndividualHook.read_norms(str(tmp_path), old_item)


def test_a_flipped_byte_of_the_individual_norms_file_makes_the_step_corrupt_and_the_resume_falls_back(tmp_path):
    """`WORKDIR/individual_norms/<update>.npz` is outside the orbax checkpoint; its SHA-256 is in the checkpoint's
    (checksummed) `individual` item. One flipped byte of step 6's file makes step 6 corrupt, naming the item, and
    `dpft train`'s resume (`resume.read_checkpoint` under `newest_intact`) restores step 4 and its recorder."""
    import jax.numpy as jnp

    from dpft.config.base import config_to_json, load_config
    from dpft.train import resume
    from dpft.workdir import checkpointing

    config = load_config(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "fake_chexpert_tiny.py"))
    plan = types.SimpleNamespace(sampling_rate=Q, noise_multiplier=SIGMA, enabled=True, ledger_bands=None)
    h = hook.IndividualHook.create(9, grid_width=1 / 8, every=2)
    rng = np.random.default_rng(3)
    recorders = {}
    with checkpointing.Checkpointer(str(tmp_path), keep=5) as ckpt:
        for u in range(7):
            if u in (4, 6):
                ledger = accounting.Ledger()
                ledger.record(Q, SIGMA, u)
                ckpt.save(u, pytrees={"params": {"w": jnp.full(3, float(u))}, "update": jnp.asarray(u, jnp.int32)},
                          json_items={"ledger": ledger.to_dict(), "config": json.loads(config_to_json(config)),
                                      "individual": h.checkpoint_item(str(tmp_path), u, write=True)})
                recorders[u] = NormRecorder.from_state_dict(h.recorder.state_dict())
            if h.due(u):
                h.record(u, rng.uniform(0, 2, 9), rng.uniform(0, 1, 9))
    _flip_norms_byte(tmp_path / "individual_norms" / "6.npz")
    resumed = hook.IndividualHook.create(9, grid_width=1 / 8, every=2)
    with checkpointing.Checkpointer(str(tmp_path), read_only=True) as ckpt:
        ckpt.restore(6)  # the orbax checkpoint itself is intact
        read = functools.partial(resume.read_checkpoint, ckpt, config=config, workdir=str(tmp_path), targets=None,
                                 plan=plan, individual=resumed)
        with pytest.raises(checkpointing.CorruptCheckpoint, match=r"checkpoints/6 is corrupt: item 'individual': "
                           r"norm recorder .*individual_norms/6\.npz'?: SHA-256 .* differs"):
            read(6)
        restored, skipped = checkpointing.newest_intact(ckpt, read, report=lambda m: None)
    assert restored.step == 4 and [s for s, _ in skipped] == [6] and "'individual'" in skipped[0][1]
    got = restored.json_items["individual"]
    assert isinstance(got, NormRecorder) and got.update_indices.tolist() == [0, 2]
    np.testing.assert_array_equal(got.update_indices, recorders[4].update_indices)
    np.testing.assert_array_equal(got.bins, recorders[4].bins)
    # an item written before the digest was recorded: read unchecked, and counted as such (never silent)
    with checkpointing.Checkpointer(str(tmp_path), read_only=True) as ckpt:
        restored = ckpt.restore(4)
        unchecked = restored.unchecked
        restored.json_items["individual"].pop("sha256")
        got = resume.read_individual(resumed, restored, ckpt.directory, str(tmp_path))
    assert restored.unchecked == unchecked + 1 and got.update_indices.tolist() == [0, 2]
