"""reports.py and compare.py: files written and parseable, values consistent, hooks, errors."""
import json

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from dpft.cli import UsageError
from dpft.evaluate import compare as C
from dpft.evaluate import reports as R
from dpft.evaluate.predictions import load_predictions, synthetic_predictions, write_predictions, write_synthetic_workdir


def _strict_json(path):
    def no_nan(x):
        raise ValueError(f"non-standard JSON constant {x} in {path}")
    return json.loads(path.read_text(), parse_constant=no_nan)


def _png_ok(path):
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100


@pytest.fixture(scope="module")
def ml_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("ml")
    paths = write_synthetic_workdir(wd, task="multilabel", n_test=400, n_val=300, step=12)
    result = R.evaluate_predictions(paths["test"], paths["validation"], n_resamples=60, seed=1)
    return wd, paths, result


def test_report_files_written_and_parseable(ml_run):
    wd, paths, result = ml_run
    out = wd / "eval" / "12"
    m = _strict_json(out / "metrics.json")
    assert m["meta"]["step"] == 12 and m["meta"]["split"] == "test" and m["meta"]["bootstrap"]["unit"] == "patient"
    assert "validation" in m["meta"]["thresholds"]["source"]
    assert set(m["groups"]) == {"sex", "age", "race"}
    preds = load_predictions(paths["test"])
    j = preds.class_names.index("Edema")
    keep = preds.label_mask[:, j] > 0
    auc = roc_auc_score(preds.label[keep, j], preds.logits[keep, j])
    stat = m["overall"]["auc/Edema"]
    assert stat["value"] == pytest.approx(auc, rel=1e-6)
    assert stat["ci"][0] <= stat["value"] <= stat["ci"][1] and stat["n_valid"] == 60
    gap = m["gaps"]["sex"]["auc_mean"]
    f, mm = (m["groups"]["sex"][g]["metrics"]["auc_mean"]["value"] for g in ("F", "M"))
    assert gap["gap"]["value"] == pytest.approx(abs(f - mm))
    assert gap["worst_group"] == ("F" if f < mm else "M")  # the synthetic data disadvantage F
    assert "demographic_parity_difference/Edema" in m["parity"]["sex"]
    assert "underdiagnosis" in m["groups"]["race"]["White"]["metrics"]
    md = (out / "report.md").read_text()
    for heading in ("## Overall", "## Subgroups: sex", "### Gaps over sex", "### Parity over sex"):
        assert heading in md
    table_rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert all(line.count("|") == table_rows[0].count("|") for line in table_rows[:3])
    for attr in ("sex", "age", "race"):
        _png_ok(out / f"groups_{attr}.png")
    assert result["overall"] == m["overall"]


def test_thresholds_fall_back_to_half_without_validation(tmp_path):
    paths = write_synthetic_workdir(tmp_path, n_test=200, n_val=50)
    m = R.evaluate_predictions(paths["test"], n_resamples=10, plots=False, out_dir=str(tmp_path / "out"))
    assert set(m["meta"]["thresholds"]["values"].values()) == {0.5}
    assert "threshold 0.5" in (tmp_path / "out" / "report.md").read_text()
    assert not list((tmp_path / "out").glob("*.png"))


def test_multiclass_report(tmp_path):
    paths = write_synthetic_workdir(tmp_path, task="multiclass", n_test=300, n_val=100)
    m = R.evaluate_predictions(paths["test"], paths["validation"], n_resamples=20)
    preds = load_predictions(paths["test"])
    assert m["overall"]["top1"]["value"] == pytest.approx(np.mean(preds.logits.argmax(1) == preds.label))
    assert "auc_macro" in m["gaps"]["group"] and "class_accuracy/class_0" in m["overall"]
    assert (tmp_path / "eval" / "100" / "groups_group.png").is_file()


def test_small_groups_flagged_not_dropped(tmp_path):
    kw = synthetic_predictions(300, task="multilabel", seed=2)
    site = np.where(np.arange(300) < 12, "tiny", "big")  # patient ids are not contiguous; fine for a flag
    kw["attrs"] = dict(kw["attrs"], site=site)
    npz, _ = write_predictions(tmp_path / "predictions" / "5" / "test", step=5, **kw)
    m = R.evaluate_predictions(npz, n_resamples=10, min_group_size=30, plots=False)
    tiny = m["groups"]["site"]["tiny"]
    assert tiny["small"] and any("n=12 < 30" in f for f in tiny["flags"]) and tiny["metrics"]
    assert not m["groups"]["site"]["big"]["small"]
    assert "tiny" in m["gaps"]["site"]["auc_mean"]["gap_to_best"]
    assert any("site=tiny" in n for n in m["meta"]["notes"])
    ex = R.evaluate_predictions(npz, n_resamples=10, min_group_size=30, plots=False, exclude_small_groups=True,
                                out_dir=str(tmp_path / "ex"))
    assert "tiny" not in ex["gaps"]["site"]["auc_mean"]["gap_to_best"] and "tiny" in ex["groups"]["site"]
    assert ex["gaps"]["site"]["auc_mean"]["gap"]["value"] == 0.0  # one group left


def test_config_and_path_errors(tmp_path, ml_run):
    _, paths, _ = ml_run
    with pytest.raises(UsageError, match="unknown option.*n_resample"):
        R.evaluate_predictions(paths["test"], n_resample=5)
    with pytest.raises(UsageError, match="ci_level"):
        R.evaluate_predictions(paths["test"], ci_level=1.5)
    kw = synthetic_predictions(50, task="multiclass")
    npz, _ = write_predictions(tmp_path / "loose" / "test", step=1, **kw)
    with pytest.raises(UsageError, match="out_dir"):
        R.evaluate_predictions(npz, n_resamples=5)
    with pytest.raises(UsageError, match="class_names differ"):
        R.evaluate_predictions(npz, paths["validation"], n_resamples=5, out_dir=str(tmp_path / "o"))


# ----------------------------------------------------------------------------- individual epsilon hook

def test_individual_epsilon_summary_quantiles_per_group(tmp_path):
    rng = np.random.default_rng(0)
    eps = rng.gamma(2.0, 1.0, 500)
    sex = rng.choice(["F", "M"], 500)
    s = R.individual_epsilon_summary(eps, {"sex": sex}, png_path=tmp_path / "h.png")
    assert s["overall"]["n"] == 500 and s["overall"]["q50"] == pytest.approx(np.median(eps))
    for g in ("F", "M"):
        x = eps[sex == g]
        assert s["groups"]["sex"][g]["q95"] == pytest.approx(np.quantile(x, 0.95))
        assert s["groups"]["sex"][g]["mean"] == pytest.approx(x.mean())
    _png_ok(tmp_path / "h.png")
    with pytest.raises(ValueError, match="sex"):
        R.individual_epsilon_summary(eps, {"sex": sex[:3]})


def test_individual_epsilon_hook_in_report(tmp_path):
    paths = write_synthetic_workdir(tmp_path, n_test=150, n_val=100)
    eps = np.linspace(0.5, 4.0, 80)
    np.savez(tmp_path / "individual_epsilon.npz", example_id=np.arange(80), epsilon=eps,
             attr_sex=np.where(np.arange(80) % 2, "F", "M"))
    m = R.evaluate_predictions(paths["test"], paths["validation"], n_resamples=10)
    assert m["individual_epsilon"]["overall"]["q50"] == pytest.approx(np.median(eps))
    assert set(m["individual_epsilon"]["groups"]["sex"]) == {"F", "M"}
    out = tmp_path / "eval" / "100"
    assert "## Individual privacy" in (out / "report.md").read_text()
    _png_ok(out / "individual_epsilon.png")
    # The training loop's summary beside the npz adds the worst case and the loss correlation.
    from dpft.privacy import individual
    losses = eps ** 2  # monotone in eps: Spearman rho must be exactly 1
    summary = individual.summarise(eps, {"sex": np.where(np.arange(80) % 2, "F", "M")}, None, losses,
                                   worst_case_epsilon=4.5)
    summary["run_epsilon"] = {"value": 4.5, "accountant": "pld"}
    summary["min_group_size"] = 41  # the run's setting: each sex has 40 examples -> suppressed
    (tmp_path / "individual_epsilon.json").write_text(json.dumps(summary, default=float))
    m = R.evaluate_predictions(paths["test"], paths["validation"], n_resamples=10, plots=False)
    assert m["individual_epsilon"]["worst_case_epsilon"] == 4.5
    assert m["individual_epsilon"]["spearman_loss"]["rho"] == pytest.approx(1.0)
    assert m["individual_epsilon"]["groups"]["sex"]["F"] == {"n": 40, "suppressed": True}
    text = (out / "report.md").read_text()
    assert "the run's epsilon (pld" in text and "rho = 1.000" in text and "suppressed (n < 41)" in text
    assert "min" not in json.dumps(m["individual_epsilon"]).replace("min_group_size", "")
    np.savez(tmp_path / "individual_epsilon.npz", example_id=np.arange(3))
    with pytest.raises(UsageError, match="'epsilon'.*missing"):
        R.evaluate_predictions(paths["test"], n_resamples=5, plots=False)


# ----------------------------------------------------------------------------- compare

def _fake_run(root, name, config, bias, step=3):
    wd = root / name
    paths = write_synthetic_workdir(wd, n_test=200, n_val=150, step=step, bias=bias, seed=len(name))
    (wd / "config.json").write_text(json.dumps(config))
    R.evaluate_predictions(paths["test"], paths["validation"], n_resamples=15, plots=False)
    return wd


def test_compare_three_runs(tmp_path):
    runs = [_fake_run(tmp_path, "nonpriv", {"privacy": {"enabled": False, "epsilon": 8.0}}, 0.2),
            _fake_run(tmp_path, "eps8", {"privacy.epsilon": 8, "privacy.enabled": True}, 1.0),
            _fake_run(tmp_path, "eps1", {"privacy": {"epsilon": 1.0}}, 2.0)]
    out = C.compare_runs([str(r) for r in runs], tmp_path / "cmp")
    assert [r["run"] for r in out["runs"]] == ["eps1", "eps8", "nonpriv"]
    assert [r["epsilon"] for r in out["runs"]] == [1.0, 8.0, None]
    assert out["runs"][0]["epsilon_spent"] == 8.0  # from the predictions file (the synthetic ones say 8)
    assert out["utility_metric"] == "auc_mean" and out["attributes"] == ["age", "race", "sex"]
    for r in out["runs"]:
        m = _strict_json(tmp_path / r["run"] / "eval" / "3" / "metrics.json")
        assert r["utility"] == m["overall"]["auc_mean"]
        assert r["gaps"]["sex"]["gap"] == m["gaps"]["sex"]["auc_mean"]["gap"]
    saved = _strict_json(tmp_path / "cmp" / "compare.json")
    assert saved["runs"] == json.loads(json.dumps(out["runs"]))
    md = (tmp_path / "cmp" / "compare.md").read_text().splitlines()
    rows = [line for line in md if line.startswith("| eps") or line.startswith("| nonpriv")]
    assert len(rows) == 3 and "non-private" in rows[2]
    _png_ok(tmp_path / "cmp" / "compare.png")


def test_compare_errors(tmp_path):
    run = _fake_run(tmp_path, "r", {"privacy": {"epsilon": "abc"}}, 1.0)
    with pytest.raises(UsageError, match=r"config\.json.*privacy\.epsilon"):
        C.compare_runs([run], tmp_path / "cmp")
    (run / "config.json").write_text(json.dumps({"privacy": {"epsilon": "inf"}}))
    assert C.read_epsilon(run) is None
    with pytest.raises(UsageError, match="no <step>/metrics.json"):
        C.compare_runs([tmp_path / "missing"], tmp_path / "cmp")
    with pytest.raises(UsageError, match="no run directories"):
        C.compare_runs([], tmp_path / "cmp")
