"""The grain pipeline: Poisson-driven batches, shards, augmult, determinism, resume, eval."""
import io
import itertools

import numpy as np
import pytest
from PIL import Image

from dpft.data.augment import AugmentConfig, decode_image, eval_view, example_rng, train_views
from dpft.errors import DataError
from dpft.data.base import TableMeta, from_records
from dpft.data.pipeline import TrainConfig, TrainIterator, eval_batches, num_eval_batches
from dpft.privacy.sampling import poisson_selection

AUG = AugmentConfig(image_size=8, crop="pad_crop", pad=2, augmult=3, mean=(0.5,) * 3, std=(0.25,) * 3)


def make_table(n=40, task="multiclass", encoded=False, split="train"):
    rng = np.random.default_rng(0)
    L = 4
    meta = TableMeta(name="toy", task=task, class_names=tuple(f"c{i}" for i in range(L if task == "multilabel" else 5)),
                     attribute_names=("group",))
    recs = []
    for i in range(n):
        img = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
        if encoded:
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            img = buf.getvalue()
        r = {"example_id": 1000 + i, "patient_id": f"p{i // 2}", "image": img,
             "attrs": {"group": "a" if i % 3 else "b"}}
        if task == "multilabel":
            r["label"] = rng.integers(0, 2, L).astype(np.float32)
            r["label_mask"] = rng.integers(0, 2, L).astype(np.float32)
        else:
            r["label"] = i % 5
        recs.append(r)
    return from_records(recs, split=split, meta=meta)


def collect(it, updates):
    out = []
    for _ in range(updates):
        out.append(list(it.update_batches()))
    return out


def test_shapes_labels_and_selection():
    table = make_table(task="multilabel")
    cfg = TrainConfig(sampling_rate=0.3, physical_batch_size=4, seed=3, selection_seed=3)
    it = TrainIterator(table, cfg, AUG)
    for u, batches in enumerate(collect(it, 4)):
        sel = poisson_selection(3, u, len(table), 0.3)
        ids = np.concatenate([b["example_id"] for b in batches])
        mask = np.concatenate([b["mask"] for b in batches])
        assert mask.sum() == len(sel)
        real = ids[mask > 0]
        assert len(set(real.tolist())) == len(real)  # no example twice in one update
        np.testing.assert_array_equal(np.sort(real), 1000 + sel)
        assert np.all(ids[mask == 0] == -1)
        for b in batches:
            assert b["image"].shape == (4, 3, 8, 8, 3) and b["image"].dtype == np.float32
            assert b["label"].shape == (4, 3, 4) and b["label_mask"].shape == (4, 3, 4)
            assert b["example_id"].dtype == np.int32 and b["mask"].dtype == np.float32
            for r in range(4):
                if b["mask"][r]:
                    rec = table[int(b["example_id"][r]) - 1000]
                    for k in range(3):
                        np.testing.assert_array_equal(b["label"][r, k], rec["label"])
                        np.testing.assert_array_equal(b["label_mask"][r, k], rec["label_mask"])
                else:
                    assert not b["image"][r].any() and not b["label_mask"][r].any()
    assert it.state == {"update_index": 4, "physical_batch_index": 0}


def test_multiclass_labels_repeated_and_views_differ():
    table = make_table()
    it = TrainIterator(table, TrainConfig(sampling_rate=0.5, physical_batch_size=8, seed=1, selection_seed=1), AUG)
    b = next(iter(it))
    r = int(np.flatnonzero(b["mask"])[0])
    assert b["label"].shape == (8, 3) and b["label"].dtype == np.int32
    assert np.all(b["label"][r] == table[int(b["example_id"][r]) - 1000]["label"])
    views = b["image"][r]
    assert not np.allclose(views[0], views[1]) or not np.allclose(views[1], views[2])


@pytest.mark.parametrize("num_shards", [2, 3])
def test_shards_partition_selection(num_shards):
    table = make_table(n=60)
    per_shard = []
    for s in range(num_shards):
        cfg = TrainConfig(sampling_rate=0.4, physical_batch_size=4, seed=5, selection_seed=5, num_shards=num_shards, shard_index=s)
        per_shard.append(list(TrainIterator(table, cfg, AUG).batches_for_update(2)))
    assert len({len(b) for b in per_shard}) == 1  # same number of physical batches on every host
    ids = [np.concatenate([b["example_id"][b["mask"] > 0] for b in bs]) for bs in per_shard]
    union = np.concatenate(ids)
    assert len(set(union.tolist())) == len(union)
    np.testing.assert_array_equal(np.sort(union), 1000 + poisson_selection(5, 2, 60, 0.4))


def test_deterministic_and_workers_agree():
    table = make_table(encoded=True)
    cfg0 = TrainConfig(sampling_rate=0.4, physical_batch_size=4, seed=7, selection_seed=7, num_workers=0)
    cfg2 = TrainConfig(sampling_rate=0.4, physical_batch_size=4, seed=7, selection_seed=7, num_workers=2)
    a, b = collect(TrainIterator(table, cfg0, AUG), 2), collect(TrainIterator(table, cfg2, AUG), 2)
    for ua, ub in zip(a, b):
        assert len(ua) == len(ub)
        for x, y in zip(ua, ub):
            for k in x:
                np.testing.assert_array_equal(x[k], y[k])
    other = collect(TrainIterator(table, TrainConfig(sampling_rate=0.4, physical_batch_size=4, seed=8, selection_seed=8), AUG), 1)
    assert not np.array_equal(np.concatenate([x["example_id"] for x in a[0]]),
                              np.concatenate([x["example_id"] for x in other[0]]))


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_worker_processes_give_the_same_batches_as_one_thread(task):
    """Decoding in spawned processes is bitwise the same as in the calling thread, and a resume
    mid-update works with processes too."""
    table = make_table(n=30, task=task, encoded=True)
    cfg0 = TrainConfig(sampling_rate=0.5, physical_batch_size=4, seed=5, selection_seed=5)
    cfgp = TrainConfig(sampling_rate=0.5, physical_batch_size=4, seed=5, selection_seed=5, worker_processes=2)
    ref = collect(TrainIterator(table, cfg0, AUG), 2)
    it = TrainIterator(table, cfgp, AUG)
    got = collect(it, 2)
    assert [len(u) for u in got] == [len(u) for u in ref] and len(ref[0]) > 1
    for ua, ub in zip(ref, got):
        for x, y in zip(ua, ub):
            assert x.keys() == y.keys()
            for k in x:
                np.testing.assert_array_equal(x[k], y[k])
    resumed = TrainIterator(table, cfgp, AUG, state={"update_index": 1, "physical_batch_index": 1})
    rest = list(resumed.update_batches())
    for x, y in zip(rest, ref[1][1:]):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    with pytest.raises(DataError):
        TrainConfig(sampling_rate=0.5, physical_batch_size=4, worker_processes=-1)


def test_resume_mid_update_gives_same_batches():
    table = make_table(n=50)
    cfg = TrainConfig(sampling_rate=0.5, physical_batch_size=4, seed=11, selection_seed=11)
    ref = list(itertools.islice(iter(TrainIterator(table, cfg, AUG)), 25))
    it = TrainIterator(table, cfg, AUG)
    stream = iter(it)
    first = list(itertools.islice(stream, 9))
    state = it.get_state()
    assert state["physical_batch_index"] > 0  # the cut is inside an update (25 selected -> 7 chunks)
    resumed = TrainIterator(table, cfg, AUG, state=dict(state))
    rest = list(itertools.islice(iter(resumed), 16))
    for x, y in zip(first + rest, ref):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    with pytest.raises(DataError, match="update_index"):
        it.set_state({"update": 1})


def test_augment_views_deterministic_and_eval_crop():
    img = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    cfg = AugmentConfig(image_size=16, augmult=4, mean=(0.0,) * 3, std=(1.0,) * 3)
    v1 = train_views(img, example_rng(1, 2, 3), cfg)
    v2 = train_views(img, example_rng(1, 2, 3), cfg)
    np.testing.assert_array_equal(v1, v2)
    assert v1.shape == (4, 16, 16, 3)
    assert not np.array_equal(v1, train_views(img, example_rng(1, 3, 3), cfg))
    # Eval: shorter side to round(16 / 0.875) = 18, centre crop 16: compare with PIL directly.
    e = eval_view(img, cfg)
    ref = Image.fromarray(img).resize((27, 18), Image.BILINEAR).crop((5, 1, 21, 17))
    np.testing.assert_allclose(e, np.asarray(ref, np.float32) / 255.0, atol=1e-6)
    # pad_crop with pad 0 and no flip is the identity (after resize).
    ident = AugmentConfig(image_size=20, crop="pad_crop", pad=0, flip=False, mean=(0.0,) * 3, std=(1.0,) * 3)
    sq = img[:, :20]
    np.testing.assert_allclose(train_views(sq, example_rng(0, 0, 0), ident)[0], sq / 255.0, atol=1e-6)


def test_eval_batches_cover_split_in_order():
    table = make_table(n=23, task="multilabel")
    aug = AugmentConfig(image_size=8)
    for shards in (1, 2):
        got = []
        for s in range(shards):
            bs = list(eval_batches(table, batch_size=5, augment=aug, num_shards=shards, shard_index=s))
            assert len(bs) == num_eval_batches(23, 5, shards)
            got.append(bs)
        order = []
        for g in range(len(got[0])):
            for s in range(shards):
                b = got[s][g]
                assert b["image"].shape == (5, 8, 8, 3) and b["label"].shape == (5, 4)
                order += b["example_id"][b["mask"] > 0].tolist()
                pad = b["mask"] == 0
                assert np.all(b["example_id"][pad] == -1) and np.all(b["patient_id"][pad] == "")
                for r in np.flatnonzero(~pad):
                    rec = table[int(b["example_id"][r]) - 1000]
                    assert b["patient_id"][r] == rec["patient_id"] and b["attr_group"][r] == rec["attrs"]["group"]
        assert order == list(range(1000, 1023))


def test_bad_image_error_and_skip(tmp_path):
    good = tmp_path / "good.jpg"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(good)
    data = good.read_bytes()
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(data[: len(data) // 2])
    meta = TableMeta(name="toy", task="multiclass", class_names=("a", "b"))
    recs = [{"example_id": i, "patient_id": str(i), "image": str(bad if i == 1 else good), "label": 0, "attrs": {}}
            for i in range(3)]
    table = from_records(recs, split="train", meta=meta)
    with pytest.raises(DataError, match="bad.jpg"):
        decode_image(str(bad))
    cfg = TrainConfig(sampling_rate=1.0, physical_batch_size=4, selection_seed=0)
    with pytest.raises(DataError, match=r"toy/train row 1.*bad\.jpg"):
        list(TrainIterator(table, cfg, AUG).update_batches())
    it = TrainIterator(table, TrainConfig(sampling_rate=1.0, physical_batch_size=4, on_bad_image="skip", selection_seed=0), AUG)
    (b,) = list(it.update_batches())
    assert b["mask"].tolist() == [1, 0, 1, 0] and b["example_id"].tolist() == [0, -1, 2, -1]
    assert it.skipped_images == 1
    with pytest.raises(DataError, match="on_bad_image"):
        TrainConfig(sampling_rate=0.1, physical_batch_size=4, on_bad_image="ignore")
