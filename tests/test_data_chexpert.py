"""CheXpert loader on fake copies in the real on-disk format."""
import os
import shutil

import numpy as np
import pandas as pd
import pytest

from dpft import cli
from dpft.data import chexpert, fake, load_splits
from dpft.errors import DataError
from dpft.data.base import read_index

# Expected (label, mask) per raw value and policy, written out by hand (not via the loader).
EXPECTED = {
    "ones": {"1.0": (1, 1), "0.0": (0, 1), "-1.0": (1, 1), "": (0, 1)},
    "zeros": {"1.0": (1, 1), "0.0": (0, 1), "-1.0": (0, 1), "": (0, 1)},
    "ignore": {"1.0": (1, 1), "0.0": (0, 1), "-1.0": (0, 0), "": (0, 1)},
}
MIXED_ONES = {"Atelectasis", "Edema"}


def expected_label(raw: str, policy: str, column: str, mask_blank: bool = False) -> tuple[int, int]:
    if policy == "mixed":
        table = EXPECTED["ones" if column in MIXED_ONES else "zeros"]
    else:
        table = EXPECTED[policy]
    lab, m = table[raw]
    if raw == "" and mask_blank:
        m = 0
    return lab, m


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return fake.write_fake_chexpert(str(tmp_path_factory.mktemp("chx")), n_patients=12, n_valid_patients=3, seed=1)


def _copy(root, tmp_path):
    dst = str(tmp_path / "copy")
    shutil.copytree(root, dst)
    return dst


def _by_path(splits):
    out = {}
    for name, t in splits.items():
        for r in t.records():
            rel = r["image"].split(os.sep + "CheXpert-v1.0-small" + os.sep, 1)[1]
            out["CheXpert-v1.0-small/" + rel.replace(os.sep, "/")] = (name, r)
    return out


def test_counts_and_split_integrity(root):
    man = fake.read_manifest(root)
    splits = chexpert.load_splits(root, val_fraction=0.3)
    assert len(splits["train"]) + len(splits["validation"]) == man["n_rows"]["train"]
    assert len(splits["test"]) == man["n_rows"]["valid"]
    assert len(splits["validation"]) > 0
    pids = {k: {r["patient_id"] for r in t.records()} for k, t in splits.items()}
    assert not (pids["train"] & pids["validation"]) and not (pids["train"] & pids["test"])
    assert not (pids["validation"] & pids["test"])
    for rel, (split, rec) in _by_path(splits).items():
        assert rec["patient_id"] == man["images"][rel]["patient"]
        assert (split == "test") == (man["images"][rel]["split"] == "valid")
    ids = [r["example_id"] for t in splits.values() for r in t.records()]
    assert len(set(ids)) == len(ids)
    # Stable: loading again gives the same ids and split assignment.
    again = chexpert.load_splits(root, val_fraction=0.3)
    assert [r["example_id"] for r in again["validation"].records()] == \
        [r["example_id"] for r in splits["validation"].records()]


@pytest.mark.parametrize("policy", ["ones", "zeros", "ignore", "mixed"])
@pytest.mark.parametrize("mask_blank", [False, True])
def test_label_policies(root, policy, mask_blank):
    man = fake.read_manifest(root)
    splits = chexpert.load_splits(root, uncertainty=policy, mask_blank=mask_blank)
    seen = set()
    for rel, (_, rec) in _by_path(splits).items():
        raw = man["images"][rel]["labels"]
        for j, col in enumerate(chexpert.LABELS):
            lab, m = expected_label(raw[j], policy, col, mask_blank)
            assert rec["label"][j] == lab and rec["label_mask"][j] == m, (rel, col, raw[j])
            seen.add(raw[j])
    assert seen == {"1.0", "0.0", "-1.0", ""}


def test_attributes_match_writer(root):
    man = fake.read_manifest(root)
    splits = chexpert.load_splits(root)
    assert splits["train"].attribute_names == ("sex", "age", "race")
    races = set()
    for rel, (_, rec) in _by_path(splits).items():
        m = man["images"][rel]
        assert rec["attrs"] == {"sex": m["sex"], "age": m["age_bin"], "race": m["race"]}
        races.add(m["race"])
    assert races == {"White", "Black", "Asian", "Other", "Unknown"}
    assert splits["train"].eval_tasks == chexpert.EVAL_TASKS and splits["train"].task == "multilabel"


def test_frontal_only_and_demo_variants(root, tmp_path):
    man = fake.read_manifest(root)
    splits = chexpert.load_splits(root, frontal_only=True)
    n_frontal = sum(1 for m in man["images"].values() if m["view"] == "Frontal")
    assert sum(len(t) for t in splits.values()) == n_frontal
    d = fake.write_fake_chexpert(str(tmp_path / "csvdemo"), n_patients=12, n_valid_patients=3, seed=1, demo="csv")
    s2 = chexpert.load_splits(d)
    assert _by_path(s2).keys() == _by_path(chexpert.load_splits(root)).keys()
    assert all(r["attrs"]["race"] == man["images"][p]["race"] for p, (_, r) in _by_path(s2).items())
    d3 = fake.write_fake_chexpert(str(tmp_path / "nodemo"), n_patients=12, n_valid_patients=3, seed=1, demo=None)
    assert chexpert.load_splits(d3)["train"].attribute_names == ("sex", "age")


def _edit_csv(path, fn):
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df = fn(df)
    df.to_csv(path, index=False)


def test_rows_left_out_are_counted_per_attribute_group(root):
    """frontal_only: every lateral row is counted, per sex group, in the split it would have joined (train.csv's
    in train or validation, valid.csv's in test), in the tables, the attribute coverage and its printout."""
    from dpft.data import coverage, subgroups

    man = fake.read_manifest(root)["images"]
    tables = chexpert.load_splits(root, frontal_only=True)
    want = {"train.csv": {}, "valid.csv": {}}
    for rel, m in man.items():
        if m["view"] == "Lateral":
            by = want["train.csv" if m["split"] == "train" else "valid.csv"]
            g = subgroups.group_sex(m["sex"])
            by[g] = by.get(g, 0) + 1
    assert sum(want["train.csv"].values()) > 0 and sum(want["valid.csv"].values()) > 0
    why = chexpert.EXCLUDED_VIEW

    def sex_counts(splits):
        out = {}
        for s in splits:
            for g, n in tables[s].excluded.get(why, {}).get("sex", {}).items():
                out[g] = out.get(g, 0) + n
        return out

    assert sex_counts(["train", "validation"]) == want["train.csv"] and sex_counts(["test"]) == want["valid.csv"]
    cov = coverage.attribute_coverage(tables)
    assert cov["attributes"]["sex"]["splits"]["test"]["excluded"][why] == {
        "n": sum(want["valid.csv"].values()), "groups": want["valid.csv"]}
    total = sum(want["train.csv"].values()) + sum(want["valid.csv"].values())
    assert any(line.startswith(f"excluded ({why}): sex {total} (") for line in coverage.format_coverage(cov))
    assert all(not t.excluded for t in chexpert.load_splits(root).values())  # nothing left out by default


def test_missing_column(root, tmp_path):
    d = _copy(root, tmp_path)
    _edit_csv(os.path.join(d, "CheXpert-v1.0-small", "train.csv"), lambda df: df.rename(columns={"Edema": "Oedema"}))
    with pytest.raises(DataError, match=r"train\.csv.*missing column.*Edema"):
        chexpert.load_splits(d)


def test_unknown_label_value(root, tmp_path):
    d = _copy(root, tmp_path)

    def bad(df):
        df.loc[2, "Cardiomegaly"] = "2.0"
        return df
    _edit_csv(os.path.join(d, "CheXpert-v1.0-small", "train.csv"), bad)
    with pytest.raises(DataError, match=r"train\.csv: line 4, column 'Cardiomegaly'.*'2\.0'"):
        chexpert.load_splits(d)


def test_missing_image_error_and_skip(root, tmp_path):
    d = _copy(root, tmp_path)
    man = fake.read_manifest(root)
    rel = sorted(p for p, m in man["images"].items() if m["split"] == "train")[0]
    os.remove(os.path.join(d, rel))
    with pytest.raises(DataError, match="does not exist"):
        chexpert.load_splits(d)
    s = chexpert.load_splits(d, on_bad_image="skip")
    assert sum(len(t) for t in s.values()) == len(man["images"]) - 1


def test_patient_in_two_splits(root, tmp_path):
    d = _copy(root, tmp_path)
    train = pd.read_csv(os.path.join(d, "CheXpert-v1.0-small", "train.csv"), dtype=str, keep_default_na=False)
    _edit_csv(os.path.join(d, "CheXpert-v1.0-small", "valid.csv"), lambda df: pd.concat([df, train.iloc[:1]]))
    with pytest.raises(DataError, match=r"patient 'patient00001'.*train\.csv.*valid\.csv|patient 'patient00001'"):
        chexpert.load_splits(d)


def test_empty_split_and_missing_csv(root, tmp_path):
    d = _copy(root, tmp_path)
    _edit_csv(os.path.join(d, "CheXpert-v1.0-small", "valid.csv"), lambda df: df.iloc[:0])
    with pytest.raises(DataError, match="split 'test' is empty"):
        chexpert.load_splits(d)
    os.remove(os.path.join(d, "CheXpert-v1.0-small", "valid.csv"))
    with pytest.raises(DataError, match=r"valid\.csv: file not found"):
        chexpert.load_splits(d)
    with pytest.raises(DataError, match="unknown option"):
        chexpert.load_splits(root, uncertanty="ones")
    with pytest.raises(DataError, match="uncertainty policy"):
        chexpert.load_splits(root, uncertainty="maybe")


def test_prepare_cli_index_roundtrip_and_truncated_jpeg(root, tmp_path, capsys):
    d = _copy(root, tmp_path)
    out = str(tmp_path / "prep")
    rc = cli.main(["prepare", "chexpert", "--source", d, "--out", out, "--no-progress", "--set", "uncertainty=zeros"])
    assert rc == 0
    direct = chexpert.load_splits(d, uncertainty="zeros")
    cached = read_index(os.path.join(out, "index"))
    assert cached.keys() == direct.keys()
    for k in direct:
        for a, b in zip(direct[k].records(), cached[k].records()):
            assert a["example_id"] == b["example_id"] and a["attrs"] == b["attrs"] and a["image"] == b["image"]
            np.testing.assert_array_equal(a["label"], b["label"])
            np.testing.assert_array_equal(a["label_mask"], b["label_mask"])
    # The index is read by the generic loader (the data set's DatasetSpec says it has one).
    assert load_splits("chexpert", d, index_dir=os.path.join(out, "index"), uncertainty="zeros")["test"][0][
        "example_id"] == direct["test"][0]["example_id"]
    with pytest.raises(DataError, match="rerun `dpft prepare`") as e:
        load_splits("chexpert", d, index_dir=os.path.join(out, "index"), uncertainty="ones")
    assert "uncertainty: index 'zeros', run 'ones'" in str(e.value) and "--set uncertainty=\"ones\"" in str(e.value)
    # --config: the index of the options the run config trains with (the README's prepare -> index_dir path).
    from dpft.config.base import load_config
    medical = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                           "chexpert_nfnet_f0.py")
    assert cli.main(["prepare", "chexpert", "--source", d, "--out", str(tmp_path / "prep2"), "--no-progress",
                     "--config", medical]) == 0
    options = {k: v for k, v in load_config(medical).data.options.to_dict().items() if k != "index_dir"}
    assert options["frontal_only"] is True
    via_index = load_splits("chexpert", d, index_dir=str(tmp_path / "prep2" / "index"), **options)
    assert {k: len(t) for k, t in via_index.items()} == {k: len(t) for k, t in chexpert.load_splits(d, **options).items()}
    assert cli.main(["prepare", "mimic_cxr", "--source", d, "--out", str(tmp_path / "x"), "--config", medical]) == 2
    # Truncate one JPEG: prepare names the file and exits 2; with skip it drops and counts it.
    rel = sorted(fake.read_manifest(root)["images"])[0]
    with open(os.path.join(d, rel), "rb") as f:
        data = f.read()
    with open(os.path.join(d, rel), "wb") as f:
        f.write(data[: len(data) // 2])
    capsys.readouterr()
    assert cli.main(["prepare", "chexpert", "--source", d, "--out", out, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert os.path.basename(rel) in err and "cannot decode" in err
    assert cli.main(["prepare", "chexpert", "--source", d, "--out", out, "--no-progress",
                     "--on-bad-image", "skip"]) == 0
    import json
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["skipped"] == 1
    assert sum(s["examples"] for s in summary["splits"].values()) == len(fake.read_manifest(root)["images"]) - 1


def test_demo_table_by_path_by_loose_name_and_missing(tmp_path, caplog):
    d = fake.write_fake_chexpert(str(tmp_path / "c"), n_patients=12, n_valid_patients=3, seed=1, demo="csv")
    man = fake.read_manifest(d)
    elsewhere = tmp_path / "demo" / "my demographics.csv"
    elsewhere.parent.mkdir()
    shutil.move(os.path.join(d, "CHEXPERT DEMO.csv"), elsewhere)
    with caplog.at_level("WARNING"):
        assert chexpert.load_splits(d)["train"].attribute_names == ("sex", "age")
    assert "NO RACE" in caplog.text and "demo_path" in caplog.text
    s = chexpert.load_splits(d, demo_path=str(elsewhere))
    assert all(r["attrs"]["race"] == man["images"][p]["race"] for p, (_, r) in _by_path(s).items())
    with pytest.raises(DataError, match="demographics table not found"):
        chexpert.load_splits(d, demo_path=str(tmp_path / "nope.xlsx"))
    shutil.copy(elsewhere, os.path.join(d, "CheXpert-v1.0-small", "chexpert_demo (1).CSV"))
    assert chexpert.load_splits(d)["train"].attribute_names == ("sex", "age", "race")


def test_race_and_ethnicity_unknown_is_unknown():
    from dpft.data import subgroups
    assert subgroups.group_race("Race and Ethnicity Unknown") == "Unknown"
    assert subgroups.group_race("Other") == "Other"
