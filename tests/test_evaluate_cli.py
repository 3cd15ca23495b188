"""`dpft evaluate` flags: statistics options, --reuse-predictions without checkpoints, --params polyak,
--compare over two axes."""
import json
import os
import subprocess
import sys

import pytest

from dpft.cli import main
from dpft.errors import UsageError
from dpft.testing.predictions import write_synthetic_workdir
from dpft.config import base as cb
from dpft.config.validation import validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flags_reach_the_report_and_reuse_needs_no_checkpoint(tmp_path, capsys):
    wd = tmp_path / "run"
    write_synthetic_workdir(wd, n_test=300, n_val=200, step=6)
    assert not (wd / "checkpoints").exists()
    out = tmp_path / "out"
    rc = main(["evaluate", "--workdir", str(wd), "--reuse-predictions", "--bootstrap", "25", "--seed", "3",
               "--ci-level", "0.9", "--threshold-method", "fpr", "--target-fpr", "0.2", "--threshold", "0.45",
               "--min-group-size", "5", "--exclude-small-groups", "--intersect", "sex*race",
               "--exclude-group", "race=Asian", "--out", str(out), "--no-plots"])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    cfg = m["meta"]["config"]
    assert (cfg["n_resamples"], cfg["seed"], cfg["ci_level"], cfg["threshold_method"], cfg["target_fpr"],
            cfg["fixed_threshold"], cfg["min_group_size"], cfg["exclude_small_groups"]) == \
        (25, 3, 0.9, "fpr", 0.2, 0.45, 5, True)
    assert cfg["intersections"] == ["sex*race"] and cfg["exclude_groups"] == ["race=Asian"]
    assert m["meta"]["bootstrap"]["n_resamples"] == 25 and "sex&race" in m["groups"]
    assert "FPR <= 0.2" in m["meta"]["thresholds"]["source"]
    assert not list(out.glob("*.png")) and not (wd / "eval").exists()  # --out: the workdir's eval/ untouched
    # the default output directory and the default bootstrap size
    assert main(["evaluate", "--workdir", str(wd), "--reuse-predictions", "--bootstrap", "10"]) == 0
    assert (wd / "eval" / "6" / "metrics.json").is_file() and list((wd / "eval" / "6").glob("groups_*.png"))


def test_cli_errors_exit_2(tmp_path, capsys):
    wd = tmp_path / "run"
    write_synthetic_workdir(wd, n_test=100, n_val=50, step=2)
    assert main(["evaluate", "--workdir", str(tmp_path / "missing"), "--reuse-predictions"]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "missing").exists()
    (tmp_path / "empty").mkdir()
    assert main(["evaluate", "--workdir", str(tmp_path / "empty"), "--reuse-predictions"]) == 2
    assert "no predictions/<step>/ found" in capsys.readouterr().err
    assert main(["evaluate", "--workdir", str(wd), "--reuse-predictions", "--checkpoint", "9"]) == 2
    assert "no predictions for update 9; have [2]" in capsys.readouterr().err
    assert main(["evaluate", "--workdir", str(wd), "--reuse-predictions", "--ci-level", "2"]) == 2
    assert "ci_level" in capsys.readouterr().err
    assert main(["evaluate", "--workdir", str(wd), "--reuse-predictions", "--exclude-group", "race"]) == 2
    assert "ATTRIBUTE=GROUP" in capsys.readouterr().err
    assert main(["evaluate", "--workdir", str(wd), "--reuse-predictions", "--split", "train"]) == 2


def test_compare_cli_two_axes(tmp_path, capsys):
    runs = []
    for f in (0.01, 0.1):
        for e in (1.15, None):
            wd = tmp_path / f"f{f}_e{e}"
            write_synthetic_workdir(wd, n_test=150, n_val=100, step=3, epsilon=e, seed=int(f * 100))
            cfg = json.loads((wd / "config.json").read_text())
            cfg["data"] = {"options": {"minority_fraction": f}}
            (wd / "config.json").write_text(json.dumps(cfg))
            assert main(["evaluate", "--workdir", str(wd), "--reuse-predictions", "--bootstrap", "10",
                         "--no-plots"]) == 0
            runs.append(str(wd))
    capsys.readouterr()
    out = tmp_path / "cmp"
    assert main(["evaluate", "--compare", *runs, "--x", "data.options.minority_fraction", "--series",
                 "privacy.epsilon", "--attribute", "sex", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| 1.15 | 0.01 | 1 |" in text and "| non-private | 0.1 | 1 |" in text
    assert (out / "compare.png").is_file()
    assert main(["evaluate", "--compare", *runs, "--out", str(out)]) == 2  # fractions would be averaged


def test_polyak_is_a_valid_eval_params_only_with_polyak_kept():
    c = cb.base_config(locked=False)
    c.train.polyak = True
    c.eval.params = "polyak"
    validate(c, num_examples=10_000, num_devices=1)
    c.train.polyak = False
    with pytest.raises(UsageError, match="config.train.polyak=True"):
        validate(c, num_examples=10_000, num_devices=1)


def test_params_polyak_refused_clearly_when_not_kept(tmp_path, capsys):
    from dpft.evaluate import evaluate_cli

    c = cb.base_config()
    (tmp_path / "config.json").write_text(cb.config_to_json(c))
    with pytest.raises(UsageError, match="kept no Polyak average"):
        evaluate_cli.predict_from_checkpoint(str(tmp_path), 1, ["test"], "polyak")


# `dpft evaluate --params polyak` on a run that kept a Polyak average, in one process and in two:
# tests/test_multihost_train.py::test_two_processes_train_and_evaluate_like_one_process.


def test_real_layout_chexpert_with_three_test_patients(tmp_path, capsys):
    """The official CheXpert layout with 3 test patients (groups with one class, single-group
    attributes): `dpft evaluate` finishes, and every undefined value is null with a reason."""
    import numpy as np

    from dpft.data import fake, load_splits
    from dpft.workdir.predictions import write_predictions
    from dpft.inference.predictor import table_columns

    root = tmp_path / "chexpert"
    fake.write_fake_chexpert(str(root), n_patients=30, n_valid_patients=3, image_size=16)
    tables = load_splits("chexpert", str(root), uncertainty="ones", frontal_only=True, age_edges=(18, 40, 60, 80))
    wd = tmp_path / "run"
    rng = np.random.default_rng(0)
    for split in ("validation", "test"):
        cols = table_columns(tables[split])
        attrs = {k[5:]: v for k, v in cols.items() if k.startswith("attr_")}
        logits = rng.normal(size=cols["label"].shape) + 2 * cols["label"] - 1
        write_predictions(wd / "predictions" / "4" / split, example_id=cols["example_id"],
                          patient_id=cols["patient_id"], logits=logits, label=cols["label"],
                          label_mask=cols["label_mask"], attrs=attrs, task="multilabel",
                          class_names=tables[split].class_names, eval_tasks=tables[split].eval_tasks, step=4,
                          epsilon=8.0, delta=1e-5)
    n_pat = len(set(table_columns(tables["test"])["patient_id"]))
    assert n_pat == 3
    (wd / "config.json").write_text(json.dumps({"privacy": {"epsilon": 8.0}}))
    rc = main(["evaluate", "--workdir", str(wd), "--reuse-predictions", "--bootstrap", "200",
               "--intersect", "sex*age"])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((wd / "eval" / "4" / "metrics.json").read_text())
    assert m["meta"]["n_patients"] == 3
    n_undefined = 0
    for attr, metrics in m["gaps"].items():
        for metric, e in metrics.items():
            groups = m["groups"][attr]
            defined = [g for g in m["meta"]["groups_compared"][attr] if groups[g]["metrics"][metric]["value"] is not None]
            assert (e["gap"]["value"] is None) == (len(defined) < 2), (attr, metric)
            if e["gap"]["value"] is None:
                n_undefined += 1
                assert e["gap"]["undefined"].startswith(f"{metric} defined in {len(defined)} of")
    for attr, par in m["parity"].items():
        for name, s in par.items():
            assert (s["value"] is None) == ("undefined" in s), (attr, name)
    assert n_undefined > 0
    md = (wd / "eval" / "4" / "report.md").read_text()
    assert "n/a (" in md
