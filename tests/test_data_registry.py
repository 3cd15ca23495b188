"""Everything dpft knows about a data set is in its `DatasetSpec`: a toy data set with demographics,
one module object plus one registry line, goes through the real `dpft prepare` -> `dpft train` ->
`dpft evaluate` with its attribute check, hint, path options and index.

The toy is registered only in this test process (monkeypatch of `dpft.data.DATASETS`), so the
commands run in-process through `dpft.cli.main` -- what the `dpft` console script calls -- rather
than as subprocesses, which would not see the registration.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import sys
import types
from typing import Any

import numpy as np
import pytest
from PIL import Image

from dpft import cli, data
from dpft.data import coverage
from dpft.data.base import DatasetSpec, ExampleTable, TableMeta, from_records, options_from

NAME = "toy_clinic"
SPLIT_OF_PATIENT = {**{p: "train" for p in range(8)}, **{p: "validation" for p in range(8, 12)},
                    **{p: "test" for p in range(12, 16)}}
IMAGES_PER_PATIENT = 2
NO_DEMOGRAPHICS, NO_SITE = 3, 5  # patient 3 is not in demographics.csv; patient 5 has a blank site
N_ROWS = len(SPLIT_OF_PATIENT) * IMAGES_PER_PATIENT


# ------------------------------------------------------------------ the toy data set (its module)

@dataclasses.dataclass(frozen=True)
class ClinicOptions:
    demographics_path: str | None = None  # CSV `patient,sex,site`; without it: no attributes


def load_clinic(root: str, **options: Any) -> dict[str, ExampleTable]:
    """{"train", "validation", "test"} from `<root>/labels.csv` (`image,patient,split,label`)."""
    opts = options_from(ClinicOptions, options, NAME)
    demo: dict[str, dict[str, str]] = {}
    if opts.demographics_path:
        with open(opts.demographics_path, newline="") as f:
            demo = {r["patient"]: r for r in csv.DictReader(f)}
    meta = TableMeta(name=NAME, task="multiclass", class_names=("negative", "positive"),
                     attribute_names=("sex", "site") if demo else ())
    rows: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    with open(os.path.join(root, "labels.csv"), newline="") as f:
        for i, r in enumerate(csv.DictReader(f)):
            who = demo.get(r["patient"], {})
            attrs = {a: who.get(a) or "Unknown" for a in meta.attribute_names}
            rows[r["split"]].append({"example_id": i, "patient_id": r["patient"], "label": int(r["label"]),
                                     "image": os.path.join(root, r["image"]), "attrs": attrs})
    return {split: from_records(recs, split=split, meta=meta) for split, recs in rows.items()}


def toy_module() -> types.ModuleType:
    """The one module a new data set adds: its options, its loader and its `DATASET`."""
    module = types.ModuleType(NAME)
    module.ClinicOptions, module.load_splits = ClinicOptions, load_clinic
    module.DATASET = DatasetSpec(
        load_clinic, ClinicOptions,
        required_attributes=("sex", "site"),
        attribute_hint="sex and site come from demographics.csv: --config.data.options.demographics_path=...",
        path_options=("demographics_path",),
        index_key=dataclasses.asdict,  # every option changes what an index holds
    )
    return module


@pytest.fixture
def toy(monkeypatch):
    """Registers the toy: its module object, and ONE line in the data set registry."""
    monkeypatch.setitem(sys.modules, NAME, toy_module())
    monkeypatch.setitem(data.DATASETS.entries, NAME, f"{NAME}:DATASET")


def write_clinic(root: str, demo_dir: str) -> str:
    """Tiny 8x8 PNGs and labels.csv under `root`; returns the path of demographics.csv in `demo_dir`."""
    os.makedirs(os.path.join(root, "images"))
    os.makedirs(demo_dir)
    rng = np.random.default_rng(0)
    with open(os.path.join(root, "labels.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "patient", "split", "label"])
        for p, split in SPLIT_OF_PATIENT.items():
            for k in range(IMAGES_PER_PATIENT):
                label = (p + k) % 2
                pixels = np.clip(rng.normal(80 + 100 * label, 30, (8, 8, 3)), 0, 255).astype(np.uint8)
                rel = os.path.join("images", f"p{p}_{k}.png")
                Image.fromarray(pixels).save(os.path.join(root, rel))
                w.writerow([rel, f"p{p}", split, label])
    demo = os.path.join(demo_dir, "demographics.csv")
    with open(demo, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient", "sex", "site"])
        for p in SPLIT_OF_PATIENT:
            if p != NO_DEMOGRAPHICS:
                w.writerow([f"p{p}", "Female" if p % 2 else "Male", "" if p == NO_SITE else ("north", "south")[p // 2 % 2]])
    return demo


CONFIG = '''
"""The toy clinic data set with a tiny NFNet (tests/test_data_registry.py)."""
from dpft.config.base import base_config, finalize


def get_config(arg=None):
    c = base_config(locked=False)
    c.model.name = "nfnet_nano"
    c.data.name = "toy_clinic"
    c.data.image_size = c.data.eval_image_size = 16
    c.data.random_crop = c.data.random_flip = False
    c.privacy.epsilon, c.privacy.delta = 8.0, 1e-3
    c.train.batch_size = c.train.physical_batch_size = 8  # one example per fake CPU device
    c.train.microbatch_size = 1
    c.train.num_updates = c.train.checkpoint_every = 2
    c.train.log_every = 1
    c.train.ema_decay = 0.0
    c.eval.batch_size = 8
    c.eval.params = "raw"
    c.eval.splits = ("validation", "test")
    return finalize(c)
'''


# ------------------------------------------------------------------ the spec is explicit

def test_a_spec_must_state_its_required_attributes():
    with pytest.raises(TypeError, match="required_attributes is not stated.*or \\(\\) for a data set without"):
        DatasetSpec(load_clinic, ClinicOptions)
    with pytest.raises(TypeError, match="required_attributes must be a tuple of attribute names"):
        DatasetSpec(load_clinic, ClinicOptions, required_attributes="sex")
    with pytest.raises(TypeError, match="path_options \\('demo_path',\\) must name fields of ClinicOptions"):
        DatasetSpec(load_clinic, ClinicOptions, required_attributes=(), path_options=("demo_path",))
    spec = DatasetSpec(load_clinic, ClinicOptions, required_attributes=())  # the explicit choice: none
    assert spec.required_attributes == () and not spec.indexed and spec.option_paths() == ()


def test_a_registered_object_that_is_not_a_spec_is_refused(monkeypatch):
    monkeypatch.setitem(data.DATASETS.entries, "not_a_spec", "math:pi")
    with pytest.raises(TypeError, match="data set 'not_a_spec': math:pi is a float, not a dpft.data.base.DatasetSpec"):
        data.dataset("not_a_spec")


def test_what_the_commands_read_of_each_registered_data_set():
    """The values the commands hard-coded before (coverage.DEFAULT_REQUIRED, prepare's INDEXED and
    'digits' cases, train's path options), now read from each spec: unchanged."""
    got = {n: (data.dataset(n).required_attributes, data.path_options(n), data.dataset(n).indexed,
               data.dataset(n).needs_root) for n in data.DATASETS}
    assert got == {
        "chexpert": (("sex", "age", "race"), ("demo_path", "index_dir"), True, True),
        "mimic_cxr": (("sex", "age", "race", "insurance"), ("mimic_iv_dir", "index_dir"), True, True),
        "imagenet": ((), (), False, True),
        "places365": ((), (), False, True),
        "digits": ((), (), False, False),
        "digits_patients": ((), (), False, False),
        "canaries": ((), (), False, False),
    }
    assert "demo_path=" in data.dataset("chexpert").attribute_hint
    assert "mimic_iv_dir=" in data.dataset("mimic_cxr").attribute_hint
    assert data.path_options("nope") == ()


def test_the_toy_spec_drives_the_generic_code(toy):
    assert coverage.required_attributes(NAME, None) == ("sex", "site")
    assert data.option_defaults(NAME) == {"demographics_path": None, "index_dir": None}
    assert data.path_options(NAME) == ("demographics_path", "index_dir")


# ------------------------------------------------------------------ prepare -> train -> evaluate

def _dpft(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli.main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.slow  # ~80 s of CPU time, mostly compiling the nfnet_nano DP step
def test_toy_data_set_with_demographics_prepare_train_evaluate(toy, tmp_path, capsys):
    root, prepared, workdir = str(tmp_path / "clinic"), str(tmp_path / "prepared"), str(tmp_path / "run")
    demo = write_clinic(root, str(tmp_path / "elsewhere"))
    config = tmp_path / "toy_clinic_tiny.py"
    config.write_text(CONFIG)

    # Without the demographics the spec's required attributes are absent: refused, with its hint.
    rc, _, err = _dpft(capsys, "prepare", NAME, "--source", root, "--out", prepared, "--no-progress")
    assert rc == 2 and "['sex', 'site'] have no value in any row" in err and "demographics_path=" in err, err

    rc, out, err = _dpft(capsys, "prepare", NAME, "--source", root, "--out", prepared, "--no-progress",
                         "--set", f"demographics_path={demo}")
    assert rc == 0, err
    assert f"attribute coverage: site {N_ROWS - 2 * IMAGES_PER_PATIENT}/{N_ROWS} (" in out
    with open(os.path.join(prepared, "summary.json")) as f:
        summary = json.load(f)["attribute_coverage"]
    assert summary["requested"] == ["sex", "site"]
    assert summary["attributes"]["sex"]["with_value"] == N_ROWS - IMAGES_PER_PATIENT
    with open(os.path.join(prepared, "index", "meta.json")) as f:
        assert json.load(f)["options"] == {"dataset": NAME, "demographics_path": demo}

    # The spec's path options are checked at once by `dpft train`, before any data is read.
    train = ["train", "--config", str(config), "--workdir", workdir, f"--config.data.root={root}"]
    for key in ("demographics_path", "index_dir"):
        rc, _, err = _dpft(capsys, *train, f"--config.data.options.{key}=hdfs://host/x")
        assert rc == 2 and f"config.data.options.{key}" in err and "hdfs://" in err, err
    assert not os.path.exists(workdir)

    os.remove(os.path.join(root, "labels.csv"))  # training reads the prepared index, not the sources
    rc, out, err = _dpft(capsys, *train, f"--config.data.options.demographics_path={demo}",
                         f"--config.data.options.index_dir={prepared}/index",
                         "--config.privacy.insecure_fixed_noise_seed=7", "--config.train.eval_every=0")
    assert rc == 0, out[-3000:] + err[-3000:]
    assert "WARNING: fairness attribute 'site' is missing ('Unknown') for 4 of 32 rows (train 4)" in out
    # a fixed (public) noise seed: every place that shows epsilon says there is no guarantee
    final = [line for line in out.splitlines() if line.startswith("final: ")][-1]
    assert "NO privacy guarantee (secret: insecure_fixed_noise_seed; nominal epsilon" in final, final
    assert_no_bare_epsilon(out, workdir)
    with open(os.path.join(workdir, "predictions", "2", "test.json")) as f:
        assert json.load(f)["guarantee_valid"] is False
    with open(os.path.join(workdir, "attribute_coverage.json")) as f:
        cov = json.load(f)
    assert cov["dataset"] == NAME and cov["requested"] == ["sex", "site"]
    assert cov["attributes"]["site"]["groups"] == {"Unknown": 4, "north": 14, "south": 14}
    assert cov["attributes"]["sex"]["splits"]["train"] == {"n": 16, "with_value": 14,
                                                         "groups": {"Female": 6, "Male": 8, "Unknown": 2},
                                                         "excluded": {}}

    rc, out, err = _dpft(capsys, "evaluate", "--workdir", workdir, "--bootstrap", "10", "--no-plots",
                         "--min-group-size", "1")
    assert rc == 0, out[-3000:] + err[-3000:]
    with open(os.path.join(workdir, "eval", "2", "metrics.json")) as f:
        groups = json.load(f)["groups"]
    assert set(groups["sex"]) == {"Female", "Male"} and set(groups["site"]) == {"north", "south"}
    with open(os.path.join(workdir, "eval", "2", "report.md")) as f:
        report = f.read()
    assert "site" in report and "north" in report
    assert "NO privacy guarantee (the run's noise was public; nominal epsilon=" in report

    rc, out, err = _dpft(capsys, "evaluate", "--compare", workdir, "--out", str(tmp_path / "compare"))
    assert rc == 0, out[-3000:] + err[-3000:]
    assert f"| 8.00 {NO_GUARANTEE} | 1 |" in out, out  # the run's cell in every table
    assert not [line for line in out.splitlines() if line.startswith("| 8.00 |")], out
    assert re.search(r"^\| run \| 8\.00 \| [0-9.]+ per example \(NO GUARANTEE: public noise\) \|", out, re.M), out


NO_GUARANTEE = "(NO GUARANTEE: public noise)"


def assert_no_bare_epsilon(out: str, workdir: str) -> None:
    """Issue 31: every epsilon a run with public noise shows says there is no guarantee: the start-up
    lines, every progress line, metrics.jsonl (guarantee_valid false beside each epsilon) and
    TensorBoard (epsilon under the tag epsilon/NO_GUARANTEE_public_noise, never "epsilon")."""
    from dpft.testing.events import scalars

    lines = out.splitlines()
    shown = [line for line in lines if re.search(r"\beps(ilon)?\b[^|;]*?\d", line)]
    start = [line for line in lines if line.startswith("DP-SGD per ")]
    progress = [line for line in lines if line.startswith("update ") and " | eps " in line]
    assert len(start) == 1, start
    assert re.search(r"; epsilon at the end [0-9.]+ \(NO GUARANTEE: public noise\)$", start[0]), start
    assert progress and all(f"{NO_GUARANTEE} | ETA" in line for line in progress), progress
    bare = [line for line in shown if NO_GUARANTEE not in line and "NO privacy guarantee" not in line]
    assert not bare, bare
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if '"epsilon"' in line]
    assert records and all(r["guarantee_valid"] is False for r in records), records
    tags = scalars(workdir)
    assert "epsilon" not in tags and tags["epsilon/NO_GUARANTEE_public_noise"] == [  # float32 in TensorBoard
        (r["step"], pytest.approx(r["epsilon"], rel=1e-6)) for r in records]
