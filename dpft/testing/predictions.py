"""Synthetic predictions and workdirs for tests, notebooks and docs (random but informative logits).

Testing-only: nothing in the training or evaluation path imports this package.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from dpft import atomic_io
from dpft.workdir.predictions import CHEXPERT_CLASSES, CHEXPERT_EVAL_TASKS, TASKS, write_predictions


def synthetic_predictions(n: int = 400, *, task: str = "multilabel", seed: int = 0, images_per_patient: int = 2,
                          num_classes: int = 5, bias: float = 1.0) -> dict[str, Any]:
    """Keyword arguments for `write_predictions` with random but informative logits.

    multilabel: CheXpert's 14 classes and 5 eval tasks, ~10% masked labels, attrs sex/age/race;
    multiclass: `num_classes` classes, attr group A/B. Group "F" / "B" gets noisier scores
    (`bias` scales the disadvantage) so gaps are visible. Patients have `images_per_patient` images.
    """
    rng = np.random.default_rng(seed)
    patients = np.arange(n) // max(1, images_per_patient)
    pid_codes = rng.permutation(patients.max() + 1)[patients]
    per_patient = lambda values: np.asarray(values)[pid_codes]  # noqa: E731  (attrs constant per patient)
    n_pat = int(pid_codes.max()) + 1
    if task == "multilabel":
        classes = CHEXPERT_CLASSES
        attrs = {"sex": per_patient(rng.choice(["F", "M"], n_pat)),
                 "age": per_patient(rng.choice(["18-40", "40-60", "60-80", "80+"], n_pat, p=[.2, .3, .4, .1])),
                 "race": per_patient(rng.choice(["White", "Black", "Asian"], n_pat, p=[.6, .25, .15]))}
        findings = (rng.random((n, len(classes) - 1)) < 0.3).astype(np.float32)
        no_finding = (findings.sum(1, keepdims=True) == 0).astype(np.float32)
        label = np.concatenate([no_finding, findings], axis=1)
        noise = 1.0 + bias * (attrs["sex"] == "F")[:, None]
        logits = (2 * label - 1) * 1.5 + noise * rng.normal(size=label.shape) - 0.5
        mask = (rng.random(label.shape) > 0.1).astype(np.float32)
        extra: dict[str, Any] = {"label_mask": mask, "eval_tasks": CHEXPERT_EVAL_TASKS}
    elif task == "multiclass":
        classes = tuple(f"class_{i}" for i in range(num_classes))
        attrs = {"group": per_patient(rng.choice(["A", "B"], n_pat, p=[0.7, 0.3]))}
        label = rng.integers(0, num_classes, n)
        noise = 1.0 + bias * (attrs["group"] == "B")[:, None]
        logits = 2.5 * np.eye(num_classes)[label] + noise * rng.normal(size=(n, num_classes))
        extra = {}
    else:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return dict(example_id=np.arange(n), patient_id=np.char.add("p", pid_codes.astype(str)), logits=logits,
                label=label, attrs=attrs, task=task, class_names=classes, **extra)


def write_synthetic_workdir(workdir: str | os.PathLike, *, task: str = "multilabel", step: int = 100,
                            n_test: int = 400, n_val: int = 300, epsilon: float | None = 8.0, seed: int = 0,
                            bias: float = 1.0, guarantee_valid: bool | None = None) -> dict[str, str]:
    """A tiny workdir: config.json + predictions/<step>/{validation,test}.{npz,json}. Returns their paths.
    `guarantee_valid` False: predictions of a run whose noise was public (epsilon nominal)."""
    workdir = Path(workdir)
    pred_dir = workdir / "predictions" / str(step)
    delta = 1e-5 if epsilon is not None else None
    out = {}
    for split, n, s in (("validation", n_val, seed + 1), ("test", n_test, seed)):
        npz, _ = write_predictions(pred_dir / split, step=step, epsilon=epsilon, delta=delta,
                                   guarantee_valid=guarantee_valid, **synthetic_predictions(n, task=task, seed=s, bias=bias))
        out[split] = npz
    config = {"privacy": {"enabled": epsilon is not None, "epsilon": epsilon, "delta": delta}}
    atomic_io.write_json(workdir / "config.json", config, indent=2)
    out["config"] = str(workdir / "config.json")
    return out
