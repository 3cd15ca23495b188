"""Real on-disk layouts end to end: CheXpert + DEMO table and MIMIC-CXR-JPG + MIMIC-IV (hosp/ and
core/, in a folder apart), a tiny `dpft train` + `dpft evaluate` each; every requested fairness
attribute reaches the predictions and the report, and a missing demographics table fails loudly."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dpft.data import fake
from dpft.workdir.predictions import load_predictions
from dpft.testing import cpu as cpu_env

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "fake_chexpert_tiny.py")
TIMEOUT = 900
COMMON = ["--config.model.name=nfnet_nano", "--config.train.num_updates=2", "--config.train.eval_every=0",
          "--config.train.checkpoint_every=2", "--config.train.batch_size=8", "--config.train.physical_batch_size=8"]

MIMIC_CONFIG = os.path.join(REPO, "configs", "fake_mimic_cxr_tiny.py")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DPFT_", "SLURM_", "TPU_"))}
    env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS=cpu_env.xla_flags(1))
    return env


def dpft(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpft.cli", *args], env=_env(), cwd=REPO, capture_output=True,
                          text=True, timeout=TIMEOUT)


def train_and_evaluate(config: str, workdir: str, *overrides: str) -> tuple[str, dict]:
    tr = dpft("train", "--config", config, "--workdir", workdir, *COMMON, *overrides)
    assert tr.returncode == 0, tr.stdout[-3000:] + tr.stderr[-3000:]
    ev = dpft("evaluate", "--workdir", workdir, "--bootstrap", "10")
    assert ev.returncode == 0, ev.stdout[-3000:] + ev.stderr[-3000:]
    out = tr.stdout + ev.stdout
    with open(os.path.join(workdir, "attribute_coverage.json")) as f:
        return out, json.load(f)


def _check(workdir: str, out: str, coverage: dict, attributes: tuple[str, ...]) -> None:
    step = max(int(s) for s in os.listdir(os.path.join(workdir, "predictions")))
    preds = load_predictions(os.path.join(workdir, "predictions", str(step), "test.npz"))
    report = open(os.path.join(workdir, "eval", str(step), "report.md")).read()
    for a in attributes:
        assert a in preds.attrs, (a, list(preds.attrs))
        assert any(v != "Unknown" for v in preds.attrs[a]), a
        assert a in report, a
        assert f"attribute coverage: {a} " in out, a
        assert coverage["attributes"][a]["with_value"] > 0


def test_chexpert_with_demo_table_and_the_patient_as_unit(tmp_path):
    """CheXpert with its DEMO table apart, trained with privacy.unit=patient through `dpft train` and
    `dpft evaluate`: every fairness attribute reaches the predictions and the report; N counts the
    training split's patients, epsilon per patient is dp-accounting's PLD on (B / N_patients, sigma, T)
    (composed here directly), the report says "per patient", and individual accounting gives one epsilon
    per patient. (Example-level CheXpert runs: the MIMIC tests below and tests/test_train_e2e.py.)"""
    import dp_accounting
    import numpy as np

    from dpft.config import build
    from dpft.config.base import load_config
    root = fake.write_fake_chexpert(str(tmp_path / "chexpert"), n_patients=24, n_valid_patients=6, demo="xlsx")
    demo = tmp_path / "stanford" / "CHEXPERT DEMO.xlsx"
    demo.parent.mkdir()
    os.replace(os.path.join(root, "CHEXPERT DEMO.xlsx"), demo)
    # Without the table: race is requested by default, so training refuses, naming demo_path.
    bad = dpft("train", "--config", TINY, "--workdir", str(tmp_path / "w0"), f"--config.data.root={root}", *COMMON)
    assert bad.returncode == 2 and "race" in bad.stderr and "demo_path" in bad.stderr, bad.stderr[-2000:]
    assert "NO RACE" in bad.stderr
    workdir = str(tmp_path / "w")
    overrides = [f"--config.data.root={root}", f"--config.data.options.demo_path={demo}", "--config.privacy.unit=patient",
                 "--config.privacy.unit_cap=2", "--config.individual.enabled=True", "--config.individual.every=1"]
    out, cov = train_and_evaluate(TINY, workdir, *overrides)
    _check(workdir, out, cov, ("sex", "age", "race"))
    assert "WARNING: fairness attribute 'race' is missing" in out  # the writer leaves one patient out of DEMO

    config = load_config(TINY, [o[2:] for o in COMMON + overrides])
    table = build.load_tables(config)["train"]
    patients = sorted(set(table.column("patient_id")))
    assert len(patients) < len(table)  # several images per patient
    with open(os.path.join(workdir, "privacy_plan.json")) as f:
        plan = json.load(f)
    assert plan["unit"] == "patient" and plan["num_examples"] == plan["num_units"] == len(patients)
    assert plan["patients"]["cap"] == 2 and plan["patients"]["num_rows"] == len(table)
    q = 8 / len(patients)
    assert plan["sampling_rate"] == pytest.approx(q, rel=1e-12)
    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(plan["noise_multiplier"])),
                       plan["num_updates"])
    want = accountant.get_epsilon(plan["delta"])
    step = max(int(s) for s in os.listdir(os.path.join(workdir, "predictions")))
    preds = load_predictions(os.path.join(workdir, "predictions", str(step), "test.npz"))
    assert preds.epsilon == pytest.approx(want, rel=1e-3), (preds.epsilon, want)
    assert preds.privacy_unit == "patient"
    report = open(os.path.join(workdir, "eval", str(step), "report.md")).read()
    assert f"epsilon={preds.epsilon:.2f}, delta={preds.delta:g} per patient" in report
    assert "privacy unit: the patient" in out and f"N={len(patients)} patients" in out
    indiv = np.load(os.path.join(workdir, "individual_epsilon.npz"))
    assert indiv["example_id"].tolist() == list(range(len(patients)))
    assert np.all(indiv["epsilon"] <= preds.epsilon * (1 + 1e-9)) and np.all(indiv["epsilon"] > 0)
    # Evaluation reads the demographics as training did: with the DEMO table moved away, `dpft evaluate`
    # refuses (exit 2, naming the option) instead of writing a report without race.
    assert "attribute coverage: race " in out  # evaluate printed the coverage too (and training)
    os.replace(demo, tmp_path / "moved.xlsx")
    ev = dpft("evaluate", "--workdir", workdir, "--bootstrap", "10")
    errors = [l for l in ev.stderr.splitlines() if l.startswith("dpft evaluate: error: ")]
    assert ev.returncode == 2 and len(errors) == 1, ev.stdout[-2000:] + ev.stderr[-2000:]
    assert "demographics table not found (option demo_path)" in errors[0], errors[0]


def test_evaluate_refuses_an_attribute_that_vanished_since_training(tmp_path):
    """A DEMO table found by the default search at training time and gone at evaluation: race has no value
    now, although the run's attribute_coverage.json recorded values; evaluation refuses, naming race."""
    from dpft.config.base import load_config
    from dpft.errors import DataError
    from dpft.evaluate.evaluate_cli import check_coverage
    from dpft.config import build
    root = fake.write_fake_chexpert(str(tmp_path / "chexpert"), n_patients=24, n_valid_patients=6, demo=None)
    config = load_config(TINY, [f"--config.data.root={root}", "--config.data.attributes=sex,age"])
    tables = build.load_tables(config)
    then = build.attribute_report(config, tables, print_fn=lambda s: None)
    then["attributes"]["race"] = {"n": 10, "with_value": 10, "groups": {"White": 10}, "splits": {}}
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "attribute_coverage.json").write_text(json.dumps(then))
    lines = []
    with pytest.raises(DataError, match=r"attribute\(s\) \['race'\] had values when the run trained"):
        check_coverage(str(tmp_path / "w"), config, tables, lines.append)
    assert lines[0].startswith("attribute coverage: sex ") and not any(" race " in l for l in lines), lines
    del then["attributes"]["race"]
    (tmp_path / "w" / "attribute_coverage.json").write_text(json.dumps(then))
    assert check_coverage(str(tmp_path / "w"), config, tables, lines.append)["requested"] == ["sex", "age"]


#: One layout end to end (the v1.0 core/ and flat layouts, and the ethnicity column of v1, are read by the same
#: loader: tests/test_data_mimic.py::test_mimic_iv_in_separate_folder_every_layout checks them row by row).
@pytest.mark.parametrize("layout,version", [("hosp", 2)])
def test_mimic_with_mimic_iv_apart(tmp_path, layout, version):
    root, iv = str(tmp_path / "mimic-cxr-jpg" / "2.0.0"), str(tmp_path / "mimiciv" / f"{version}.0")
    fake.write_fake_mimic_cxr(root, n_subjects=24, iv_root=iv, iv_layout=layout, iv_version=version,
                              unlabeled_studies=1)
    config = MIMIC_CONFIG
    bad = dpft("train", "--config", str(config), "--workdir", str(tmp_path / "w0"), f"--config.data.root={root}",
               *COMMON)
    assert bad.returncode == 2 and "mimic_iv_dir" in bad.stderr and "NO DEMOGRAPHICS" in bad.stderr, bad.stderr[-2000:]
    workdir = str(tmp_path / "w")
    out, cov = train_and_evaluate(str(config), workdir, f"--config.data.root={root}",
                                  f"--config.data.options.mimic_iv_dir={iv}")
    _check(workdir, out, cov, ("sex", "age", "race", "insurance"))
    # The race rule on the real layout: unknown-type admissions are not a vote, a documented conflict is its
    # own group, and the report states the rule.
    from dpft.data.subgroups import RACE_RULE
    manifest = fake.read_manifest(root)
    step = max(int(s) for s in os.listdir(os.path.join(workdir, "predictions")))
    preds = load_predictions(os.path.join(workdir, "predictions", str(step), "test.npz"))
    want = {m["subject"]: m["race"] for m in manifest["images"].values()}
    assert [want[p] for p in preds.patient_id] == list(preds.attrs["race"]) and "Conflicting" in preds.attrs["race"]
    metrics = json.load(open(os.path.join(workdir, "eval", str(step), "metrics.json")))
    assert RACE_RULE in metrics["meta"]["rules"] and RACE_RULE in open(
        os.path.join(workdir, "eval", str(step), "report.md")).read()

