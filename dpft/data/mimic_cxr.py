"""MIMIC-CXR-JPG 2.0.0 with MIMIC-IV demographics: 14 CheXpert labels, multi-label.

Files under <root>: `files/p{NN}/p{subject}/s{study}/{dicom_id}.jpg` (NN = first two digits
of the subject id), `mimic-cxr-2.0.0-metadata.csv.gz`, `mimic-cxr-2.0.0-{chexpert,negbio}.csv.gz`
(labels per study; `labeler`), `mimic-cxr-2.0.0-split.csv.gz` (train / validate / test).
Demographics from MIMIC-IV `patients.csv.gz` and `admissions.csv.gz`, looked for in
`mimic_iv_dir` (default <root>) and its `hosp/` (MIMIC-IV v2+) and `core/` (v1.0) sub-folders;
a given `mimic_iv_dir` without them is an error. Without them (and no `mimic_iv_dir`) the only
attribute is `view`, with a loud warning (the run's attribute check then refuses to train
unless `data.attributes` leaves out sex, age, race and insurance).

Attributes: sex ("M"/"F" -> Male/Female), age at the study = anchor_age + (year of
StudyDate YYYYMMDD) - anchor_year, binned with `age_edges`; race from `race` (MIMIC-IV v2+)
or `ethnicity` (v1) over the subject's admissions by `subgroups.person_race` (unknown-type values
ignored, different documented groups "Conflicting"); insurance grouped by
`subgroups.group_insurance`; view (ViewPosition). A subject's insurance is the most frequent
non-blank value over their admissions (ties: alphabetical first); no admission -> "Unknown".
Labels and uncertainty policies as in `dpft.data.chexpert`. A study with no row in the
label file (8 of 227,835 in 2.0.0) is skipped, counted and reported. Splits from the official split
file ("validate" -> "validation"); a subject in two splits is an error.
Example id = row of the metadata file; patient id = str(subject_id).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from dpft import paths, remote_files
from dpft.data import subgroups
from dpft.errors import DataError
from dpft.data.base import DatasetSpec, options_from
from dpft.data.base import ExampleTable, TableMeta, check_nonempty, check_patient_disjoint, count_excluded, from_records
from dpft.data.base import read_csv
from dpft.data.chexpert import EVAL_TASKS, LABELS, apply_policy, check_policy, parse_label_values

PREFIX = "mimic-cxr-2.0.0"
METADATA_COLUMNS = ("dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate")
SPLIT_NAMES = {"train": "train", "validate": "validation", "test": "test"}
LABELERS = ("chexpert", "negbio")
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MimicOptions:
    uncertainty: str = "ones"
    mask_blank: bool = False
    labeler: str = "chexpert"  # "chexpert" | "negbio"
    views: tuple[str, ...] = ("PA", "AP")  # ViewPosition filter; () keeps every view
    age_edges: tuple[int, ...] = subgroups.DEFAULT_AGE_EDGES
    mimic_iv_dir: str | None = None  # MIMIC-IV folder: patients/admissions here or in hosp/ or core/
    check_files: bool = True
    on_bad_image: str = "error"  # "error" | "skip": missing image files

    def __post_init__(self) -> None:
        check_policy(self.uncertainty)
        if self.labeler not in LABELERS:
            raise DataError(f"mimic_cxr.labeler must be one of {LABELERS}, got {self.labeler!r}")
        if self.on_bad_image not in ("error", "skip"):
            raise DataError(f"mimic_cxr.on_bad_image must be 'error' or 'skip', got {self.on_bad_image!r}")
        object.__setattr__(self, "views", tuple(self.views))
        object.__setattr__(self, "age_edges", subgroups.checked_age_edges(self.age_edges))

    def index_key(self) -> dict[str, Any]:
        """The options that change the index content (not the file checks)."""
        d = dataclasses.asdict(self)
        del d["check_files"], d["on_bad_image"]
        d["age_edges"], d["views"] = list(d["age_edges"]), list(d["views"])
        return d


def image_path(root: str, subject_id: str, study_id: str, dicom_id: str) -> str:
    """`files/p{NN}/p{subject}/s{study}/{dicom}.jpg` under root."""
    s = str(subject_id)
    return paths.join(root, "files", f"p{s[:2]}", f"p{s}", f"s{study_id}", f"{dicom_id}.jpg")


def _read(path: str, columns: tuple[str, ...]) -> Any:
    """The CSV at `path` (a `.csv.gz` as PhysioNet ships it, or its uncompressed `.csv` copy beside it)."""
    if not paths.exists(path) and path.endswith(".csv.gz") and paths.exists(path[:-3]):
        path = path[:-3]
    if not paths.exists(path):
        raise DataError(f"{path}: file not found" + (f" (nor {path[:-3]})" if path.endswith(".csv.gz") else ""))
    try:
        df = read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: cannot read CSV ({e})") from e
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; columns present: {list(df.columns)}")
    return df


def _mode(values: list[str]) -> str:
    vals = [v for v in values if v.strip()]
    if not vals:
        return ""
    uniq, counts = np.unique(np.asarray(vals, dtype=str), return_counts=True)
    return str(uniq[int(np.argmax(counts))])  # np.unique sorts: ties -> alphabetical first


#: Why an image of the metadata is in no split (counted per attribute group: `ExampleTable.excluded`).
EXCLUDED_VIEW, EXCLUDED_UNLABELED, EXCLUDED_MISSING = "view filter (views)", "study without labels", "missing image"
IV_SUBDIRS = ("", "hosp", "core")  # flat, MIMIC-IV v2+ (hosp/), MIMIC-IV v1.0 (core/)
IV_TABLES = ("patients.csv.gz", "admissions.csv.gz")


def find_iv_tables(root: str, iv_dir: str | None) -> tuple[str, str] | None:
    """(patients path, admissions path) under `iv_dir` (default `root`) or its hosp/ / core/.

    None when `iv_dir` is not given and nothing is found under `root`; a `DataError` when
    `iv_dir` is given and either table is missing.
    """
    base = iv_dir or root
    found = []
    for name in IV_TABLES:  # each as .csv.gz or an uncompressed .csv copy
        hits = [p for p in (paths.join(base, sub, n) if sub else paths.join(base, n) for sub in IV_SUBDIRS
                            for n in (name, name[:-3])) if paths.exists(p)]
        found.append(hits[0] if hits else None)
    if all(found):
        return found[0], found[1]
    if iv_dir:
        missing = [n for n, f in zip(IV_TABLES, found) if f is None]
        raise DataError(f"{iv_dir}: MIMIC-IV table(s) {missing} not found here or in hosp/ (v2+) or core/ (v1.0) "
                        f"(option mimic_iv_dir)")
    return None


def read_demographics(p_path: str, a_path: str
                      ) -> tuple[dict[str, tuple[str, int | None, int | None]], dict[str, tuple[str, str]]]:
    """({subject: (gender, anchor_age, anchor_year)}, {subject: (race group, raw insurance)}): the race
    from all the subject's admissions (`subgroups.person_race`), the insurance their most frequent value."""
    pat = _read(p_path, ("subject_id", "gender", "anchor_age", "anchor_year"))
    people = {}
    for i, (s, g, age, year) in enumerate(pat[["subject_id", "gender", "anchor_age", "anchor_year"]].itertuples(index=False)):
        try:
            people[s] = (g, int(age) if age.strip() else None, int(year) if year.strip() else None)
        except ValueError:
            raise DataError(f"{p_path}: line {i + 2}: anchor_age {age!r} / anchor_year {year!r} not integers") from None
    adm = _read(a_path, ("subject_id", "insurance"))
    race_col = "race" if "race" in adm.columns else "ethnicity" if "ethnicity" in adm.columns else None
    if race_col is None:
        raise DataError(f"{a_path}: missing column 'race' (MIMIC-IV v2+) or 'ethnicity' (v1); "
                        f"columns present: {list(adm.columns)}")
    social = {}
    for s, grp in adm.groupby("subject_id"):
        social[s] = (subgroups.person_race(grp[race_col].tolist()), _mode(grp["insurance"].tolist()))
    return people, social


def load_splits(root: str, **options: Any) -> dict[str, ExampleTable]:
    """{"train", "validation", "test"} tables of MIMIC-CXR-JPG at `root` (options: `MimicOptions`)."""
    opts = options_from(MimicOptions, options, "mimic_cxr")
    meta_path = paths.join(root, f"{PREFIX}-metadata.csv.gz")
    label_path = paths.join(root, f"{PREFIX}-{opts.labeler}.csv.gz")
    split_path = paths.join(root, f"{PREFIX}-split.csv.gz")
    md = _read(meta_path, METADATA_COLUMNS)
    lab = _read(label_path, ("subject_id", "study_id") + LABELS)
    sp = _read(split_path, ("dicom_id", "study_id", "subject_id", "split"))

    raw = parse_label_values(lab, label_path)
    label, mask = apply_policy(raw, opts.uncertainty, opts.mask_blank)
    study_row: dict[tuple[str, str], int] = {}
    for i, key in enumerate(zip(lab["subject_id"], lab["study_id"])):
        if key in study_row:
            raise DataError(f"{label_path}: line {i + 2}: study {key[1]} of subject {key[0]} listed twice")
        study_row[key] = i
    split_of: dict[str, str] = {}
    for i, (d, s) in enumerate(zip(sp["dicom_id"], sp["split"])):
        if s not in SPLIT_NAMES:
            raise DataError(f"{split_path}: line {i + 2}, column 'split': unknown value {s!r} "
                            f"(expected {sorted(SPLIT_NAMES)})")
        split_of[d] = SPLIT_NAMES[s]

    iv = find_iv_tables(root, opts.mimic_iv_dir)
    if iv is None:
        log.warning("mimic_cxr: NO DEMOGRAPHICS: MIMIC-IV patients.csv.gz / admissions.csv.gz not found under "
                    "%s (nor in hosp/ or core/); sex, age, race and insurance are missing. Point to them with "
                    "--config.data.options.mimic_iv_dir=/path/to/mimiciv/<version>", root)
    people, social = read_demographics(*iv) if iv else ({}, {})
    attribute_names = ("sex", "age", "race", "insurance", "view") if iv else ("view",)

    files = remote_files.FileSet(paths.join(root, "files"))  # on an object store: one listing of the images
    by_split: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    missing, unlabeled, unlabeled_images = 0, set(), 0
    excluded = []  # (split, reason, attrs) of every image left out: counted per attribute group
    cols = md[list(METADATA_COLUMNS)].itertuples(index=False)
    for i, (dicom, subj, study, view, date) in enumerate(cols):
        where = f"{meta_path}: line {i + 2}"
        attrs = {"view": view or "Unknown"}
        if iv:
            gender, anchor_age, anchor_year = people.get(subj, ("", None, None))
            age = None
            if anchor_age is not None and anchor_year is not None:
                if len(date) < 4 or not date[:4].isdigit():
                    raise DataError(f"{where}, column 'StudyDate': {date!r} is not YYYYMMDD")
                age = anchor_age + int(date[:4]) - anchor_year
            race, ins = social.get(subj, ("Unknown", ""))
            attrs.update(sex=subgroups.group_sex(gender), age=subgroups.age_bin(age, opts.age_edges),
                         race=race, insurance=subgroups.group_insurance(ins))
        if opts.views and view not in opts.views:
            excluded.append((split_of.get(dicom, "unassigned"), EXCLUDED_VIEW, attrs))
            continue
        if dicom not in split_of:
            raise DataError(f"{where}: dicom_id {dicom!r} not in {split_path}")
        if (subj, study) not in study_row:
            unlabeled.add((subj, study))
            unlabeled_images += 1
            excluded.append((split_of[dicom], EXCLUDED_UNLABELED, attrs))
            continue
        img = image_path(root, subj, study, dicom)
        if opts.check_files and not files.exists(img):
            if opts.on_bad_image == "error":
                raise DataError(f"{where}: image {img!r} does not exist")
            missing += 1
            excluded.append((split_of[dicom], EXCLUDED_MISSING, attrs))
            continue
        j = study_row[(subj, study)]
        by_split[split_of[dicom]].append({"example_id": i, "patient_id": str(subj), "image": img,
                                          "label": label[j], "label_mask": mask[j], "attrs": attrs})
    if missing:
        log.warning("mimic_cxr: skipped %d missing images", missing)
    if unlabeled:
        log.warning("mimic_cxr: skipped %d image(s) of %d stud(ies) without a row in %s (e.g. study %s of "
                    "subject %s)", unlabeled_images,
                    len(unlabeled), label_path, *sorted(unlabeled)[0][::-1])
    check_patient_disjoint({k: [r["patient_id"] for r in v] for k, v in by_split.items()}, split_path)
    meta = TableMeta(name="mimic_cxr", task="multilabel", class_names=LABELS, eval_tasks=EVAL_TASKS,
                     attribute_names=attribute_names)
    out = count_excluded(excluded)
    splits = {k: from_records(v, split=k, meta=meta, excluded=out.get(k)) for k, v in by_split.items()}
    check_nonempty(splits, f"mimic_cxr at {root}")
    return splits


DATASET = DatasetSpec(
    load_splits, MimicOptions,
    required_attributes=("sex", "age", "race", "insurance"),
    attribute_hint="sex, age, race and insurance come from MIMIC-IV patients.csv.gz/admissions.csv.gz: "
                   "--config.data.options.mimic_iv_dir=/path/mimiciv/<version> (hosp/ or core/ are searched)",
    path_options=("mimic_iv_dir",),
    has_patients=True,  # several studies / images per patient
    index_key=MimicOptions.index_key,  # `dpft prepare --out DIR` -> index_dir=DIR/index
)
