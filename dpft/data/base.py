"""`ExampleTable`: one split of a data set as a random-access list of records.

A record is a dict (see docs/interfaces.md):
  example_id  int, stable across runs (a function of the files, never of a seed)
  patient_id  str (== str(example_id) where a data set has no patients)
  image       uint8 [H, W, C] array, a path (str), or encoded bytes
  label       int (multiclass) or float32 [L] with values 0/1 (multilabel)
  label_mask  float32 [L] (multilabel only): 0 where the label is ignored
  attrs       dict str -> str of subgroup attributes

The table is grain `RandomAccessDataSource` compatible (`__len__`, `__getitem__`).
Also here: `DatasetSpec` (all dpft knows about a data set) and `options_from` (a loader's
options), the patient-split check, and the CSV index cache that `dpft prepare` writes and
`dpft.data.load_splits` reads back.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from dpft import paths, remote_files
from dpft.errors import DataError

TASKS = ("multiclass", "multilabel")


#: The loader option of an indexed data set that reads `dpft prepare --out DIR`'s `DIR/index`.
INDEX_OPTION = "index_dir"


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Everything dpft knows about a data set: its module's `DATASET` (the registry is
    `dpft.data.DATASETS`); the commands and the attribute check read it, never a list of names.

    load_splits(root, **options) -> {split: ExampleTable}.
    options_class: the dataclass of its loader options (each field settable as
      --config.data.options.<field>; the loader builds it with `options_from`).
    required_attributes: the fairness attributes a run asks for by default (`data.attributes`
      None): none with a value in any row is a DataError, rows without one are counted. Must be
      stated: `()` is the explicit choice of a data set without them (a spec without it fails).
    attribute_hint: where those attributes come from, shown when none has a value.
    path_options: the option fields that are paths (`dpft train` checks their scheme at once).
    index_key: options object -> the options that change the content of its index; given,
      `dpft prepare --out DIR` writes `DIR/index` and the option `index_dir` (a path) loads it.
      None: no index.
    needs_root: False for embedded data made in memory (no data directory, no files to check).
    has_patients: True where the loader gives each example its patient's real id (a patient may
      have several examples); the privacy plan then states the epsilon of the patient with the
      most examples (`dpft.privacy.group`). False: one example per unit (patient_id = example_id).
    run_seed_options: integer options whose value -1 means the run's `seed` (resolved by
      `dpft.config.build.loader_options`): data a study should redraw for each seed (a subsample).
    """

    load_splits: Callable[..., "dict[str, ExampleTable]"]
    options_class: type
    _: dataclasses.KW_ONLY
    required_attributes: tuple[str, ...] | None = None
    attribute_hint: str = ""
    path_options: tuple[str, ...] = ()
    index_key: Callable[[Any], Mapping[str, Any]] | None = None
    needs_root: bool = True
    has_patients: bool = False
    run_seed_options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        where = f"DatasetSpec of {getattr(self.load_splits, '__module__', self.load_splits)!s}"
        if self.required_attributes is None:
            raise TypeError(f"{where}: required_attributes is not stated; give the fairness attributes a run "
                            f"must have (e.g. ('sex', 'age')), or () for a data set without them")
        if isinstance(self.required_attributes, str) or not all(
                isinstance(a, str) and a for a in self.required_attributes):
            raise TypeError(f"{where}: required_attributes must be a tuple of attribute names, "
                            f"got {self.required_attributes!r}")
        if not dataclasses.is_dataclass(self.options_class):
            raise TypeError(f"{where}: options_class {self.options_class!r} is not a dataclass")
        fields = {f.name for f in dataclasses.fields(self.options_class)}
        for name in ("path_options", "run_seed_options"):
            value = getattr(self, name)
            if isinstance(value, str) or any(p not in fields for p in value):
                raise TypeError(f"{where}: {name} {value!r} must name fields of "
                                f"{self.options_class.__name__} ({sorted(fields)})")
        object.__setattr__(self, "required_attributes", tuple(self.required_attributes))
        object.__setattr__(self, "path_options", tuple(self.path_options))
        object.__setattr__(self, "run_seed_options", tuple(self.run_seed_options))

    @property
    def indexed(self) -> bool:
        """Whether `dpft prepare --out DIR` writes an index that `index_dir=DIR/index` loads."""
        return self.index_key is not None

    def option_defaults(self) -> dict[str, Any]:
        """{option: default} of every option the loader takes (and `index_dir` when indexed)."""
        out = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())  # type: ignore[misc]
               for f in dataclasses.fields(self.options_class)}
        return {**out, **({INDEX_OPTION: None} if self.indexed else {})}

    def option_paths(self) -> tuple[str, ...]:
        """The options that are paths: `path_options`, and `index_dir` when indexed."""
        return self.path_options + ((INDEX_OPTION,) if self.indexed else ())

    def index_options(self, name: str, options: Mapping[str, Any]) -> dict[str, Any]:
        """What an index of data set `name` built with loader `options` records, and a load from it
        must match: {"dataset": name, **index_key(options)}."""
        if self.index_key is None:
            raise DataError(f"data set {name!r} has no index (its DatasetSpec gives no index_key)")
        return {"dataset": name, **self.index_key(options_from(self.options_class, options, name))}


def options_from(cls: type, options: Mapping[str, Any], where: str) -> Any:
    """Build the options dataclass `cls` from keyword options; unknown keys are a DataError."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise DataError(f"{where}: unknown option(s) {unknown}; known: {sorted(names)}")
    return cls(**options)


INDEX_VERSION = 1


@dataclasses.dataclass(frozen=True)
class TableMeta:
    """Metadata shared by all splits of a data set."""

    name: str
    task: str  # "multiclass" | "multilabel"
    class_names: tuple[str, ...]
    eval_tasks: tuple[str, ...] = ()
    attribute_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise DataError(f"{self.name}: task must be one of {TASKS}, got {self.task!r}")
        unknown = [t for t in self.eval_tasks if t not in self.class_names]
        if unknown:
            raise DataError(f"{self.name}: eval_tasks {unknown} are not among class_names")

    def to_json(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "TableMeta":
        return cls(
            name=d["name"], task=d["task"], class_names=tuple(d["class_names"]),
            eval_tasks=tuple(d.get("eval_tasks", ())), attribute_names=tuple(d.get("attribute_names", ())),
        )


class ExampleTable:
    """One split: `len(table)` records, `table[i]` -> record dict (see module doc).

    `source` is any random-access sequence; `transform` (optional) maps its items to
    records lazily (used by the TFDS-backed tables, whose items are decoded on access).
    `indices` (optional) restricts/reorders the source without copying.
    """

    def __init__(
        self,
        source: Sequence[Any],
        *,
        split: str,
        meta: TableMeta,
        transform: Callable[[Any], dict] | None = None,
        indices: np.ndarray | None = None,
        excluded: Mapping[str, Mapping[str, Mapping[str, int]]] | None = None,
    ) -> None:
        self._source = source
        self._transform = transform
        self._indices = None if indices is None else np.asarray(indices, dtype=np.int64)
        self.split = split
        self.meta = meta
        #: Rows of this split the loader left out, by reason and attribute group: {reason: {attribute: {group:
        #: count}}} (`count_excluded`); a filter that removes one group more than another is a fairness fact.
        self.excluded = {r: {a: dict(g) for a, g in by.items()} for r, by in (excluded or {}).items()}

    # -- grain RandomAccessDataSource protocol --
    def __len__(self) -> int:
        return len(self._source) if self._indices is None else int(self._indices.shape[0])

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"{self.meta.name}/{self.split}: index {i} out of range [0, {n})")
        j = i % n if self._indices is None else int(self._indices[i])
        item = self._source[j]
        return self._transform(item) if self._transform is not None else dict(item)

    def __repr__(self) -> str:
        return f"ExampleTable({self.meta.name!r}, split={self.split!r}, n={len(self)}, task={self.meta.task!r})"

    # -- conveniences --
    @property
    def task(self) -> str:
        return self.meta.task

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.meta.class_names

    @property
    def eval_tasks(self) -> tuple[str, ...]:
        return self.meta.eval_tasks

    @property
    def attribute_names(self) -> tuple[str, ...]:
        return self.meta.attribute_names

    @property
    def num_classes(self) -> int:
        return len(self.meta.class_names)

    def subset(self, positions: Iterable[int], split: str | None = None) -> "ExampleTable":
        """A view on rows `positions` (positions into this table)."""
        pos = np.asarray(list(positions) if not isinstance(positions, np.ndarray) else positions, dtype=np.int64)
        base = pos if self._indices is None else self._indices[pos]
        return ExampleTable(self._source, split=split or self.split, meta=self.meta,
                            transform=self._transform, indices=base, excluded=self.excluded)

    def records(self) -> Iterable[dict]:
        for i in range(len(self)):
            yield self[i]

    def column(self, key: str) -> np.ndarray:
        """A record field for every row: "example_id", "patient_id", "label", or "attr:<name>".

        Reads every record: cheap for path-backed tables, decodes images for TFDS tables.
        """
        if key.startswith("attr:"):
            name = key[5:]
            return np.asarray([r["attrs"].get(name, "Unknown") for r in self.records()], dtype=object)
        vals = [r[key] for r in self.records()]
        if key == "example_id":
            return np.asarray(vals, dtype=np.int64)
        if key == "label" and self.task == "multilabel":
            return np.stack(vals).astype(np.float32) if vals else np.zeros((0, self.num_classes), np.float32)
        return np.asarray(vals, dtype=object if key == "patient_id" else None)


def from_records(records: Sequence[dict], *, split: str, meta: TableMeta,
                 excluded: Mapping[str, Mapping[str, Mapping[str, int]]] | None = None) -> ExampleTable:
    """A table over an in-memory list of records (checks ids are unique); `excluded`: `ExampleTable.excluded`."""
    ids = [int(r["example_id"]) for r in records]
    if len(set(ids)) != len(ids):
        raise DataError(f"{meta.name}/{split}: example_id values are not unique")
    return ExampleTable(list(records), split=split, meta=meta, excluded=excluded)


def count_excluded(rows: Iterable[tuple[str, str, Mapping[str, str]]]) -> dict[str, dict[str, dict[str, dict[str, int]]]]:
    """{split: {reason: {attribute: {group: count}}}} of excluded rows given as (split, reason, attrs)."""
    out: dict[str, dict[str, dict[str, dict[str, int]]]] = {}
    for split, reason, attrs in rows:
        by_attr = out.setdefault(split, {}).setdefault(reason, {})
        for a, g in attrs.items():
            by_attr.setdefault(a, {})
            by_attr[a][g] = by_attr[a].get(g, 0) + 1
    return {s: {r: {a: dict(sorted(g.items())) for a, g in by.items()} for r, by in rs.items()} for s, rs in out.items()}


def stable_unit_hash(key: str, salt: str = "") -> float:
    """A number in [0, 1) from sha256(salt + key): the same on every machine and run."""
    digest = hashlib.sha256(f"{salt}{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def hash_split(patient_ids: Sequence[str], fraction: float, salt: str = "dpft-val") -> np.ndarray:
    """Boolean [N]: True for the patients whose hash falls under `fraction` (a whole patient goes one way)."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"validation fraction must be in [0, 1), got {fraction!r}")
    cache: dict[str, bool] = {}
    out = np.zeros(len(patient_ids), dtype=bool)
    for i, p in enumerate(patient_ids):
        if p not in cache:
            cache[p] = stable_unit_hash(p, salt) < fraction
        out[i] = cache[p]
    return out


def check_patient_disjoint(splits: Mapping[str, Sequence[str]], where: str) -> None:
    """Raise `DataError` if a patient id occurs in two splits ({split: patient ids})."""
    seen: dict[str, str] = {}
    for split, pids in splits.items():
        for p in set(pids):
            if p in seen and seen[p] != split:
                raise DataError(f"{where}: patient {p!r} occurs in split {seen[p]!r} and in split {split!r}")
            seen[p] = split


def check_nonempty(splits: Mapping[str, ExampleTable], where: str) -> None:
    for name, t in splits.items():
        if len(t) == 0:
            raise DataError(f"{where}: split {name!r} is empty after filtering")


def read_csv(path: str, **kwargs: Any) -> Any:
    """`pandas.read_csv` of a local file (by path, as fast as pandas reads it) or of a remote one
    (`gs://...`, through etils.epath; `.gz` decompressed)."""
    import pandas as pd

    if not paths.is_remote(path):
        return pd.read_csv(path, **kwargs)
    with remote_files.open_binary(path) as f:
        return pd.read_csv(f, compression="gzip" if path.endswith(".gz") else None, **kwargs)


# ---------------------------------------------------------------- index cache (CSV)

def write_index(tables: Mapping[str, ExampleTable], out_dir: str, extra: Mapping[str, Any] | None = None) -> str:
    """Write `index/<split>.csv` + `index/meta.json` for path-backed tables; returns the index dir.

    Columns: example_id, patient_id, image (path), label or label:<name> and mask:<name>,
    attr:<name>. Loaders read it back with `read_index` instead of re-parsing the sources.
    """
    import pandas as pd

    from dpft import atomic_io

    index_dir = paths.join(out_dir, "index")
    atomic_io.make_dir(index_dir)
    meta = next(iter(tables.values())).meta
    for split, table in tables.items():
        rows = []
        for r in table.records():
            if not isinstance(r["image"], str):
                raise DataError(f"{meta.name}/{split}: only path-backed tables can be indexed")
            row = {"example_id": int(r["example_id"]), "patient_id": str(r["patient_id"]), "image": r["image"]}
            if meta.task == "multilabel":
                for j, c in enumerate(meta.class_names):
                    row[f"label:{c}"] = float(r["label"][j])
                    row[f"mask:{c}"] = float(r["label_mask"][j])
            else:
                row["label"] = int(r["label"])
            for a in meta.attribute_names:
                row[f"attr:{a}"] = r["attrs"].get(a, "Unknown")
            rows.append(row)
        atomic_io.write_text(paths.join(index_dir, f"{split}.csv"), pd.DataFrame(rows).to_csv(index=False))
    atomic_io.write_json(paths.join(index_dir, "meta.json"),
                         {"version": INDEX_VERSION, "meta": meta.to_json(), "splits": sorted(tables),
                          "excluded": {split: t.excluded for split, t in tables.items() if t.excluded},
                          "options": dict(extra or {})}, indent=2, sort_keys=True)
    return index_dir


def read_index(index_dir: str, options: Mapping[str, Any] | None = None) -> dict[str, ExampleTable]:
    """Read the tables `write_index` wrote. If `options` is given it must equal the stored options."""
    meta_path = paths.join(index_dir, "meta.json")
    if not paths.exists(meta_path):
        raise DataError(f"{meta_path}: no index here; run `dpft prepare` first")
    try:
        stored = json.loads(remote_files.read_text(meta_path))
    except ValueError as e:
        raise DataError(f"{meta_path}: not valid JSON ({e})") from None
    if stored.get("version") != INDEX_VERSION:
        raise DataError(f"{meta_path}: index version {stored.get('version')!r}, expected {INDEX_VERSION}")
    if options is not None and dict(stored.get("options", {})) != json.loads(json.dumps(dict(options))):
        built, wanted = dict(stored.get("options", {})), json.loads(json.dumps(dict(options)))
        differ = sorted(k for k in set(built) | set(wanted) if built.get(k) != wanted.get(k))
        how = ", ".join(f"{k}: index {built.get(k)!r}, run {wanted.get(k)!r}" for k in differ)
        raise DataError(f"{meta_path}: the index was built with other loader options ({how}); rerun `dpft prepare` "
                        "with " + " ".join(f"--set {k}={json.dumps(wanted.get(k))}" for k in differ)
                        + " or train with " + " ".join(f"--config.data.options.{k}={json.dumps(built.get(k))}"
                                                        for k in differ))
    meta = TableMeta.from_json(stored["meta"])
    out = {}
    for split in stored["splits"]:
        path = paths.join(index_dir, f"{split}.csv")
        df = read_csv(path, dtype={"patient_id": str, "image": str}, keep_default_na=False)
        records = []
        for row in df.to_dict("records"):
            rec = {"example_id": int(row["example_id"]), "patient_id": str(row["patient_id"]), "image": row["image"],
                   "attrs": {a: str(row[f"attr:{a}"]) for a in meta.attribute_names}}
            if meta.task == "multilabel":
                rec["label"] = np.asarray([row[f"label:{c}"] for c in meta.class_names], np.float32)
                rec["label_mask"] = np.asarray([row[f"mask:{c}"] for c in meta.class_names], np.float32)
            else:
                rec["label"] = int(row["label"])
            records.append(rec)
        out[split] = from_records(records, split=split, meta=meta, excluded=stored.get("excluded", {}).get(split))
    return out
