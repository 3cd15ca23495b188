"""CheXpert v1.0 / v1.0-small: 14 observations, multi-label, patient-level splits.

Files: `<root>/CheXpert-v1.0-small/{train,valid}.csv` (or `CheXpert-v1.0/`), columns
`Path,Sex,Age,Frontal/Lateral,AP/PA,<14 observations>`, label values 1.0, 0.0, -1.0, blank.
Race table `CHEXPERT DEMO.xlsx` / `.csv` (PATIENT, GENDER, AGE_AT_CXR, PRIMARY_RACE,
ETHNICITY; from the Stanford AIMI "CheXpert Demographic Data" page), joined on the patient id:
given by `demo_path`, else the first file in <root> or the data set folder whose
name, case-insensitive with spaces/underscores/hyphens ignored, starts with "chexpertdemo" and
ends in .xlsx/.xls/.csv. Without it there is no race attribute, with a loud warning (the run's
attribute check then refuses to train unless `data.attributes` leaves race out).

Uncertainty policies (`uncertainty`), for the value -1.0:
  "ones"   -> 1 (U-Ones)        "zeros"  -> 0 (U-Zeros)      "ignore" -> loss mask 0
  "mixed"  -> 1 for Atelectasis and Edema (U-Ones), 0 for every other label (U-Zeros;
              this covers Cardiomegaly, Consolidation, Pleural Effusion), as in Irvin et al.
Blank -> 0 (negative) with mask 1, or mask 0 with `mask_blank=True`. Any other value is a
`DataError` naming file, line, column and value.

Splits: "test" = the official valid.csv; "validation" = the train.csv patients whose
sha256 hash falls under `val_fraction`; "train" = the rest. No patient in two splits.
Example ids: train.csv row r -> r; valid.csv row r -> (rows in train.csv) + r.
Attributes: sex (Male/Female/Unknown), age (bins, `age_edges`), race (only with the DEMO table).
"""
from __future__ import annotations

import dataclasses
import io
import re
from typing import Any, Sequence

import numpy as np

from dpft import paths, remote_files
from dpft.data import subgroups
from dpft.errors import DataError
from dpft.data.base import DatasetSpec, options_from
from dpft.data.base import ExampleTable, TableMeta, check_nonempty, check_patient_disjoint, from_records, hash_split
from dpft.data.base import count_excluded
from dpft.data.base import read_csv

LABELS: tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)
EVAL_TASKS: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
META_COLUMNS: tuple[str, ...] = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
DEMO_COLUMNS: tuple[str, ...] = ("PATIENT", "GENDER", "AGE_AT_CXR", "PRIMARY_RACE", "ETHNICITY")
DEMO_NAMES: tuple[str, ...] = ("CHEXPERT DEMO.xlsx", "CHEXPERT DEMO.csv", "CHEXPERT_DEMO.xlsx", "CHEXPERT_DEMO.csv")
DATASET_DIRS: tuple[str, ...] = ("CheXpert-v1.0-small", "CheXpert-v1.0")
UNCERTAINTY_POLICIES: tuple[str, ...] = ("ones", "zeros", "ignore", "mixed")
U_ONES_IN_MIXED: frozenset[str] = frozenset({"Atelectasis", "Edema"})
_PATIENT_RE = re.compile(r"(patient\d+)")
_VALUES = {"1.0": 1.0, "1": 1.0, "0.0": 0.0, "0": 0.0, "-1.0": -1.0, "-1": -1.0, "": np.nan}


@dataclasses.dataclass(frozen=True)
class CheXpertOptions:
    uncertainty: str = "ones"
    mask_blank: bool = False
    frontal_only: bool = False
    val_fraction: float = 0.1
    age_edges: tuple[int, ...] = subgroups.DEFAULT_AGE_EDGES
    demo_path: str | None = None  # None: look for the CHEXPERT DEMO table (see module doc)
    check_files: bool = True  # every image path must exist
    on_bad_image: str = "error"  # "error" | "skip": missing image files

    def __post_init__(self) -> None:
        check_policy(self.uncertainty)
        if self.on_bad_image not in ("error", "skip"):
            raise DataError(f"chexpert.on_bad_image must be 'error' or 'skip', got {self.on_bad_image!r}")
        object.__setattr__(self, "age_edges", subgroups.checked_age_edges(self.age_edges))

    def index_key(self) -> dict[str, Any]:
        """The options that change the index content (not the file checks)."""
        d = dataclasses.asdict(self)
        del d["check_files"], d["on_bad_image"]
        d["age_edges"] = list(d["age_edges"])
        return d


def check_policy(policy: str) -> None:
    if policy not in UNCERTAINTY_POLICIES:
        raise DataError(f"uncertainty policy must be one of {UNCERTAINTY_POLICIES}, got {policy!r}")


def parse_label_values(df: Any, path: str, first_line: int = 2) -> np.ndarray:
    """The 14 label columns of a str DataFrame -> float32 [N, 14] with 1, 0, -1, NaN (blank)."""
    missing = [c for c in LABELS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; columns present: {list(df.columns)}")
    out = np.empty((len(df), len(LABELS)), np.float32)
    for j, col in enumerate(LABELS):
        vals = df[col].astype(str).str.strip().tolist()
        for i, v in enumerate(vals):
            try:
                out[i, j] = _VALUES[v]
            except KeyError:
                raise DataError(f"{path}: line {i + first_line}, column {col!r}: unknown label value {v!r} "
                                f"(expected 1.0, 0.0, -1.0 or blank)") from None
    return out


def apply_policy(raw: np.ndarray, policy: str, mask_blank: bool = False,
                 class_names: Sequence[str] = LABELS) -> tuple[np.ndarray, np.ndarray]:
    """raw float [N, L] (1, 0, -1, NaN) -> (label float32 [N, L] in {0,1}, label_mask float32 [N, L])."""
    check_policy(policy)
    raw = np.asarray(raw, np.float32)
    ok = np.isnan(raw) | np.isin(raw, (1.0, 0.0, -1.0))
    if not ok.all():
        i, j = np.argwhere(~ok)[0]
        raise DataError(f"label value {raw[i, j]!r} at row {i}, label {class_names[j]!r} is not 1, 0, -1 or blank")
    blank, unc = np.isnan(raw), raw == -1.0
    label = (raw == 1.0).astype(np.float32)
    mask = np.ones_like(label)
    if policy == "ones":
        label[unc] = 1.0
    elif policy == "ignore":
        mask[unc] = 0.0
    elif policy == "mixed":
        ones_cols = np.asarray([c in U_ONES_IN_MIXED for c in class_names])
        label[unc & ones_cols[None, :]] = 1.0
    if mask_blank:
        mask[blank] = 0.0
    return label, mask


def patient_id_from_path(path: str, where: str) -> str:
    m = _PATIENT_RE.search(path)
    if not m:
        raise DataError(f"{where}: cannot parse a patient id (patientNNNNN) from path {path!r}")
    return m.group(1)


def locate(root: str) -> tuple[str, str]:
    """(dataset dir holding train.csv/valid.csv, base dir the CSV paths are relative to)."""
    for name in DATASET_DIRS:
        d = paths.join(root, name)
        if paths.exists(paths.join(d, "train.csv")):
            return d, root
    if paths.exists(paths.join(root, "train.csv")):
        return root, paths.dirname(root)
    raise DataError(f"{root}: no CheXpert train.csv found (looked in {', '.join(DATASET_DIRS)} and the folder itself)")


def read_demo(path: str) -> dict[str, str]:
    """CHEXPERT DEMO table -> {patient id: raw PRIMARY_RACE} (CSV or XLSX)."""
    import pandas as pd

    try:
        if path.lower().endswith((".xlsx", ".xls")):
            source = io.BytesIO(remote_files.read_bytes(path)) if paths.is_remote(path) else path
            df = pd.read_excel(source, dtype=str, keep_default_na=False)
        else:
            df = read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError as e:
        raise DataError(f"{path}: demographics table not found") from e
    except Exception as e:  # noqa: BLE001 - any parse failure is a data error here
        raise DataError(f"{path}: cannot read demographics table ({e})") from e
    missing = [c for c in DEMO_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; columns present: {list(df.columns)}")
    return dict(zip(df["PATIENT"].str.strip(), df["PRIMARY_RACE"]))


def _is_demo_name(name: str) -> bool:
    key = re.sub(r"[\s_\-]", "", name.lower())
    return key.startswith("chexpertdemo") and key.endswith((".xlsx", ".xls", ".csv"))


def find_demo(root: str, dataset_dir: str, demo_path: str | None) -> str | None:
    """The CHEXPERT DEMO table: `demo_path` (must exist), else found by name (module doc), else None."""
    if demo_path:
        if not paths.isfile(demo_path):
            raise DataError(f"{demo_path}: demographics table not found (option demo_path)")
        return demo_path
    folders = list(dict.fromkeys(paths.absolute(d).rstrip("/") for d in (root, dataset_dir)))
    for d in folders:
        try:
            names = sorted(paths.listdir(d))  # one listing (one request on an object store)
        except OSError:
            continue
        for n in [n for n in DEMO_NAMES if n in names] + [n for n in names if _is_demo_name(n)]:
            if paths.isfile(paths.join(d, n)):  # the official names first
                return paths.join(d, n)
    return None


def _read_csv(path: str) -> Any:
    import pandas as pd

    if not paths.exists(path):
        raise DataError(f"{path}: file not found")
    try:
        df = read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path}: not a readable CSV file ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''})") from None
    missing = [c for c in META_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; columns present: {list(df.columns)}")
    return df


#: Why a row of the CSVs is not in any split (counted per attribute group: `ExampleTable.excluded`).
EXCLUDED_VIEW, EXCLUDED_MISSING = "lateral view (frontal_only)", "missing image"


def _records(df: Any, csv_path: str, base: str, id_offset: int, opts: CheXpertOptions,
             race: dict[str, str] | None, files: remote_files.FileSet
             ) -> tuple[list[dict], list[int], list[tuple[str, str, dict]]]:
    """(records, lines of missing images, excluded rows as (reason, patient id, attrs))."""
    raw = parse_label_values(df, csv_path)
    label, mask = apply_policy(raw, opts.uncertainty, opts.mask_blank)
    records, missing, bad_ages, excluded = [], [], [], []
    for i, row in enumerate(df[list(META_COLUMNS)].itertuples(index=False)):
        rel, sex, age, view = row[0], row[1], row[2], row[3]
        pid = patient_id_from_path(rel, f"{csv_path}: line {i + 2}, column 'Path'")
        attrs = {"sex": subgroups.group_sex(sex), "age": subgroups.age_bin(age, opts.age_edges)}
        if race is not None:
            attrs["race"] = subgroups.group_race(race.get(pid))
        if opts.frontal_only and view.strip() != "Frontal":
            excluded.append((EXCLUDED_VIEW, pid, attrs))
            continue
        if subgroups.unparseable_age(age):
            bad_ages.append((i + 2, age))
        img = paths.join(base, rel)
        if opts.check_files and not files.exists(img):
            if opts.on_bad_image == "error":
                raise DataError(f"{csv_path}: line {i + 2}, column 'Path': image {img!r} does not exist")
            missing.append(i + 2)
            excluded.append((EXCLUDED_MISSING, pid, attrs))
            continue
        records.append({"example_id": id_offset + i, "patient_id": pid, "image": img,
                        "label": label[i], "label_mask": mask[i], "attrs": attrs})
    if bad_ages:  # counted as "Unknown" like blanks, but never silently
        import logging
        logging.getLogger(__name__).warning(
            "chexpert: %s: %d unparseable Age value(s) counted as age group 'Unknown' (lines %s, values %s)",
            csv_path, len(bad_ages), [n for n, _ in bad_ages[:5]], [v for _, v in bad_ages[:5]])
    return records, missing, excluded


def load_splits(root: str, **options: Any) -> dict[str, ExampleTable]:
    """{"train", "validation", "test"} tables of CheXpert at `root` (see module doc for options)."""
    import logging

    opts = options_from(CheXpertOptions, options, "chexpert")
    dataset_dir, base = locate(root)
    demo = find_demo(root, dataset_dir, opts.demo_path)
    if demo is None:
        logging.getLogger(__name__).warning(
            "chexpert: NO RACE: the CHEXPERT DEMO table was not found in %s or %s; race is "
            "missing. Point to it with --config.data.options.demo_path=/path/to/CHEXPERT_DEMO.xlsx "
            "(dpft prepare: --set demo_path=...)", root, dataset_dir)
    race = read_demo(demo) if demo else None
    train_csv, valid_csv = paths.join(dataset_dir, "train.csv"), paths.join(dataset_dir, "valid.csv")
    train_df, valid_df = _read_csv(train_csv), _read_csv(valid_csv)
    files = remote_files.FileSet(base)  # on an object store: one listing, not one request per image
    train_recs, miss_t, out_t = _records(train_df, train_csv, base, 0, opts, race, files)
    test_recs, miss_v, out_v = _records(valid_df, valid_csv, base, len(train_df), opts, race, files)
    if miss_t or miss_v:
        logging.getLogger(__name__).warning("chexpert: skipped %d missing images (train.csv lines %s, "
                                            "valid.csv lines %s)", len(miss_t) + len(miss_v), miss_t[:5], miss_v[:5])
    # The official CSVs must not share patients.
    check_patient_disjoint({"train.csv": [r["patient_id"] for r in train_recs],
                            "valid.csv": [r["patient_id"] for r in test_recs]}, dataset_dir)
    is_val = hash_split([r["patient_id"] for r in train_recs], opts.val_fraction)
    meta = TableMeta(name="chexpert", task="multilabel", class_names=LABELS, eval_tasks=EVAL_TASKS,
                     attribute_names=("sex", "age") + (("race",) if race is not None else ()))
    out_val = hash_split([pid for _, pid, _ in out_t], opts.val_fraction)  # where each excluded row would be
    excluded = count_excluded(
        [("validation" if v else "train", why, attrs) for (why, _, attrs), v in zip(out_t, out_val)]
        + [("test", why, attrs) for why, _, attrs in out_v])
    splits = {
        "train": from_records([r for r, v in zip(train_recs, is_val) if not v], split="train", meta=meta,
                              excluded=excluded.get("train")),
        "validation": from_records([r for r, v in zip(train_recs, is_val) if v], split="validation", meta=meta,
                                   excluded=excluded.get("validation")),
        "test": from_records(test_recs, split="test", meta=meta, excluded=excluded.get("test")),
    }
    if opts.val_fraction == 0:
        del splits["validation"]
    check_nonempty(splits, f"chexpert at {dataset_dir}")
    return splits


DATASET = DatasetSpec(
    load_splits, CheXpertOptions,
    required_attributes=("sex", "age", "race"),
    attribute_hint="race comes from the CHEXPERT DEMO table: "
                   "--config.data.options.demo_path=/path/CHEXPERT_DEMO.xlsx",
    path_options=("demo_path",),
    has_patients=True,  # several studies / images per patient
    index_key=CheXpertOptions.index_key,  # `dpft prepare --out DIR` -> index_dir=DIR/index
)
