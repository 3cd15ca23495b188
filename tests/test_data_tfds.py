"""ImageNet / Places-365 through tiny TFDS data sets written in the real on-disk format (no TF)."""
import os

import numpy as np
import pytest

from dpft.data import fake, imagenet, places365
from dpft.errors import DataError


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tfds"))
    fake.write_fake_imagenet(d, n_train=10, n_validation=4, image_size=16)
    fake.write_fake_places365(d, n_train=7, n_validation=3, image_size=16)
    return d


def _label_from_pixels(img):
    c = np.round(img.reshape(-1, 3).mean(0) / 25).astype(int)
    return int(c[0] + 10 * c[1] + 100 * c[2])


@pytest.mark.parametrize("mod, name, n_train, n_val", [(imagenet, "imagenet2012", 10, 4),
                                                       (places365, "places365_small", 7, 3)])
def test_splits_and_records(data_dir, mod, name, n_train, n_val):
    assert os.path.exists(os.path.join(data_dir, name))
    splits = mod.load_splits(data_dir, holdout=3)
    assert {k: len(v) for k, v in splits.items()} == {"train": n_train - 3, "validation": 3, "test": n_val}
    assert splits["train"].num_classes == (1000 if name == "imagenet2012" else 365)
    ids = []
    for split, t in splits.items():
        for i, r in enumerate(t.records()):
            assert r["image"].dtype == np.uint8 and r["image"].shape == (16, 16, 3)
            assert r["label"] == _label_from_pixels(r["image"])
            assert r["patient_id"] == str(r["example_id"]) and r["attrs"] == {}
            ids.append(r["example_id"])
    # train = first n-3 positions of TFDS train, validation = last 3, test offset by n_train.
    assert ids == list(range(n_train)) + list(range(n_train, n_train + n_val))
    with pytest.raises(DataError, match="holdout"):
        mod.load_splits(data_dir, holdout=n_train)


def test_split_arithmetic():
    tr, va = imagenet.split_positions(1_281_167, 10_000)
    assert (len(tr), len(va), tr[-1], va[0], va[-1]) == (1_271_167, 10_000, 1_271_166, 1_271_167, 1_281_166)


def test_missing_dir_says_what_to_run(tmp_path):
    with pytest.raises(DataError, match=r"tfds build imagenet2012 .*--manual_dir"):
        imagenet.load_splits(str(tmp_path))
    with pytest.raises(DataError, match="tfds build places365_small"):
        places365.load_splits(str(tmp_path))
