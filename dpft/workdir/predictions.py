"""Predictions files: `WORKDIR/predictions/<step>/<split>.npz` + `<split>.json` (docs/interfaces.md).

`<split>.npz` holds `example_id` int [N], `patient_id` str [N], `logits` float32 [N, C],
`label` int [N] (multiclass) or float32 [N, L] (multilabel, 0/1), `label_mask` float32 [N, L]
(multilabel; 0 = ignored), `attr_<name>` str [N] per subgroup attribute. `<split>.json` beside it
holds `{"task", "class_names", "eval_tasks", "step", "params", "epsilon", "delta"}` and
`"guarantee_valid"` (false: epsilon is nominal, the run's noise was public; absent in older files).

Strings are stored as fixed-width unicode arrays so the file loads with `allow_pickle=False`.
Synthetic predictions and workdirs for tests and notebooks: `dpft.testing.predictions`.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from dpft import atomic_io, paths
from dpft.errors import UsageError
from dpft.workdir.contract import PARAMS_ITEMS

TASKS = ("multiclass", "multilabel")
PARAMS = tuple(PARAMS_ITEMS)  # which parameters made the predictions: ema, raw, polyak
META_KEYS = ("task", "class_names", "eval_tasks", "step", "params", "epsilon", "delta")
CHEXPERT_CLASSES = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                    "Pleural Other", "Fracture", "Support Devices")
CHEXPERT_EVAL_TASKS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")


@dataclasses.dataclass(frozen=True)
class Predictions:
    """One split's predictions. N examples, C logits (C == L for multilabel)."""

    example_id: np.ndarray  # int64 [N]
    patient_id: np.ndarray  # str [N]
    logits: np.ndarray  # float32 [N, C]
    label: np.ndarray  # int64 [N] (multiclass) or float32 [N, L] (multilabel)
    label_mask: np.ndarray | None  # float32 [N, L] (multilabel) or None
    attrs: dict[str, np.ndarray]  # attribute name -> str [N]
    task: str
    class_names: tuple[str, ...]
    eval_tasks: tuple[str, ...]
    step: int
    params: str
    epsilon: float | None
    delta: float | None
    path: str = ""
    guarantee_valid: bool | None = None  # False: epsilon is nominal (public noise); None: non-private / not recorded
    privacy_unit: str | None = None  # who epsilon protects: "example" | "patient"; None: non-private / not recorded

    @property
    def n(self) -> int:
        return int(self.logits.shape[0])

    @property
    def multilabel(self) -> bool:
        return self.task == "multilabel"

    def probabilities(self) -> np.ndarray:
        """float64 [N, C]: softmax over classes (multiclass) or per-label sigmoid (multilabel)."""
        z = self.logits.astype(np.float64)
        if self.multilabel:
            return 1.0 / (1.0 + np.exp(-z))
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def meta(self) -> dict[str, Any]:
        return {"task": self.task, "class_names": list(self.class_names), "eval_tasks": list(self.eval_tasks),
                "step": self.step, "params": self.params, "epsilon": self.epsilon, "delta": self.delta,
                "guarantee_valid": self.guarantee_valid, "privacy_unit": self.privacy_unit}


def split_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(`<split>.npz`, `<split>.json`) for `path` given with or without the `.npz` suffix
    (`etils.epath` paths: local, or remote `gs://...`)."""
    p = paths.as_path(path)
    if p.suffix in (".npz", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".npz"), p.with_name(p.name + ".json")


def digest(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a predictions file: its `.npz` then its `.json` bytes. metrics.json records it
    (`predictions_sha256`) and readers compare it with the file they find (`check_digest`)."""
    import hashlib

    h = hashlib.sha256()
    for part in split_paths(path):
        h.update(part.read_bytes())
    return h.hexdigest()


def check_digest(path: str | os.PathLike, want: str, reader: str) -> None:
    """UsageError naming `reader` (the metrics.json) when the predictions file at `path` no longer has
    the digest `want` the reader was computed from; nothing when the file is gone (a copied eval folder)."""
    npz, _ = split_paths(path)
    if npz.exists() and digest(path) != want:
        raise UsageError(f"{reader}: computed from other predictions than {npz} now holds (its SHA-256 differs: "
                         f"rewritten since); re-run dpft evaluate to get metrics of the current file")


def _fail(file: Path, field: str, msg: str) -> UsageError:
    return UsageError(f"{file}: field {field!r}: {msg}")


def _validate(npz: Path, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
    """Raise UsageError naming file and field for any shape/key/dtype problem."""
    js = npz.with_suffix(".json")
    for key in META_KEYS:
        if key not in meta:
            raise _fail(js, key, "missing")
    task = meta["task"]
    if task not in TASKS:
        raise _fail(js, "task", f"must be one of {TASKS}, got {task!r}")
    class_names = list(meta["class_names"])
    if meta["params"] not in PARAMS:
        raise _fail(js, "params", f"must be one of {', '.join(PARAMS)}, got {meta['params']!r}")
    unknown = [t for t in meta["eval_tasks"] if t not in class_names]
    if unknown:
        raise _fail(js, "eval_tasks", f"{unknown} are not among class_names")
    for key in ("example_id", "patient_id", "logits", "label"):
        if key not in arrays:
            raise _fail(npz, key, f"missing (keys present: {sorted(arrays)})")
    logits = arrays["logits"]
    if logits.ndim != 2 or logits.shape[1] != len(class_names):
        raise _fail(npz, "logits", f"shape {logits.shape}, expected [N, {len(class_names)}] (len(class_names))")
    if not np.issubdtype(logits.dtype, np.floating) or not np.all(np.isfinite(logits)):
        raise _fail(npz, "logits", f"must be finite floats, got dtype {logits.dtype}")
    n = logits.shape[0]
    for key in ("example_id", "patient_id"):
        if arrays[key].shape != (n,):
            raise _fail(npz, key, f"shape {arrays[key].shape}, expected ({n},)")
    if not np.issubdtype(arrays["example_id"].dtype, np.integer):
        raise _fail(npz, "example_id", f"must be integers, got dtype {arrays['example_id'].dtype}")
    label = arrays["label"]
    if task == "multiclass":
        if label.shape != (n,) or not np.issubdtype(label.dtype, np.integer):
            raise _fail(npz, "label", f"shape {label.shape} dtype {label.dtype}, expected int [{n}]")
        if n and (label.min() < 0 or label.max() >= len(class_names)):
            raise _fail(npz, "label", f"values must be in [0, {len(class_names)}), got {label.min()}..{label.max()}")
    else:
        shape = (n, len(class_names))
        if label.shape != shape:
            raise _fail(npz, "label", f"shape {label.shape}, expected {list(shape)}")
        if not np.all(np.isin(label, (0.0, 1.0))):
            raise _fail(npz, "label", "multilabel values must be 0 or 1")
        if "label_mask" not in arrays:
            raise _fail(npz, "label_mask", "missing (required for multilabel)")
        if arrays["label_mask"].shape != shape:
            raise _fail(npz, "label_mask", f"shape {arrays['label_mask'].shape}, expected {list(shape)}")
    for key, value in arrays.items():
        if key.startswith("attr_") and value.shape != (n,):
            raise _fail(npz, key, f"shape {value.shape}, expected ({n},)")
        if key not in ("example_id", "patient_id", "logits", "label", "label_mask") and not key.startswith("attr_"):
            raise _fail(npz, key, "unknown key (expected example_id, patient_id, logits, label, label_mask, attr_*)")


def write_predictions(path: str | os.PathLike, *, example_id: np.ndarray, patient_id: Sequence[str] | np.ndarray,
                      logits: np.ndarray, label: np.ndarray, label_mask: np.ndarray | None = None,
                      attrs: Mapping[str, Sequence[str] | np.ndarray] | None = None, task: str,
                      class_names: Sequence[str], eval_tasks: Sequence[str] = (), step: int, params: str = "ema",
                      epsilon: float | None = None, delta: float | None = None,
                      guarantee_valid: bool | None = None, privacy_unit: str | None = None) -> tuple[str, str]:
    """Write `<split>.npz` and `<split>.json` (path with or without `.npz`); returns both paths.

    Validates like `load_predictions`, so a file written here always loads.
    """
    npz, js = split_paths(path)
    arrays: dict[str, np.ndarray] = {
        "example_id": np.asarray(example_id, np.int64),
        "patient_id": np.asarray(patient_id).astype(str),
        "logits": np.asarray(logits, np.float32),
        "label": np.asarray(label, np.int64 if task == "multiclass" else np.float32),
    }
    if label_mask is not None:
        arrays["label_mask"] = np.asarray(label_mask, np.float32)
    for name, values in (attrs or {}).items():
        arrays[f"attr_{name}"] = np.asarray(values).astype(str)
    meta = {"task": task, "class_names": [str(c) for c in class_names], "eval_tasks": [str(t) for t in eval_tasks],
            "step": int(step), "params": params, "epsilon": None if epsilon is None else float(epsilon),
            "delta": None if delta is None else float(delta),
            "guarantee_valid": None if guarantee_valid is None else bool(guarantee_valid),
            "privacy_unit": None if epsilon is None or privacy_unit is None else str(privacy_unit)}
    _validate(npz, arrays, meta)
    npz.parent.mkdir(parents=True, exist_ok=True)
    # Per-patient rows (ids, attributes, labels): owner-only from the moment the file exists.
    atomic_io.write_bytes(npz, lambda f: np.savez(f, **arrays), private=True)
    atomic_io.write_json(js, meta, indent=2)
    return str(npz), str(js)


def load_predictions(path: str | os.PathLike) -> Predictions:
    """Read and validate `<split>.npz` + `<split>.json`; UsageError names the file and field."""
    npz, js = split_paths(path)
    for f in (npz, js):
        if not f.is_file():
            raise UsageError(f"{f}: predictions file not found")
    try:
        meta = json.loads(js.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UsageError(f"{js}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise UsageError(f"{js}: expected a JSON object, got {type(meta).__name__}")
    try:
        with np.load(io.BytesIO(npz.read_bytes()) if paths.is_remote(npz) else npz, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ValueError as e:
        raise UsageError(f"{npz}: cannot read without pickle ({e}); store strings as unicode arrays") from None
    _validate(npz, arrays, meta)
    attrs = {k[len("attr_"):]: arrays[k].astype(str) for k in sorted(arrays) if k.startswith("attr_")}
    mask = arrays.get("label_mask")
    return Predictions(
        example_id=arrays["example_id"].astype(np.int64), patient_id=arrays["patient_id"].astype(str),
        logits=arrays["logits"].astype(np.float32),
        label=arrays["label"].astype(np.int64 if meta["task"] == "multiclass" else np.float32),
        label_mask=None if mask is None else mask.astype(np.float32), attrs=attrs, task=meta["task"],
        class_names=tuple(meta["class_names"]), eval_tasks=tuple(meta["eval_tasks"]), step=int(meta["step"]),
        params=meta["params"], epsilon=meta["epsilon"], delta=meta["delta"], path=str(npz),
        guarantee_valid=meta.get("guarantee_valid"), privacy_unit=meta.get("privacy_unit"))
