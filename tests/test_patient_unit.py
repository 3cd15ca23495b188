"""The patient as the privacy unit (`dpft.privacy.units`, config.privacy.unit="patient").

Per-patient clipped sums against brute force (a loop over patients of the clipped sum of their
per-image gradients, each image's K views averaged; no view_weight, no unit rows), both engines,
flat and automatic clipping, augmult, empty slots and padding units, 8 devices; removing one patient
moves the sum by <= C (1 + 1e-4) in bfloat16; the unit index, its cap and the per-update subsets; the
training pipeline's unit rows against the table.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dpft.privacy import adapters, bookkeeping, engine, keys, units
from dpft.privacy import plan as plan_lib
from dpft.privacy.engine import ClippingConfig

F32 = jnp.float32
CLASSES = 3
CAP, K = 3, 2
#: Real images of each unit row (0: a padding unit, mask 0).
SIZES = (3, 1, 2, 0, 3, 2)
ENGINES = {"vmap": engine.clipped_grad_sum, "bookkeeping": bookkeeping.bk_clipped_grad_sum}


class SmallCNN(nnx.Module):
    """conv - GroupNorm - relu - mean pool - linear: deterministic (no dropout), so a unit's forward
    pass over its stacked images equals per-image passes."""

    def __init__(self, dtype=F32):
        rngs = nnx.Rngs(0)
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs, dtype=dtype)
        self.norm = nnx.GroupNorm(4, num_groups=2, rngs=rngs, dtype=dtype)
        self.head = nnx.Linear(4, CLASSES, rngs=rngs, dtype=dtype)

    def __call__(self, x):
        h = jax.nn.relu(self.norm(self.conv(x)))
        return self.head(jnp.mean(h, axis=(1, 2))).astype(F32)


@functools.lru_cache(maxsize=None)
def setup(dtype=F32):
    loss_fn, params, _ = adapters.nnx_loss_fn(SmallCNN(dtype), adapters.softmax_cross_entropy_loss)
    return loss_fn, params


def unit_batch(sizes=SIZES, seed=0) -> dict:
    """Unit rows as the pipeline makes them: image [P, CAP*K, 8, 8, 3] (empty slots hold random
    images: their weight, not their content, must remove them), label, view_weight, mask, example_id."""
    rs = np.random.RandomState(seed)
    p = len(sizes)
    weight = np.zeros([p, CAP, K], np.float32)
    for i, s in enumerate(sizes):
        weight[i, :s] = 1.0 / K
    return {"image": rs.randn(p, CAP * K, 8, 8, 3).astype(np.float32),
            "label": np.repeat(rs.randint(0, CLASSES, (p, CAP)), K, axis=1).astype(np.int32),
            "view_weight": weight.reshape(p, CAP * K),
            "mask": np.asarray([float(s > 0) for s in sizes], np.float32),
            "example_id": np.asarray([i if s > 0 else -1 for i, s in enumerate(sizes)], np.int32)}


def brute_force(loss_fn, params, batch, clipping):
    """sum over real patients of clip(sum over their real images of grad(mean over K views of the loss))."""
    total = jax.tree.map(lambda p: np.zeros(p.shape, np.float64), params)
    norms = []
    for i in range(batch["mask"].shape[0]):
        if batch["mask"][i] == 0:
            norms.append(0.0)
            continue
        g = jax.tree.map(lambda p: np.zeros(p.shape, np.float64), params)
        for j in range(CAP):
            rows = slice(j * K, (j + 1) * K)
            if batch["view_weight"][i, rows].sum() == 0:
                continue
            views = {"image": jnp.asarray(batch["image"][i, rows]), "label": jnp.asarray(batch["label"][i, rows])}
            gj = jax.grad(lambda p: loss_fn(p, views, jax.random.key(0))[0])(params)
            g = jax.tree.map(lambda a, b: a + np.asarray(b, np.float64), g, gj)
        n = float(np.sqrt(sum(np.sum(x ** 2) for x in jax.tree.leaves(g))))
        factor = (min(1.0, clipping.clip_norm / n) if clipping.mode == "flat"
                  else clipping.clip_norm / (n + clipping.gamma))
        total = jax.tree.map(lambda a, b: a + factor * b, total, g)
        norms.append(n)
    return total, np.asarray(norms)


def assert_close(got, want, rtol=2e-5):
    scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(want))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("method", sorted(ENGINES))
@pytest.mark.parametrize("mode", ["flat", "automatic"])
def test_patient_clipped_sum_equals_a_loop_over_patients(method, mode):
    loss_fn, params = setup()
    batch = unit_batch()
    clipping = ClippingConfig(mode=mode, clip_norm=0.05, gamma=0.01)
    want, want_norms = brute_force(loss_fn, params, batch, clipping)
    assert np.all(want_norms[np.asarray(SIZES) > 0] > 0.05)  # flat clipping binds on every patient
    fn = ENGINES[method]
    got, stats = jax.jit(lambda p, b: fn(loss_fn, p, b, jax.random.key(1), clipping=clipping, microbatch_size=3)
                         )(params, {k: jnp.asarray(v) for k, v in batch.items()})
    assert_close(got, want)
    np.testing.assert_allclose(np.asarray(stats["norms"]), want_norms, rtol=2e-5)


@pytest.mark.slow  # quick tier: the brute-force sums above (docs/running.md)
def test_eight_devices_equal_the_loop_over_patients():
    from dpft import distributed
    from dpft.train import step as step_lib
    if jax.device_count() < 8:
        pytest.skip("needs 8 fake devices (tests/conftest.py)")
    loss_fn, params = setup()
    sizes = SIZES + (1, 3, 0, 2, 2, 1, 3, 1, 2, 2)  # 16 unit rows, two per device
    batch = unit_batch(sizes, seed=3)
    clipping = ClippingConfig(mode="flat", clip_norm=0.05)
    want, _ = brute_force(loss_fn, params, batch, clipping)
    mesh = distributed.make_data_mesh(jax.devices()[:8])
    for method in sorted(ENGINES):
        plan = plan_lib.fixed_plan(clipping=clipping, noise_multiplier=0.0, expected_batch_size=8.0, params=params,
                                   secret=keys.RunSecret.insecure_fixed(0), grad_method=method)
        accumulate = step_lib.make_accumulate_fn(loss_fn, step_lib.StepConfig(plan=plan, microbatch_size=1), mesh)
        acc, _ = accumulate(distributed.replicate(params, mesh), step_lib.zeros_accumulator(params, mesh),
                            distributed.shard_batch(batch, mesh), jax.random.key(5))
        assert_close(step_lib.global_sum(acc, mesh), want)


@pytest.mark.slow  # quick tier: the brute-force sums above (docs/running.md)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_removing_one_patient_moves_the_sum_by_at_most_c(dtype):
    """Aligned patients (copies of one patient with two images and an empty slot), both engines and
    every ghost route: ||S - S_-p|| <= C (1 + 1e-4), and >= C (1 - 1e-3) (each is clipped)."""
    from dpft.privacy.sensitivity import aligned_batch, removal_distances
    loss_fn, params = setup(dtype)
    one = unit_batch((2,), seed=4)
    base = {k: one[k][0] for k in ("image", "label", "view_weight")}
    size, c = 16, 0.01
    batch = aligned_batch(base, size)
    clipping = ClippingConfig(mode="flat", clip_norm=c)
    variants = {"vmap": functools.partial(engine.clipped_grad_sum, loss_fn)}
    for ghost in bookkeeping.GHOST_CHOICES:
        variants[f"bookkeeping/{ghost}"] = functools.partial(bookkeeping.bk_clipped_grad_sum, loss_fn, ghost=ghost)
    idx = [0, size // 2, size - 1]
    for name, fn in variants.items():
        sum_fn = jax.jit(lambda b, fn=fn: fn(params, b, jax.random.key(0), clipping=clipping, microbatch_size=size)[0])
        d = removal_distances(sum_fn, batch, idx)
        assert np.all(d <= c * (1 + 1e-4)) and np.all(d >= c * (1 - 1e-3)), (name, d / c)


# ----------------------------------------------------------------------------- the unit index

def test_unit_index_groups_rows_by_patient_and_draws_subsets_within_the_cap():
    ids = ["a", "b", "a", "c", "a", "b", "a", "a"]
    index = units.UnitIndex.from_patient_ids(ids, cap=3)
    assert index.names == ("a", "b", "c") and index.num_units == 3
    assert [index.rows_of(u).tolist() for u in range(3)] == [[0, 2, 4, 6, 7], [1, 5], [3]]
    rows = units.unit_rows(index, np.array([0, 2, -1]), seed=9, update_index=4)
    assert rows.shape == (3, 3) and rows[1].tolist() == [3, -1, -1] and rows[2].tolist() == [-1, -1, -1]
    assert set(rows[0]) <= {0, 2, 4, 6, 7} and len(set(rows[0])) == 3 and list(rows[0]) == sorted(rows[0])
    again = units.unit_rows(index, np.array([0, 2, -1]), seed=9, update_index=4)
    assert np.array_equal(rows, again)  # a pure function of (seed, update, unit): every host, every resume
    drawn = {tuple(units.unit_rows(index, np.array([0]), seed=9, update_index=u)[0]) for u in range(60)}
    assert len(drawn) == 10  # every 3-subset of 5 images turns up: the cap rotates the images used
    summary = index.summary()
    assert summary["units_over_cap"] == 1 and summary["fraction_of_rows_within_cap"] == pytest.approx(6 / 8)
    assert summary["rows_per_unit"] == {"1": 1, "2": 1, "5": 1}


def test_cap_from_the_data_keeps_95_percent_of_the_images():
    sizes = np.asarray([1] * 80 + [2] * 15 + [10] * 5)  # 160 images
    cap = units.choose_cap(sizes)
    kept = lambda k: np.minimum(sizes, k).sum() / sizes.sum()
    assert kept(cap) >= units.CAP_KEEP_FRACTION > kept(cap - 1)
    assert units.choose_cap(np.asarray([2, 2, 2])) == 2 and units.choose_cap(np.asarray([1])) == 1


@pytest.mark.parametrize("ids,cap,match", [
    (["a", "", "b"], 0, r"rows \[1\]"), (["a", None], 0, "patient id on every row"), (["a"], 0.5, "unit_cap"),
    (["a"], 0, None)])
def test_unit_index_refuses_missing_ids_and_bad_caps(ids, cap, match):
    if match is None:
        assert units.UnitIndex.from_patient_ids(ids, cap).cap == 1
        return
    with pytest.raises(ValueError, match=match):
        units.UnitIndex.from_patient_ids(ids, cap)


# ----------------------------------------------------------------------------- the pipeline

def test_training_batches_hold_each_sampled_patients_images(tmp_path):
    from dpft.data import fake, pipeline
    from dpft.data.augment import AugmentConfig
    from dpft.data import load_splits
    from dpft.privacy.sampling import poisson_selection
    fake.write_fake_chexpert(str(tmp_path), n_patients=12, n_valid_patients=3, seed=1)
    table = load_splits("chexpert", str(tmp_path))["train"]
    index = units.UnitIndex.from_patient_ids(table.column("patient_id"), cap=2)
    assert index.sizes.max() > 2  # some patient is over the cap
    aug = AugmentConfig(image_size=8, augmult=K, crop="none", flip=False)
    cfg = pipeline.TrainConfig(sampling_rate=0.7, physical_batch_size=2, selection_seed=11)
    it = pipeline.TrainIterator(table, cfg, aug, units=index)
    labels = np.asarray([table[i]["label"] for i in range(len(table))])
    for u in range(3):
        chosen = poisson_selection(11, u, index.num_units, 0.7)
        batches = list(it.update_batches())
        ids = np.concatenate([b["example_id"] for b in batches])
        assert sorted(ids[ids >= 0].tolist()) == chosen.tolist()
        want_rows = units.unit_rows(index, chosen, seed=11, update_index=u)
        for b in batches:
            assert b["image"].shape == (2, 2 * K, 8, 8, 3) and b["view_weight"].shape == (2, 2 * K)
            for row, unit in enumerate(b["example_id"]):
                if unit < 0:
                    assert b["mask"][row] == 0 and not b["view_weight"][row].any()
                    continue
                pos = want_rows[chosen.tolist().index(unit)]
                assert set(pos[pos >= 0]) <= set(index.rows_of(unit))
                w = b["view_weight"][row].reshape(2, K)
                np.testing.assert_array_equal(w, np.repeat((pos >= 0)[:, None] / K, K, axis=1))
                got = b["label"][row].reshape((2, K) + labels.shape[1:])[pos >= 0, 0]
                np.testing.assert_array_equal(got, labels[pos[pos >= 0]])
    assert it.expected_batch_size == pytest.approx(0.7 * index.num_units)


# ----------------------------------------------------------------------------- the demo's pieces

def test_digits_patients_groups_digits_into_disjoint_single_group_patients():
    import collections

    from dpft.data import load_splits
    base = load_splits("digits", image_size=8)
    grouped = load_splits("digits_patients", image_size=8, max_images_per_patient=4)
    seen = {}
    for split, table in grouped.items():
        assert len(table) == len(base[split])
        by_patient = collections.defaultdict(list)
        for i in range(len(table)):
            rec, ref = table[i], base[split][i]
            assert rec["example_id"] == ref["example_id"] and rec["label"] == ref["label"]
            np.testing.assert_array_equal(rec["image"], ref["image"])
            by_patient[rec["patient_id"]].append(rec["attrs"]["group"])
        assert all(1 <= len(g) <= 4 and len(set(g)) == 1 for g in by_patient.values())  # one group per patient
        assert max(len(g) for g in by_patient.values()) == 4
        for p in by_patient:
            assert seen.setdefault(p, split) == split  # no patient in two splits


@pytest.mark.slow  # quick tier: the brute-force sums above (docs/running.md)
def test_noise_for_a_patients_epsilon_is_the_smallest_that_reaches_it():
    from dpft.privacy import group
    q, steps, delta, k = 0.25, 10, 1e-4, 4
    sigma = group.noise_for_group_epsilon(8.0, q, steps, delta, k, tolerance=1e-2)
    eps = lambda s: group.group_epsilon([(q, s, steps)], k, delta)
    assert eps(sigma) <= 8.0 < eps(sigma * (1 - 2e-2))
    assert sigma > group.noise_for_group_epsilon(8.0, q, steps, delta, 1, tolerance=1e-2)  # more images: more noise
