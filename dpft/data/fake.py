"""Tiny data sets in each real on-disk format, for tests and the end-to-end training test.

Each writer picks the truth first (label values, subgroup, split) and then writes raw
values that encode it (e.g. picks "Black" and writes "Black or African American"), and
records that truth in `<root>/fake_manifest.json`, so tests compare loaders against values
chosen independently of the loaders' parsing rules. Images are small real JPEGs.
"""
from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np
from PIL import Image

from dpft.data.chexpert import DEMO_COLUMNS, LABELS

RAW_VALUES = ("1.0", "0.0", "-1.0", "")
# Raw strings per race group, as they appear in the CHEXPERT DEMO table and MIMIC-IV.
RACE_RAW = {
    "White": ["White", "White, non-Hispanic", "White or Caucasian", "WHITE - OTHER EUROPEAN", "White, Hispanic"],
    "Black": ["Black or African American", "Black, non-Hispanic", "BLACK/AFRICAN AMERICAN", "BLACK/CAPE VERDEAN"],
    "Asian": ["Asian", "Asian, non-Hispanic", "ASIAN - CHINESE", "Asian - Historical Conv"],
    "Other": ["Other", "Native Hawaiian or Other Pacific Islander", "HISPANIC/LATINO - PUERTO RICAN",
              "American Indian or Alaska Native", "MULTIPLE RACE/ETHNICITY"],
    "Unknown": ["Unknown", "Patient Refused", "UNABLE TO OBTAIN", "PATIENT DECLINED TO ANSWER", "",
                "Race and Ethnicity Unknown"],
}
INSURANCE_RAW = {"Medicare": ["Medicare"], "Medicaid": ["Medicaid"], "Other": ["Other", "Private", "No charge"]}
# (bin, an age inside it) for the default edges 18, 40, 60, 80.
AGE_CHOICES = (("0-18", 12), ("18-40", 18), ("18-40", 39), ("40-60", 40), ("60-80", 71), ("80+", 80), ("80+", 90))


def jpeg_bytes(rng: np.random.Generator, size: int, mode: str = "L") -> bytes:
    """A random real JPEG of size x size pixels."""
    shape = (size, size) if mode == "L" else (size, size, 3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def label_colour(label: int) -> tuple[int, int, int]:
    """A solid colour that encodes a label < 1000 (decimal digits -> channels, step 25)."""
    return (25 * (label % 10), 25 * (label // 10 % 10), 25 * (label // 100 % 10))


def label_colour_jpeg(label: int, size: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), label_colour(label)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _write_jpeg(path: str, rng: np.random.Generator, size: int, mode: str = "L") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(jpeg_bytes(rng, size, mode))


def _raw_labels(rng: np.random.Generator, row: int) -> list[str]:
    """Rows 0-3 are all 1.0 / 0.0 / -1.0 / blank, so every value occurs in every column."""
    if row < len(RAW_VALUES):
        return [RAW_VALUES[row]] * len(LABELS)
    return [RAW_VALUES[i] for i in rng.integers(0, len(RAW_VALUES), len(LABELS))]


def _save_manifest(root: str, manifest: dict) -> None:
    with open(os.path.join(root, "fake_manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)


def read_manifest(root: str) -> dict:
    with open(os.path.join(root, "fake_manifest.json"), encoding="utf-8") as f:
        return json.load(f)


def write_fake_chexpert(root: str, n_patients: int = 6, n_valid_patients: int = 2, *, seed: int = 0,
                        image_size: int = 32, demo: str | None = "xlsx", small: bool = True,
                        max_studies: int = 2) -> str:
    """CheXpert layout under `root`: `CheXpert-v1.0[-small]/{train,valid}.csv` + JPEGs (+ DEMO table).

    `demo`: "xlsx", "csv" or None. The last train patient is left out of the DEMO table
    (its race is "Unknown"). Manifest `images`: {csv Path: {patient, split, csv, line, sex,
    age_bin, race, view, labels (raw strings)}}. Returns `root`.
    """
    import pandas as pd

    rng = np.random.default_rng(seed)
    dname = "CheXpert-v1.0-small" if small else "CheXpert-v1.0"
    os.makedirs(os.path.join(root, dname), exist_ok=True)
    manifest: dict[str, Any] = {"dataset_dir": dname, "images": {}, "patients": {}}
    rows: dict[str, list[dict]] = {"train": [], "valid": []}
    demo_rows = []
    for p in range(n_patients + n_valid_patients):
        split = "train" if p < n_patients else "valid"
        pid = f"patient{p + 1:05d}"
        sex = ["Male", "Female", "Unknown"][p % 3] if p % 5 else ["Male", "Female"][p % 2]
        race = list(RACE_RAW)[p % len(RACE_RAW)]
        race_raw = RACE_RAW[race][(p // len(RACE_RAW)) % len(RACE_RAW[race])]
        in_demo = p != n_patients - 1
        if in_demo:
            demo_rows.append({"PATIENT": pid, "GENDER": sex, "AGE_AT_CXR": 50, "PRIMARY_RACE": race_raw,
                              "ETHNICITY": "Non-Hispanic/Non-Latino"})
        manifest["patients"][pid] = {"split": split, "race": race if in_demo else "Unknown"}
        for s in range(1, 1 + int(rng.integers(1, max_studies + 1))):
            age_bin, age = AGE_CHOICES[int(rng.integers(len(AGE_CHOICES)))]
            views = ["frontal"] + (["lateral"] if rng.random() < 0.5 else [])
            for v, view in enumerate(views, start=1):
                rel = f"{dname}/{split}/{pid}/study{s}/view{v}_{view}.jpg"
                _write_jpeg(os.path.join(root, rel), rng, image_size)
                labels = _raw_labels(rng, len(rows[split]))
                row = {"Path": rel, "Sex": sex, "Age": str(age), "Frontal/Lateral": view.capitalize(),
                       "AP/PA": ("AP" if rng.random() < 0.5 else "PA") if view == "frontal" else ""}
                row.update(dict(zip(LABELS, labels)))
                manifest["images"][rel] = {"patient": pid, "split": split, "line": len(rows[split]) + 2,
                                           "sex": sex, "age_bin": age_bin, "view": view.capitalize(),
                                           "race": race if in_demo else "Unknown", "labels": labels}
                rows[split].append(row)
    cols = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *LABELS]
    for split, r in rows.items():
        pd.DataFrame(r, columns=cols).to_csv(os.path.join(root, dname, f"{split}.csv"), index=False)
    if demo:
        df = pd.DataFrame(demo_rows, columns=list(DEMO_COLUMNS))
        if demo == "xlsx":
            df.to_excel(os.path.join(root, "CHEXPERT DEMO.xlsx"), index=False)
        else:
            df.to_csv(os.path.join(root, "CHEXPERT DEMO.csv"), index=False)
    manifest["n_rows"] = {k: len(v) for k, v in rows.items()}
    _save_manifest(root, manifest)
    return root


def write_fake_mimic_cxr(root: str, n_subjects: int = 9, *, seed: int = 0, image_size: int = 32,
                         with_iv: bool = True, iv_version: int = 2, labeler_files: bool = True,
                         iv_root: str | None = None, iv_layout: str = "", unlabeled_studies: int = 0) -> str:
    """MIMIC-CXR-JPG 2.0.0 layout under `root` (+ MIMIC-IV `patients`/`admissions` CSV.GZ).

    The MIMIC-IV tables go to `<iv_root or root>/<iv_layout>`: iv_layout "" (flat), "hosp"
    (MIMIC-IV v2+) or "core" (MIMIC-IV v1.0). `unlabeled_studies`: that many studies (the last
    ones) get no row in the label files (as 8 studies of the real 2.0.0 release); the manifest
    lists them under `unlabeled` ({dicom_id: study}) and not under `images`.

    Subjects are dealt to train / validate / test in turn. `iv_version` 2 writes a `race`
    column, 1 an `ethnicity` column. Each subject gets 3 admissions: insurance 2 with the chosen
    value, 1 with another group's (the mode must win); race by case (k // 3) % 3 (each split gets every
    case): 0 two unknown-type
    values and the chosen race (it must win: unknowns are not a vote), 1 the chosen race twice and
    another documented group's (a documented conflict: "Conflicting"), 2 the chosen race and an
    unknown-type value. Manifest `images`:
    {dicom_id: {subject, study, split, view, sex, age_bin, race, insurance, labels, line}}.
    """
    import pandas as pd

    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    meta_rows, label_rows, split_rows, patients, admissions = [], [], [], [], []
    manifest: dict[str, Any] = {"images": {}, "subjects": {}}
    split_names = ["train", "validate", "test"]
    races, insurances = list(RACE_RAW), list(INSURANCE_RAW)
    hadm = 20000000
    for k in range(n_subjects):
        subject = str((10 + k % 10) * 1_000_000 + 1000 + k)
        split = split_names[k % 3]
        gender = "M" if k % 2 == 0 else "F"
        anchor_year = 2150 + 10 * k
        race, ins = races[k % len(races)], insurances[k % len(insurances)]
        other_ins = insurances[(k + 1) % len(insurances)]
        race_raw = RACE_RAW[race][k % len(RACE_RAW[race])]
        if race == "Unknown" and race_raw == "":  # the mode ignores blanks: write a non-blank unknown
            race_raw = "UNKNOWN"
        documented_other = next(r for r in races[k % len(races) + 1:] + races if r not in (race, "Unknown"))
        race_values = {0: ["UNKNOWN", "Patient Refused", race_raw],
                       1: [race_raw, race_raw, RACE_RAW[documented_other][0]],
                       2: [race_raw, "UNABLE TO OBTAIN", race_raw]}[(k // 3) % 3]
        if (k // 3) % 3 == 1:  # the expected group of a documented conflict; an unknown one leaves the other's
            race = "Conflicting" if race != "Unknown" else documented_other
        for r, i in zip(race_values, (ins, ins, INSURANCE_RAW[other_ins][0])):
            hadm += 1
            admissions.append({"subject_id": subject, "hadm_id": str(hadm), "admittime": "2150-01-01 00:00:00",
                               "insurance": i, ("race" if iv_version >= 2 else "ethnicity"): r})
        age_bin, age_at_first = AGE_CHOICES[k % len(AGE_CHOICES)]
        anchor_age = age_at_first - 3  # every study is 3 years after the anchor year
        patients.append({"subject_id": subject, "gender": gender, "anchor_age": str(anchor_age),
                         "anchor_year": str(anchor_year), "anchor_year_group": "2008 - 2010", "dod": ""})
        manifest["subjects"][subject] = {"split": split}
        n_studies = 2
        for s in range(n_studies):
            study = str(50_000_000 + 1000 * k + s)
            year = anchor_year + 3  # age at study = anchor_age + 3 = age_at_first
            labels = _raw_labels(rng, len(label_rows))
            label_rows.append({"subject_id": subject, "study_id": study, **dict(zip(LABELS, labels))})
            for v, view in enumerate(["PA", "AP", "LATERAL"][: 1 + int(rng.integers(0, 3))]):
                dicom = "".join(f"{x:02x}" for x in rng.integers(0, 256, 8)) + f"-{k:02d}{s}{v}"
                path = os.path.join(root, "files", f"p{subject[:2]}", f"p{subject}", f"s{study}", f"{dicom}.jpg")
                _write_jpeg(path, rng, image_size)
                meta_rows.append({"dicom_id": dicom, "subject_id": subject, "study_id": study,
                                  "PerformedProcedureStepDescription": "CHEST (PA AND LAT)", "ViewPosition": view,
                                  "Rows": str(image_size), "Columns": str(image_size),
                                  "StudyDate": f"{year}0{1 + s}15", "StudyTime": "101010.000",
                                  "ProcedureCodeSequence_CodeMeaning": "CHEST (PA AND LAT)",
                                  "ViewCodeSequence_CodeMeaning": "postero-anterior",
                                  "PatientOrientationCodeSequence_CodeMeaning": "Erect"})
                split_rows.append({"dicom_id": dicom, "study_id": study, "subject_id": subject, "split": split})
                manifest["images"][dicom] = {
                    "subject": subject, "study": study, "split": split, "view": view, "line": len(meta_rows) + 1,
                    "sex": "Male" if gender == "M" else "Female", "age_bin": age_bin, "race": race,
                    "insurance": ins, "labels": labels}
    w = lambda rows, name: pd.DataFrame(rows).to_csv(os.path.join(root, name), index=False, compression="gzip")  # noqa: E731
    w(meta_rows, "mimic-cxr-2.0.0-metadata.csv.gz")
    w(split_rows, "mimic-cxr-2.0.0-split.csv.gz")
    if unlabeled_studies:
        dropped = {r["study_id"] for r in label_rows[-unlabeled_studies:]}
        label_rows = label_rows[:-unlabeled_studies]
        manifest["unlabeled"] = {d: m["study"] for d, m in manifest["images"].items() if m["study"] in dropped}
        manifest["images"] = {d: m for d, m in manifest["images"].items() if m["study"] not in dropped}
    if labeler_files:
        w(label_rows, "mimic-cxr-2.0.0-chexpert.csv.gz")
        w(label_rows, "mimic-cxr-2.0.0-negbio.csv.gz")
    if with_iv:
        iv = os.path.join(iv_root or root, iv_layout)
        os.makedirs(iv, exist_ok=True)
        for rows, name in ((patients, "patients.csv.gz"), (admissions, "admissions.csv.gz")):
            pd.DataFrame(rows).to_csv(os.path.join(iv, name), index=False, compression="gzip")
    _save_manifest(root, manifest)
    return root


def write_fake_tfds(data_dir: str, name: str, *, version: str, num_classes: int, n_train: int = 12,
                    n_validation: int = 4, image_size: int = 32, seed: int = 0,
                    file_name_key: str = "file_name") -> str:
    """A tiny TFDS data set `name` (array_record, real dataset_info.json) without TensorFlow.

    Images are passed as encoded JPEG bytes (TFDS needs TF only to encode arrays); each is a
    solid `label_colour(label)`, so a reader can check the label from the pixels.
    Manifest `<data_dir>/<name>/fake_manifest.json`: {split: {file name: label}} (TFDS
    shuffles the stored order). Returns the builder dir.
    """
    import tensorflow_datasets as tfds

    rng = np.random.default_rng(seed)
    truth: dict[str, dict[str, int]] = {}

    def examples(split: str, n: int):
        truth[split] = {}
        for i in range(n):
            fname = f"{split}_{i:05d}.JPEG"
            label = int(rng.integers(0, num_classes))
            truth[split][fname] = label
            yield fname, {"image": label_colour_jpeg(label, image_size), "label": label, file_name_key: fname}

    class _Fake(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        # A one-part module name keeps TFDS's `code_path` from needing importlib_resources.
        __module__ = "dpft_fake_tfds"
        VERSION = tfds.core.Version(version)

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=num_classes),
                file_name_key: tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples("train", n_train),
                    "validation": self._generate_examples("validation", n_validation)}

        def _generate_examples(self, split, n):
            yield from examples(split, n)

    _Fake.name = name
    builder = _Fake(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=os.path.join(data_dir, "manual")))
    os.makedirs(os.path.join(data_dir, name), exist_ok=True)
    with open(os.path.join(data_dir, name, "fake_manifest.json"), "w", encoding="utf-8") as f:
        json.dump(truth, f, indent=1, sort_keys=True)
    return str(builder.data_dir)


def write_fake_imagenet(data_dir: str, **kwargs: Any) -> str:
    """Tiny `imagenet2012` 5.1.0 (1000 classes, key `file_name`)."""
    return write_fake_tfds(data_dir, "imagenet2012", version="5.1.0", num_classes=1000, **kwargs)


def write_fake_places365(data_dir: str, **kwargs: Any) -> str:
    """Tiny `places365_small` 2.1.0 (365 classes, key `filename`)."""
    return write_fake_tfds(data_dir, "places365_small", version="2.1.0", num_classes=365,
                           file_name_key="filename", **kwargs)
