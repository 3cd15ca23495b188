"""Age bins, race/insurance grouping, imbalance subsampling, and the embedded digits set."""
import numpy as np
import pytest

from dpft.data import digits, subgroups
from dpft.errors import DataError
from dpft.data.base import TableMeta, from_records


def test_age_bins_brute_force():
    edges = (18, 40, 60, 80)
    labels = ["0-18", "18-40", "40-60", "60-80", "80+"]
    for age in np.arange(0, 100, 0.5):
        want = labels[sum(age >= e for e in edges)]  # count of edges at or below the age
        assert subgroups.age_bin(age, edges) == want
    assert subgroups.age_bin("", edges) == "Unknown" and subgroups.age_bin(None) == "Unknown"
    assert subgroups.age_bin_labels((30, 65)) == ("0-30", "30-65", "65+")
    assert subgroups.age_bin(65, (30, 65)) == "65+"
    with pytest.raises(DataError, match="age_edges"):
        subgroups.age_bin(3, (40, 18))


@pytest.mark.parametrize("raw, group", [
    ("White", "White"), ("White, non-Hispanic", "White"), ("WHITE - RUSSIAN", "White"), ("White, Hispanic", "White"),
    ("Black or African American", "Black"), ("BLACK/CAPE VERDEAN", "Black"), ("African American", "Black"),
    ("Asian", "Asian"), ("ASIAN - SOUTH EAST ASIAN", "Asian"), ("Asian, Hispanic", "Asian"),
    ("Native Hawaiian or Other Pacific Islander", "Other"), ("HISPANIC OR LATINO", "Other"),
    ("American Indian or Alaska Native", "Other"), ("Other", "Other"), ("MULTIPLE RACE/ETHNICITY", "Other"),
    ("", "Unknown"), (None, "Unknown"), (float("nan"), "Unknown"), ("Unknown", "Unknown"),
    ("Patient Refused", "Unknown"), ("UNABLE TO OBTAIN", "Unknown"), ("PATIENT DECLINED TO ANSWER", "Unknown"),
])
def test_race_grouping(raw, group):
    assert subgroups.group_race(raw) == group


def test_a_persons_race_ignores_unknowns_and_keeps_conflicts_apart():
    """The review's case: [UNKNOWN, UNKNOWN, BLACK/AFRICAN AMERICAN] is Black (unknowns are not a vote);
    two documented groups are Conflicting whatever their counts or spelling; variants of one group agree."""
    assert subgroups.person_race(["UNKNOWN", "UNKNOWN", "BLACK/AFRICAN AMERICAN"]) == "Black"
    assert subgroups.person_race(["WHITE", "WHITE", "ASIAN - CHINESE"]) == "Conflicting"
    assert subgroups.person_race(["ASIAN - CHINESE", "WHITE", "WHITE"]) == "Conflicting"  # no alphabetical pick
    assert subgroups.person_race(["WHITE - OTHER EUROPEAN", "White", "PATIENT DECLINED TO ANSWER"]) == "White"
    assert subgroups.person_race(["", "UNABLE TO OBTAIN"]) == subgroups.person_race([]) == "Unknown"
    assert "Conflicting" in subgroups.RACE_GROUPS and "Conflicting" in subgroups.RACE_RULE


def test_insurance_and_sex():
    assert [subgroups.group_insurance(v) for v in ["Medicare", "Medicaid", "Private", "Other", ""]] == \
        ["Medicare", "Medicaid", "Other", "Other", "Unknown"]
    assert [subgroups.group_sex(v) for v in ["M", "Female", "Unknown", ""]] == ["Male", "Female", "Unknown", "Unknown"]


def _table(n_major, n_minor):
    meta = TableMeta(name="t", task="multiclass", class_names=("a",), attribute_names=("g",))
    groups = ["min"] * n_minor + ["maj"] * n_major
    np.random.default_rng(0).shuffle(groups)
    return from_records([{"example_id": i, "patient_id": str(i), "image": None, "label": 0, "attrs": {"g": g}}
                         for i, g in enumerate(groups)], split="train", meta=meta)


@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.1, 0.3])
def test_imbalance_fraction(fraction):
    table = _table(n_major=9990, n_minor=5000)
    cfg = subgroups.ImbalanceConfig("g", "min", fraction, seed=4)
    sub = subgroups.subsample_subgroup(table, cfg)
    g = sub.column("attr:g")
    n_min = int((g == "min").sum())
    assert int((g == "maj").sum()) == 9990  # every other row kept
    assert abs(n_min / len(sub) - fraction) <= 0.5 / len(sub) + 1e-12
    ids = sub.column("example_id")
    assert np.all(np.diff(ids) > 0)  # order preserved, no duplicates
    again = subgroups.subsample_subgroup(table, cfg).column("example_id")
    np.testing.assert_array_equal(ids, again)
    if fraction >= 0.01:
        other = subgroups.subsample_subgroup(table, subgroups.ImbalanceConfig("g", "min", fraction, seed=5))
        assert not np.array_equal(ids, other.column("example_id"))


def test_imbalance_errors():
    table = _table(90, 10)
    with pytest.raises(DataError, match="only 10 exist"):
        subgroups.subsample_subgroup(table, subgroups.ImbalanceConfig("g", "min", 0.5))
    with pytest.raises(DataError, match="no rows with g='x'"):
        subgroups.subsample_subgroup(table, subgroups.ImbalanceConfig("g", "x", 0.1))


def test_digits_splits_and_minority():
    splits = digits.load_splits(image_size=16, minority_fraction=0.1, seed=0)
    assert set(splits) == {"public", "train", "validation", "test"}
    ids = np.concatenate([t.column("example_id") for t in splits.values()])
    assert len(set(ids.tolist())) == len(ids)
    g = splits["train"].column("attr:group")
    assert abs((g == "minority").mean() - 0.1) < 0.01
    assert (splits["public"].column("attr:group") == "majority").all()
    assert abs((splits["test"].column("attr:group") == "minority").mean() - 0.5) < 0.01
    up, labels = digits.digit_images(16, 3)
    for r in splits["test"].records():
        img = r["image"]
        assert img.shape == (16, 16, 3) and img.dtype == np.uint8 and r["label"] == labels[r["example_id"]]
        expected = np.rot90(up[r["example_id"]], 1) if r["attrs"]["group"] == "minority" else up[r["example_id"]]
        # Rotating 8x8 then upsampling equals upsampling then rotating, up to rounding.
        assert np.abs(img.astype(int) - expected.astype(int)).max() <= 1
    with pytest.raises(DataError, match="rotation"):
        digits.load_splits(rotation=45)


def test_each_run_seed_draws_its_own_minority_subsample():
    """The train split's minority comes from the run's seed (`minority_seed` -1, resolved by
    `build.load_tables`): seeds 0, 1, 2 keep different minority examples, each the same count; the
    other splits stay put; run seed 0 keeps what option seed 0 gave before (subsample seed 1)."""
    from dpft.config import build
    from dpft.demo.recipe import recipe
    minority, others = [], []
    for seed in (0, 1, 2):
        tables = build.load_tables(recipe(private=True, updates=1, seed=seed, num_devices=1, minority_fraction=0.05))
        train = tables["train"]
        minority.append(frozenset(train.column("example_id")[train.column("attr:group") == "minority"].tolist()))
        others.append(tables["test"].column("example_id").tolist())
    assert len({len(m) for m in minority}) == 1 and len(set(minority)) == 3
    assert others[0] == others[1] == others[2]
    before = digits.load_splits(split_fractions=(0.2, 0.55, 0.1, 0.15), minority_fraction=0.05,
                                eval_minority_fraction=0.1, minority_seed=0)["train"]
    assert minority[0] == frozenset(before.column("example_id")[before.column("attr:group") == "minority"].tolist())
    with pytest.raises(DataError, match="minority_seed"):
        digits.load_splits(minority_seed=-2)
