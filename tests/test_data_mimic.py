"""MIMIC-CXR-JPG loader on fake copies in the real on-disk format."""
import os
import shutil

import pandas as pd
import pytest

from dpft.data import fake, mimic_cxr
from dpft.errors import DataError

# Expected (label, mask) per raw value and policy, written out by hand (not via the loader).
_EXPECTED = {"ones": {"1.0": (1, 1), "0.0": (0, 1), "-1.0": (1, 1), "": (0, 1)},
             "zeros": {"1.0": (1, 1), "0.0": (0, 1), "-1.0": (0, 1), "": (0, 1)},
             "ignore": {"1.0": (1, 1), "0.0": (0, 1), "-1.0": (0, 0), "": (0, 1)}}


def expected_label(raw, policy, column):
    if policy == "mixed":
        policy = "ones" if column in ("Atelectasis", "Edema") else "zeros"
    return _EXPECTED[policy][raw]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return fake.write_fake_mimic_cxr(str(tmp_path_factory.mktemp("mimic")), n_subjects=9, seed=2)


def _by_dicom(splits):
    return {os.path.basename(r["image"])[:-4]: (k, r) for k, t in splits.items() for r in t.records()}


def test_counts_views_splits(root):
    man = fake.read_manifest(root)["images"]
    splits = mimic_cxr.load_splits(root)
    got = _by_dicom(splits)
    want = {d for d, m in man.items() if m["view"] in ("PA", "AP")}
    assert set(got) == want
    names = {"train": "train", "validate": "validation", "test": "test"}
    for d, (split, rec) in got.items():
        assert split == names[man[d]["split"]]
        assert rec["patient_id"] == man[d]["subject"]
        s = man[d]["subject"]
        assert rec["image"] == os.path.join(root, "files", "p" + s[:2], "p" + s, "s" + man[d]["study"], d + ".jpg")
    all_views = mimic_cxr.load_splits(root, views=())
    assert sum(len(t) for t in all_views.values()) == len(man)


@pytest.mark.parametrize("policy", ["ones", "ignore", "mixed"])
def test_labels_and_attributes(root, policy):
    man = fake.read_manifest(root)["images"]
    splits = mimic_cxr.load_splits(root, uncertainty=policy, labeler="negbio")
    assert splits["train"].attribute_names == ("sex", "age", "race", "insurance", "view")
    seen = set()
    for d, (_, rec) in _by_dicom(splits).items():
        m = man[d]
        for j, col in enumerate(mimic_cxr.LABELS):
            assert (rec["label"][j], rec["label_mask"][j]) == expected_label(m["labels"][j], policy, col)
            seen.add(m["labels"][j])
        assert rec["attrs"] == {"sex": m["sex"], "age": m["age_bin"], "race": m["race"],
                                "insurance": m["insurance"], "view": m["view"]}
    assert seen == {"1.0", "0.0", "-1.0", ""}


def test_mimic_iv_v1_and_without_iv(tmp_path):
    d = fake.write_fake_mimic_cxr(str(tmp_path / "v1"), n_subjects=6, iv_version=1)
    man = fake.read_manifest(d)["images"]
    for dicom, (_, rec) in _by_dicom(mimic_cxr.load_splits(d)).items():
        assert rec["attrs"]["race"] == man[dicom]["race"]
    d2 = fake.write_fake_mimic_cxr(str(tmp_path / "noiv"), n_subjects=6, with_iv=False)
    assert mimic_cxr.load_splits(d2)["test"].attribute_names == ("view",)
    with pytest.raises(DataError, match="patients.csv.gz"):
        mimic_cxr.load_splits(d2, mimic_iv_dir=str(tmp_path))


def _copy(root, tmp_path):
    d = str(tmp_path / "copy")
    shutil.copytree(root, d)
    return d


def _edit(path, fn):
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    fn(df).to_csv(path, index=False, compression="gzip")


def test_bad_inputs(root, tmp_path):
    d = _copy(root, tmp_path)
    split = os.path.join(d, "mimic-cxr-2.0.0-split.csv.gz")
    _edit(split, lambda df: df.assign(split=["training"] + list(df["split"][1:])))
    with pytest.raises(DataError, match=r"split\.csv\.gz: line 2, column 'split': unknown value 'training'"):
        mimic_cxr.load_splits(d)
    shutil.copy(os.path.join(root, "mimic-cxr-2.0.0-split.csv.gz"), split)

    def move_subject(df):  # one image of a train subject put into test: patient in two splits
        i = int(df.index[df["split"] == "train"][0])
        df.loc[i, "split"] = "test"
        return df
    _edit(split, move_subject)
    with pytest.raises(DataError, match="occurs in split"):
        mimic_cxr.load_splits(d)
    shutil.copy(os.path.join(root, "mimic-cxr-2.0.0-split.csv.gz"), split)

    labels = os.path.join(d, "mimic-cxr-2.0.0-chexpert.csv.gz")
    _edit(labels, lambda df: df.drop(columns=["Pneumothorax"]))
    with pytest.raises(DataError, match=r"chexpert\.csv\.gz: missing column.*Pneumothorax"):
        mimic_cxr.load_splits(d)
    shutil.copy(os.path.join(root, "mimic-cxr-2.0.0-chexpert.csv.gz"), labels)

    _edit(labels, lambda df: df.assign(Edema=["yes"] + list(df["Edema"][1:])))
    with pytest.raises(DataError, match=r"line 2, column 'Edema': unknown label value 'yes'"):
        mimic_cxr.load_splits(d)
    shutil.copy(os.path.join(root, "mimic-cxr-2.0.0-chexpert.csv.gz"), labels)

    meta = os.path.join(d, "mimic-cxr-2.0.0-metadata.csv.gz")
    _edit(meta, lambda df: df.drop(columns=["ViewPosition"]))
    with pytest.raises(DataError, match="missing column.*ViewPosition"):
        mimic_cxr.load_splits(d)
    os.remove(meta)
    with pytest.raises(DataError, match="metadata.csv.gz: file not found"):
        mimic_cxr.load_splits(d)


@pytest.mark.parametrize("layout,version", [("hosp", 2), ("core", 1), ("", 2)])
def test_mimic_iv_in_separate_folder_every_layout(tmp_path, layout, version):
    """MIMIC-IV v2 (hosp/), v1.0 (core/) or flat, in a folder apart from MIMIC-CXR-JPG."""
    root, iv = str(tmp_path / "cxr"), str(tmp_path / "mimiciv" / "x")
    fake.write_fake_mimic_cxr(root, n_subjects=9, seed=3, iv_root=iv, iv_layout=layout, iv_version=version)
    man = fake.read_manifest(root)["images"]
    splits = mimic_cxr.load_splits(root, mimic_iv_dir=iv)
    assert splits["train"].attribute_names == ("sex", "age", "race", "insurance", "view")
    for d, (_, rec) in _by_dicom(splits).items():
        m = man[d]
        assert (rec["attrs"]["sex"], rec["attrs"]["age"], rec["attrs"]["race"], rec["attrs"]["insurance"]) == \
            (m["sex"], m["age_bin"], m["race"], m["insurance"])


def test_mimic_iv_missing_warns_or_fails(tmp_path, caplog):
    root = str(tmp_path / "cxr")
    fake.write_fake_mimic_cxr(root, n_subjects=9, seed=3, iv_root=str(tmp_path / "iv"), iv_layout="hosp")
    with caplog.at_level("WARNING"):
        splits = mimic_cxr.load_splits(root)  # not under root: view only, loudly
    assert splits["train"].attribute_names == ("view",)
    assert "NO DEMOGRAPHICS" in caplog.text and "mimic_iv_dir" in caplog.text
    with pytest.raises(DataError, match=r"patients\.csv\.gz.*not found.*mimic_iv_dir"):
        mimic_cxr.load_splits(root, mimic_iv_dir=str(tmp_path / "elsewhere"))


def test_studies_without_label_row_skipped_and_counted(tmp_path, caplog):
    root = fake.write_fake_mimic_cxr(str(tmp_path / "cxr"), n_subjects=9, seed=4, unlabeled_studies=2)
    man = fake.read_manifest(root)
    assert man["unlabeled"]
    with caplog.at_level("WARNING"):
        splits = mimic_cxr.load_splits(root, views=())
    got = _by_dicom(splits)
    assert set(got) == set(man["images"])
    assert not set(got) & set(man["unlabeled"])
    assert f"skipped {len(man['unlabeled'])} image(s) of 2 stud(ies) without a row" in caplog.text
    # Counted per attribute group in the split each image would have joined.
    assert len(man["unlabeled"]) == sum(sum(t.excluded[mimic_cxr.EXCLUDED_UNLABELED]["sex"].values())
                                        for t in splits.values() if t.excluded)


def test_uncompressed_csv_copies_are_read_like_the_gz_files(root, tmp_path):
    import gzip

    d = str(tmp_path / "plain")
    shutil.copytree(root, d)
    for dirpath, _, names in os.walk(d):
        for n in names:
            if n.endswith(".csv.gz"):
                with gzip.open(os.path.join(dirpath, n), "rb") as f, open(os.path.join(dirpath, n[:-3]), "wb") as g:
                    g.write(f.read())
                os.remove(os.path.join(dirpath, n))
    want, got = mimic_cxr.load_splits(root), mimic_cxr.load_splits(d)
    assert {k: [(r["patient_id"], r["attrs"]) for r in t.records()] for k, t in got.items()} == \
        {k: [(r["patient_id"], r["attrs"]) for r in t.records()] for k, t in want.items()}


def test_views_left_out_are_counted_per_attribute_group(root):
    """The default PA/AP filter: every other image counted per sex group in the split it would have joined."""
    man = fake.read_manifest(root)["images"]
    names = {"train": "train", "validate": "validation", "test": "test"}
    want: dict = {}
    for m in man.values():
        if m["view"] not in ("PA", "AP"):
            want[(names[m["split"]], m["sex"])] = want.get((names[m["split"]], m["sex"]), 0) + 1
    splits = mimic_cxr.load_splits(root)
    got = {(s, g): n for s, t in splits.items()
           for g, n in t.excluded.get(mimic_cxr.EXCLUDED_VIEW, {}).get("sex", {}).items()}
    assert got == want and sum(want.values()) > 0
    assert all(not t.excluded for t in mimic_cxr.load_splits(root, views=()).values())
