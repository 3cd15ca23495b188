"""reports.py and compare.py: files written and parseable, values consistent, hooks, errors."""
import json

import numpy as np
import pytest

from dpft.evaluate import plots
from PIL import Image
from sklearn.metrics import roc_auc_score

from dpft.errors import UsageError
from dpft.evaluate import compare as C
from dpft.evaluate import reports as R
from dpft.workdir.predictions import load_predictions, write_predictions
from dpft.testing.predictions import synthetic_predictions, write_synthetic_workdir


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


def test_groups_csv_is_every_number_of_the_group_tables_one_per_row(ml_run):
    """groups.csv read back with pandas: one row per (scope, attribute, group, metric/task), equal to
    metrics.json's value and interval (a walk of metrics.json here); undefined values are empty cells
    with their reason; an AUC recomputed with sklearn for one group row."""
    import pandas as pd

    wd, paths, _ = ml_run
    out = wd / "eval" / "12"
    m = _strict_json(out / "metrics.json")
    df = pd.read_csv(out / "groups.csv", keep_default_na=False, na_values=[""])
    want = {("overall", "", "", name): stat for name, stat in m["overall"].items()}
    for attr, groups in m["groups"].items():
        for group, entry in groups.items():
            want.update({("group", attr, group, name): stat for name, stat in entry["metrics"].items()})
    assert len(df) == len(want)
    for row in df.itertuples(index=False):
        name = row.metric + (f"/{row.task}" if isinstance(row.task, str) and row.task else "")
        stat = want[(row.scope, row.attribute if isinstance(row.attribute, str) else "",
                     row.group if isinstance(row.group, str) else "", name)]
        if stat["value"] is None:
            assert np.isnan(row.value) and row.undefined == stat["undefined"]
        else:
            assert row.value == pytest.approx(stat["value"], rel=1e-12)
            assert [row.ci_low, row.ci_high] == pytest.approx(stat["ci"], rel=1e-12)
    preds = load_predictions(paths["test"])
    j, sel = preds.class_names.index("Edema"), (preds.attrs["sex"] == "F")
    keep = sel & (preds.label_mask[:, j] > 0)
    got = df[(df.attribute == "sex") & (df.group == "F") & (df.metric == "auc") & (df.task == "Edema")].value.item()
    assert got == pytest.approx(roc_auc_score(preds.label[keep, j], preds.logits[keep, j]), rel=1e-6)


def test_roc_curves_and_reliability_diagrams_per_group(ml_run):
    """roc_<attr>.png and calibration_<attr>.png per attribute; the reliability points equal scikit-learn's
    calibration_curve (uniform bins)."""
    from sklearn.calibration import calibration_curve

    wd, _, _ = ml_run
    for attr in ("sex", "age", "race"):
        for kind in ("roc", "calibration"):
            _png_ok(wd / "eval" / "12" / f"{kind}_{attr}.png")
    rng = np.random.default_rng(4)
    p = rng.random(500)
    y = rng.random(500) < p
    mean_p, frac, count = plots.reliability(y, p, bins=10)
    want_frac, want_p = calibration_curve(y, p, n_bins=10, strategy="uniform")
    np.testing.assert_allclose(frac, want_frac, rtol=1e-12)
    np.testing.assert_allclose(mean_p, want_p, rtol=1e-12)
    assert count.sum() == 500


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
    site = np.where(np.isin(kw["patient_id"], np.unique(kw["patient_id"])[:6]), "tiny", "big")  # 6 patients
    kw["attrs"] = dict(kw["attrs"], site=site)
    npz, _ = write_predictions(tmp_path / "predictions" / "5" / "test", step=5, **kw)
    m = R.evaluate_predictions(npz, n_resamples=10, min_group_size=30, plots=False)
    tiny = m["groups"]["site"]["tiny"]
    assert tiny["small"] and tiny["small_reason"] == "6 patients < 30" and tiny["n_patients"] == 6
    assert "small: 6 patients < 30" in tiny["flags"] and tiny["metrics"]
    assert not m["groups"]["site"]["big"]["small"]
    assert "tiny" in m["gaps"]["site"]["auc_mean"]["gap_to_best"]
    assert any("site=tiny" in n for n in m["meta"]["notes"])
    ex = R.evaluate_predictions(npz, n_resamples=10, min_group_size=30, plots=False, exclude_small_groups=True,
                                out_dir=str(tmp_path / "ex"))
    assert "tiny" not in ex["gaps"]["site"]["auc_mean"]["gap_to_best"] and "tiny" in ex["groups"]["site"]
    assert ex["meta"]["groups_compared"]["site"] == ["big"]
    # one group left: the gap is undefined (null, with the reason), never 0
    gap = ex["gaps"]["site"]["auc_mean"]["gap"]
    assert gap["value"] is None and gap["ci"] == [None, None]
    assert gap["undefined"] == "auc_mean defined in 1 of 1 compared groups of site (needs 2)"
    assert ex["parity"]["site"]["demographic_parity_difference/Edema"]["value"] is None
    md = (tmp_path / "ex" / "report.md").read_text()
    assert "| auc_mean | higher is better | n/a (auc_mean defined in 1 of 1 compared groups of site (needs 2))" in md


def _walk_stats(node, path=()):
    """Every statistic dict ({value, ci, n_valid}) in a metrics.json tree, with its path."""
    if isinstance(node, dict):
        if "value" in node and "ci" in node:
            yield path, node
        else:
            for k, v in node.items():
                yield from _walk_stats(v, path + (k,))


def test_three_patient_split_never_crashes_and_reports_undefined(tmp_path):
    """Like the official CheXpert test split of a small copy: 3 patients, groups with one class."""
    kw = synthetic_predictions(6, task="multilabel", seed=11, images_per_patient=2)
    val = synthetic_predictions(8, task="multilabel", seed=12, images_per_patient=2)
    npz, _ = write_predictions(tmp_path / "predictions" / "7" / "test", step=7, **kw)
    vnpz, _ = write_predictions(tmp_path / "predictions" / "7" / "validation", step=7, **val)
    m = R.evaluate_predictions(npz, vnpz, n_resamples=50, intersections=("sex*race",))
    _strict_json(tmp_path / "eval" / "7" / "metrics.json")
    stats = list(_walk_stats({k: m[k] for k in ("overall", "groups", "gaps", "parity")}))
    undefined = [(p, s) for p, s in stats if s["value"] is None]
    assert undefined, "a 3-patient split must have undefined comparisons"
    for p, s in undefined:
        assert s["undefined"] and s["ci"] == [None, None], p
    for p, s in stats:  # a gap over groups where fewer than two are defined is never a number
        if p[0] == "gaps" and p[-1] == "gap":
            defined = [g for g, e in m["groups"][p[1]].items() if e["metrics"][p[2]]["value"] is not None]
            assert (s["value"] is None) == (len(defined) < 2), p
    md = (tmp_path / "eval" / "7" / "report.md").read_text()
    assert "n/a (" in md
    assert any(p[0] == "gaps" and s["value"] is None for p, s in undefined)
    for attr in m["groups"]:
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in attr)
        _png_ok(tmp_path / "eval" / "7" / f"groups_{safe}.png")


def test_multiclass_group_without_a_class_gap_is_undefined(tmp_path):
    """Digit 8 absent from the minority: its AUC / equal opportunity comparisons are n/a, not 0."""
    kw = synthetic_predictions(400, task="multiclass", seed=13, num_classes=10)
    g = np.asarray(kw["attrs"]["group"]).copy()
    g[kw["label"] == 8] = "A"
    kw["attrs"] = {"group": g}
    npz, _ = write_predictions(tmp_path / "predictions" / "2" / "test", step=2, **kw)
    m = R.evaluate_predictions(npz, n_resamples=30)
    assert m["groups"]["group"]["B"]["missing_class"]["class_8"].startswith("0 positive")
    assert not m["groups"]["group"]["B"]["small"]
    for metric in ("auc/class_8", "tpr/class_8"):
        assert m["gaps"]["group"][metric]["gap"]["value"] is None
    eo = m["parity"]["group"]["equal_opportunity_difference/class_8"]
    assert eo["value"] is None and "1 of 2 compared groups have positives" in eo["undefined"]
    assert m["parity"]["group"]["demographic_parity_difference/class_8"]["value"] is not None
    assert "class_8" not in m["meta"]["parity_tasks"]["group"]["equal_opportunity_difference"]
    assert m["meta"]["common_tasks"]["group"]["auc_macro"] == [f"class_{i}" for i in range(10) if i != 8]
    md = (tmp_path / "eval" / "2" / "report.md").read_text()
    assert "| auc/class_8 | higher is better | n/a (auc/class_8 defined in 1 of 2 compared groups of group" in md
    assert "equal_opportunity_difference/class_8 | n/a (class_8: 1 of 2 compared groups have positives" in md
    _png_ok(tmp_path / "eval" / "2" / "groups_group.png")


def test_group_missing_positives_stays_in_other_gaps_with_exclude_small(tmp_path):
    """A large group without Edema positives is not 'small': exclude_small_groups keeps it everywhere;
    only its Edema metrics that need positives are undefined."""
    kw = synthetic_predictions(600, task="multilabel", seed=14)
    j = list(kw["class_names"]).index("Edema")
    site = np.where(kw["label"][:, j] > 0, "with", "without")  # 'without' has no Edema positives
    kw["attrs"] = {"site": site}
    npz, _ = write_predictions(tmp_path / "predictions" / "1" / "test", step=1, **kw)
    m = R.evaluate_predictions(npz, n_resamples=20, plots=False, exclude_small_groups=True, min_group_size=30)
    without = m["groups"]["site"]["without"]
    assert not without["small"] and list(without["missing_class"]) == ["Edema"]
    assert m["meta"]["groups_compared"]["site"] == ["with", "without"]
    assert m["gaps"]["site"]["auc/Atelectasis"]["gap"]["value"] is not None
    assert m["gaps"]["site"]["auc/Edema"]["gap"]["value"] is None
    assert m["gaps"]["site"]["fpr/Atelectasis"]["gap"]["value"] is not None
    # group auc_mean averages the tasks defined in both groups (not Edema), also in each group
    common = m["meta"]["common_tasks"]["site"]["auc_mean"]
    assert "Edema" not in common and len(common) == 4
    for grp in ("with", "without"):
        e = m["groups"]["site"][grp]["metrics"]
        assert e["auc_mean"]["value"] == pytest.approx(np.mean([e[f"auc/{t}"]["value"] for t in common]))


def test_threshold_fallback_stated_per_task(tmp_path):
    paths = write_synthetic_workdir(tmp_path, n_test=200, n_val=150, step=4)
    val = load_predictions(paths["validation"])
    j = val.class_names.index("Cardiomegaly")
    label = val.label.copy()
    label[:, j] = 0.0  # validation has no Cardiomegaly positive
    write_predictions(paths["validation"], step=4, example_id=val.example_id, patient_id=val.patient_id,
                      logits=val.logits, label=label, label_mask=val.label_mask, attrs=val.attrs, task=val.task,
                      class_names=val.class_names, eval_tasks=val.eval_tasks, epsilon=8.0, delta=1e-5)
    m = R.evaluate_predictions(paths["test"], paths["validation"], n_resamples=10, plots=False, fixed_threshold=0.4)
    per = m["meta"]["thresholds"]["per_task"]
    assert per["Cardiomegaly"]["value"] == 0.4 and per["Cardiomegaly"]["fallback"].startswith("validation has 0 positive")
    assert per["Edema"]["fallback"] is None and per["Edema"]["method"] == "youden"
    assert "fallback to 0.4 for Cardiomegaly" in m["meta"]["thresholds"]["source"]
    md = (tmp_path / "eval" / "4" / "report.md").read_text()
    assert "  - Cardiomegaly: 0.400 (fallback: validation has 0 positive" in md
    f1 = R.evaluate_predictions(paths["test"], paths["validation"], n_resamples=5, plots=False,
                                threshold_method="f1", out_dir=str(tmp_path / "f1"))
    assert f1["meta"]["thresholds"]["per_task"]["Edema"]["method"] == "f1" and "max F1" in f1["meta"]["thresholds"]["source"]
    fixed = R.evaluate_predictions(paths["test"], paths["validation"], n_resamples=5, plots=False,
                                   threshold_method="fixed", fixed_threshold=0.7, out_dir=str(tmp_path / "fx"))
    assert set(fixed["meta"]["thresholds"]["values"].values()) == {0.7}


def test_rules_stated_and_worst_ci_labelled(ml_run):
    wd, _, result = ml_run
    md = (wd / "eval" / "12" / "report.md").read_text()
    assert "CI of that minimum over bootstrap replicates, not the CI of the worst group's own value" in md
    assert "groups without positives (negatives) of a task are left out" in md
    assert "worst value [95% CI of the min over groups]" in md
    assert "average only the tasks defined in every compared group" in md
    assert R.EvalConfig().n_resamples >= 1000
    for p in ("demographic_parity_ratio", "equal_opportunity_ratio", "equalized_odds_difference",
              "equalized_odds_ratio"):
        assert f"{p}/Edema" in result["parity"]["sex"] and f"{p}/mean" in result["parity"]["sex"]


def test_intersections_and_user_exclusions(tmp_path):
    paths = write_synthetic_workdir(tmp_path, n_test=600, n_val=200, step=9)
    m = R.evaluate_predictions(paths["test"], paths["validation"], n_resamples=10, plots=True,
                               intersections=["sex*race"], exclude_groups=["race=Asian"])
    groups = m["groups"]["sex&race"]
    assert set(groups) == {f"{s} & {r}" for s in ("F", "M") for r in ("Asian", "Black", "White")}
    assert groups["F & Asian"]["excluded"] == "excluded by the user (race=Asian)"
    assert m["meta"]["groups_compared"]["sex&race"] == ["F & Black", "F & White", "M & Black", "M & White"]
    assert m["meta"]["groups_compared"]["race"] == ["Black", "White"]
    assert "Asian" not in m["gaps"]["race"]["auc_mean"]["gap_to_best"]
    preds = load_predictions(paths["test"])
    j = preds.class_names.index("Edema")
    rows = (preds.attrs["sex"] == "M") & (preds.attrs["race"] == "Black") & (preds.label_mask[:, j] > 0)
    assert groups["M & Black"]["metrics"]["auc/Edema"]["value"] == pytest.approx(
        roc_auc_score(preds.label[rows, j], preds.logits[rows, j]))
    assert any("race=Asian" in n for n in m["meta"]["notes"])
    _png_ok(tmp_path / "eval" / "9" / "groups_sex_race.png")
    # Excluding a group the split lacks is a note naming the groups (plain strings), not an error.
    absent = R.evaluate_predictions(paths["test"], n_resamples=5, plots=False, exclude_groups=["race=Martian"])
    note = next(n for n in absent["meta"]["notes"] if "race=Martian" in n)
    assert "match no group" in note and "(groups: Asian, Black, White)" in note and "np.str_" not in note
    assert absent["meta"]["groups_compared"]["race"] == ["Asian", "Black", "White"]
    with pytest.raises(UsageError, match="unknown attribute"):
        R.evaluate_predictions(paths["test"], n_resamples=5, plots=False, intersections=["sex*site"])


def test_control_features_compare_groups_within_each_stratum_as_fairlearn(tmp_path):
    """`dpft evaluate --control age`: the sex comparison within each age bin ('sex|age=<bin>'), equal to
    fairlearn's MetricFrame(..., control_features=age).difference() / .ratio() per bin (selection rate, TPR:
    demographic parity and equal opportunity; between groups and to the bin's overall), and an AUC gap within a bin equal to sklearn on that bin's
    rows; the rows of other bins are a group left out, named."""
    from fairlearn.metrics import MetricFrame, selection_rate, true_positive_rate

    from dpft import cli

    paths = write_synthetic_workdir(tmp_path, n_test=800, n_val=300, step=4)
    assert cli.main(["evaluate", "--workdir", str(tmp_path), "--reuse-predictions", "--bootstrap", "10",
                     "--no-plots", "--control", "age"]) == 0
    m = _strict_json(tmp_path / "eval" / "4" / "metrics.json")
    preds = load_predictions(paths["test"])
    thr = m["meta"]["thresholds"]["values"]
    t = "Edema"
    j = preds.class_names.index(t)
    keep = preds.label_mask[:, j] > 0
    y = preds.label[keep, j] > 0.5
    d = preds.probabilities()[keep, j] >= thr[t]
    sex, age = np.asarray(preds.attrs["sex"])[keep], np.asarray(preds.attrs["age"])[keep]
    frames = {f: MetricFrame(metrics=f, y_true=y, y_pred=d, sensitive_features=sex, control_features=age)
              for f in (selection_rate, true_positive_rate)}
    for level in sorted(set(age.tolist())):
        par = m["parity"][f"sex|age={level}"]
        for f, name in ((selection_rate, "demographic_parity"), (true_positive_rate, "equal_opportunity")):
            assert par[f"{name}_difference/{t}"]["value"] == pytest.approx(frames[f].difference().loc[level], abs=1e-12)
            assert par[f"{name}_ratio/{t}"]["value"] == pytest.approx(frames[f].ratio().loc[level], abs=1e-12)
            # to_overall: each group against the whole stratum (its rows of every group), not the whole split
            assert par[f"{name}_difference_to_overall/{t}"]["value"] == pytest.approx(
                frames[f].difference(method="to_overall").loc[level], abs=1e-12)
            assert par[f"{name}_ratio_to_overall/{t}"]["value"] == pytest.approx(
                frames[f].ratio(method="to_overall").loc[level], abs=1e-12)
        groups = m["groups"][f"sex|age={level}"]
        assert groups["(outside the stratum)"]["excluded"] == f"rows outside the stratum age={level} (control feature)"
        rows = (np.asarray(preds.attrs["age"]) == level) & (preds.label_mask[:, j] > 0)
        for g in ("F", "M"):
            sel = rows & (np.asarray(preds.attrs["sex"]) == g)
            assert groups[g]["metrics"][f"auc/{t}"]["value"] == pytest.approx(
                roc_auc_score(preds.label[sel, j], preds.logits[sel, j]))
    assert "sex|age=18-40" in (tmp_path / "eval" / "4" / "report.md").read_text()
    assert cli.main(["evaluate", "--workdir", str(tmp_path), "--reuse-predictions", "--no-plots",
                     "--control", "site"]) == 2


def test_an_empty_attribute_value_is_the_unknown_group_and_can_be_excluded(tmp_path):
    kw = synthetic_predictions(300, task="multilabel", seed=3)
    race = np.asarray(kw["attrs"]["race"]).astype(object)
    race[:40] = ""
    kw["attrs"] = {**kw["attrs"], "race": race.astype(str)}
    npz, _ = write_predictions(tmp_path / "test", step=1, **kw)
    out = R.evaluate_predictions(npz, n_resamples=5, plots=False, exclude_groups=["race=Unknown"],
                                 out_dir=str(tmp_path / "eval"))
    assert "" not in out["groups"]["race"] and out["groups"]["race"]["Unknown"]["n"] >= 40
    assert out["groups"]["race"]["Unknown"]["excluded"] == "excluded by the user (race=Unknown)"


def test_plots_accept_a_ci_that_excludes_the_point(tmp_path, ml_run):
    """A percentile CI can lie above the estimate (gaps); plots draw it instead of crashing."""
    _, _, result = ml_run
    bad = json.loads(json.dumps(result))
    for g in bad["groups"]["sex"].values():
        s = g["metrics"]["auc_mean"]
        s["ci"] = [s["value"] + 0.01, s["value"] + 0.05]
    bad["groups"]["sex"]["F"]["metrics"]["accuracy_mean"] = {"value": None, "ci": [None, None], "n_valid": 0,
                                                             "undefined": "test"}
    paths = plots.write_group_plots(bad, tmp_path)
    for p in paths:
        _png_ok(p)


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
    from dpft.privacy.individual import groups as individual_groups
    losses = eps ** 2  # monotone in eps: Spearman rho must be exactly 1
    summary = individual_groups.summarise(eps, {"sex": np.where(np.arange(80) % 2, "F", "M")}, None, losses,
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


def test_a_run_with_public_noise_says_no_guarantee_in_its_report_and_comparison(tmp_path):
    wd = tmp_path / "insecure"
    paths = write_synthetic_workdir(wd, n_test=120, n_val=80, step=3, guarantee_valid=False)
    m = R.evaluate_predictions(paths["test"], paths["validation"], n_resamples=5, plots=False)
    assert m["meta"]["guarantee_valid"] is False
    assert "NO privacy guarantee (the run's noise was public; nominal epsilon=8.00" in (
        wd / "eval" / "3" / "report.md").read_text()
    old = tmp_path / "old"  # predictions from before guarantee_valid was recorded: said, not assumed
    paths = write_synthetic_workdir(old, n_test=120, n_val=80, step=3)
    R.evaluate_predictions(paths["test"], paths["validation"], n_resamples=5, plots=False)
    assert "epsilon=8.00, delta=1e-05 (whether the noise was secret is not recorded" in (
        old / "eval" / "3" / "report.md").read_text()
    secure = _fake_run(tmp_path, "secure", {"privacy": {"enabled": True, "epsilon": 4.0, "delta": 1e-5}}, 1.0)
    C.compare_runs([str(wd), str(secure)], tmp_path / "cmp")
    rows = {line.split("|")[1].strip(): line for line in (tmp_path / "cmp" / "compare.md").read_text().splitlines()
            if line.startswith("| insecure") or line.startswith("| secure")}
    assert "8.00 (NO GUARANTEE: public noise)" in rows["insecure"] and "NO GUARANTEE" not in rows["secure"]


def test_every_epsilon_label_of_a_comparison_marks_a_group_with_a_run_without_guarantee(tmp_path, monkeypatch):
    """Issue 31: not only the run's row: the aggregate cells' x column, the paired differences, the
    plot's x ticks and compare.json say "NO GUARANTEE" for a cell holding a run whose noise was public;
    the cells of secure runs do not."""
    def run(name, epsilon, guarantee_valid, bias):  # the same test rows in every run: paired differences
        paths = write_synthetic_workdir(tmp_path / name, n_test=120, n_val=80, step=3, bias=bias,
                                        epsilon=8.0 if epsilon else None, guarantee_valid=guarantee_valid)
        (tmp_path / name / "config.json").write_text(json.dumps({"privacy": {"enabled": bool(epsilon),
                                                                              "epsilon": epsilon}}))
        R.evaluate_predictions(paths["test"], paths["validation"], n_resamples=5, plots=False)
        return str(tmp_path / name)

    runs = [run("insecure", 8.0, False, 1.0), run("secure", 4.0, True, 1.5), run("nonpriv", None, None, 0.2)]
    figures = []
    monkeypatch.setattr(C, "save_figure", lambda fig, path: figures.append(fig))
    out = C.compare_runs(runs, tmp_path / "cmp", attribute="sex")
    mark = "(NO GUARANTEE: public noise)"
    assert [c["no_guarantee_runs"] for c in out["cells"]] == [[], ["insecure"], []]  # x 4, 8, non-private
    assert [p["no_guarantee_runs"] for p in out["paired"]] == [[], ["insecure"]]
    md = (tmp_path / "cmp" / "compare.md").read_text()
    tables = md.split("## Runs")[0].splitlines()
    assert [line.split("|")[1].strip() for line in tables if line.startswith("| 8.00")] == [f"8.00 {mark}"] * 2
    assert [line.split("|")[1].strip() for line in tables if line.startswith("| 4.00")] == ["4.00"] * 2
    assert not [line for line in tables if line.startswith("| non-private") and "NO GUARANTEE" in line]
    assert f"Marked {mark}" in md
    ticks = {t.get_text() for ax in figures[0].axes for t in ax.get_xticklabels()}
    assert ticks == {"4.00", f"8.00\n{mark}"}, ticks
    cmd_out = C.render_compare_markdown(_strict_json(tmp_path / "cmp" / "compare.json"))
    assert cmd_out == md  # what `dpft evaluate --compare` prints and compare.md: from compare.json alone


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


def _study(root, fractions=(0.01, 0.3), epsilons=(1.15, 4.98, None), seeds=(0, 1)):
    runs = []
    for f in fractions:
        for e in epsilons:
            for sd in seeds:
                name = f"f{f}_e{e}_s{sd}"
                cfg = {"privacy": {"enabled": e is not None, "epsilon": 8.0 if e is None else e},
                       "data": {"options": {"minority_fraction": f}}, "seed": sd}
                runs.append(_fake_run(root, name, cfg, bias=1.0 + f + (0 if e is None else 1 / e), step=3))
    return runs


@pytest.mark.slow  # quick tier budget (docs/running.md)
def test_compare_two_axes_with_seeds(tmp_path):
    from scipy import stats

    runs = _study(tmp_path)
    out = C.compare_runs(runs, tmp_path / "cmp", x="data.options.minority_fraction", series="privacy.epsilon")
    assert len(out["cells"]) == 6 and all(c["n_runs"] == 2 for c in out["cells"])
    assert [(c["series"], c["x"]) for c in out["cells"]] == [(1.15, 0.01), (1.15, 0.3), (4.98, 0.01), (4.98, 0.3),
                                                            (None, 0.01), (None, 0.3)]
    for c in out["cells"]:
        ms = [_strict_json(tmp_path / r / "eval" / "3" / "metrics.json") for r in c["runs"]]
        seeds = sorted(json.loads((tmp_path / r / "config.json").read_text())["seed"] for r in c["runs"])
        assert seeds == [0, 1]
        for got, values in ((c["utility"], [m["overall"]["auc_mean"]["value"] for m in ms]),
                            (c["gaps"]["sex"], [m["gaps"]["sex"]["auc_mean"]["gap"]["value"] for m in ms]),
                            (c["parity"]["race"]["equalized_odds_difference"],
                             [m["parity"]["race"]["equalized_odds_difference/mean"]["value"] for m in ms])):
            assert got["value"] == pytest.approx(np.mean(values)) and got["n"] == 2
            half = stats.t.ppf(0.975, 1) * np.std(values, ddof=1) / np.sqrt(2)
            assert got["ci"] == pytest.approx([np.mean(values) - half, np.mean(values) + half])
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| 4.98 | 0.01 | 2 |" in md and "| non-private | 0.3 | 2 |" in md
    assert "EqOdds diff (sex)" in md and "DP ratio (race)" in md
    _png_ok(tmp_path / "cmp" / "compare.png")
    # x = epsilon, series = fraction: the non-private runs have no x and become dashed lines
    out2 = C.compare_runs(runs, tmp_path / "cmp2", series="data.options.minority_fraction")
    assert [c["x"] for c in out2["cells"]] == [1.15, 4.98, None] * 2
    _png_ok(tmp_path / "cmp2" / "compare.png")
    # one seed: the run's own bootstrap interval; a run with an undefined gap is counted, not averaged as 0
    one = C.compare_runs(runs[:1], tmp_path / "cmp3", x="data.options.minority_fraction", series="privacy.epsilon")
    assert one["cells"][0]["utility"]["ci"] == _strict_json(runs[0] / "eval" / "3" / "metrics.json")[
        "overall"]["auc_mean"]["ci"] and one["cells"][0]["utility"]["ci_kind"] == "bootstrap of one run"
    m = _strict_json(runs[1] / "eval" / "3" / "metrics.json")
    m["gaps"]["sex"]["auc_mean"]["gap"] = {"value": None, "ci": [None, None], "n_valid": 0, "undefined": "x"}
    (runs[1] / "eval" / "3" / "metrics.json").write_text(json.dumps(m))
    out4 = C.compare_runs(runs[:2], tmp_path / "cmp4", x="data.options.minority_fraction", series="privacy.epsilon")
    gap = out4["cells"][0]["gaps"]["sex"]
    assert gap["n"] == 1 and gap["n_undefined"] == 1
    assert gap["value"] == pytest.approx(_strict_json(runs[0] / "eval" / "3" / "metrics.json")
                                         ["gaps"]["sex"]["auc_mean"]["gap"]["value"])


def test_compare_honours_the_ci_level_and_shows_what_each_cell_rests_on(tmp_path):
    """--ci-level sets the t interval over seeds; a cell of one run shows that run's bootstrap interval
    (marked *), and a cell whose value only some runs define says how many ("n 1/2")."""
    from scipy import stats

    runs = _study(tmp_path, fractions=(0.01,), epsilons=(1.15,), seeds=(0, 1))
    values = [_strict_json(r / "eval" / "3" / "metrics.json")["overall"]["auc_mean"]["value"] for r in runs]
    for level in (0.8, 0.99):
        out = C.compare_runs(runs, tmp_path / f"cmp{level}", x="data.options.minority_fraction", ci_level=level)
        half = stats.t.ppf((1 + level) / 2, 1) * np.std(values, ddof=1) / np.sqrt(2)
        assert out["cells"][0]["utility"]["ci"] == pytest.approx(
            np.clip([np.mean(values) - half, np.mean(values) + half], 0, 1))
    from dpft import cli  # through the command: --ci-level reaches the comparison
    assert cli.main(["evaluate", "--compare", *map(str, runs), "--x", "data.options.minority_fraction",
                     "--ci-level", "0.8", "--out", str(tmp_path / "cli")]) == 0
    assert _strict_json(tmp_path / "cli" / "compare.json")["cells"][0]["utility"] == \
        _strict_json(tmp_path / "cmp0.8" / "compare.json")["cells"][0]["utility"]
    m = _strict_json(runs[1] / "eval" / "3" / "metrics.json")
    m["gaps"]["sex"]["auc_mean"]["gap"] = {"value": None, "ci": [None, None], "n_valid": 0, "undefined": "x"}
    (runs[1] / "eval" / "3" / "metrics.json").write_text(json.dumps(m))
    out = C.compare_runs(runs, tmp_path / "cmp", x="data.options.minority_fraction", attribute="sex")
    gap = out["cells"][0]["gaps"]["sex"]
    own = _strict_json(runs[0] / "eval" / "3" / "metrics.json")["gaps"]["sex"]["auc_mean"]["gap"]
    assert gap["ci"] == own["ci"] and gap["ci_kind"] == "bootstrap of one run"
    row = next(line for line in (tmp_path / "cmp" / "compare.md").read_text().splitlines() if line.startswith("| 0.01"))
    assert f"{own['value']:.3f} [{own['ci'][0]:.3f}, {own['ci'][1]:.3f}]* (n 1/2)" in row


def test_private_minus_non_private_gap_is_paired_by_seed_on_the_same_test_rows(tmp_path):
    """The imbalance study's question, per fraction: the private gap minus the non-private one. Point: the
    mean over seeds of the differences of each run's own metrics.json gaps (recomputed here from its
    predictions); interval: a paired bootstrap over patients and seeds, which cancels the shared patient
    noise (identical runs differ by exactly 0) and is narrower than the unpaired one."""
    runs = []
    for eps, bias in ((1.15, 2.5), (None, 1.0)):
        for sd in (0, 1):
            wd = tmp_path / f"f0.1_e{eps}_s{sd}"
            paths = write_synthetic_workdir(wd, n_test=300, n_val=200, step=3, seed=7, bias=bias + 0.1 * sd)
            (wd / "config.json").write_text(json.dumps({"privacy": {"enabled": eps is not None, "epsilon": eps or 8.0},
                                                        "data": {"options": {"minority_fraction": 0.1}}, "seed": sd}))
            R.evaluate_predictions(paths["test"], paths["validation"], n_resamples=40, plots=False)
            runs.append(wd)
    out = C.compare_runs(runs, tmp_path / "cmp", x="data.options.minority_fraction", series="privacy.epsilon",
                         attribute="sex")
    (p,) = out["paired"]
    gaps = {r.name: _strict_json(r / "eval" / "3" / "metrics.json")["gaps"]["sex"]["auc_mean"]["gap"]["value"]
            for r in runs}
    per_seed = [gaps[f"f0.1_e1.15_s{sd}"] - gaps[f"f0.1_eNone_s{sd}"] for sd in (0, 1)]
    assert p["series"] == 1.15 and p["x"] == 0.1 and p["n_pairs"] == 2
    assert p["per_seed"] == pytest.approx(per_seed, rel=1e-9) and p["value"] == pytest.approx(np.mean(per_seed))
    assert p["ci"][0] < p["value"] < p["ci"][1]
    assert "## Private minus non-private gap (paired)" in (tmp_path / "cmp" / "compare.md").read_text()
    from dpft.evaluate import paired
    docs = [(_strict_json(r / "eval" / "3" / "metrics.json"), str(r / "eval" / "3" / "metrics.json")) for r in runs]
    same = paired.paired_gap_difference([(docs[2], docs[2]), (docs[3], docs[3])], "sex")
    assert same["value"] == 0.0 and same["ci"] == [0.0, 0.0]
    unpaired = [paired.gap_replicates(d, path, "sex", 200, s)[1] for (d, path), s in ((docs[0], 1), (docs[2], 2))]
    width = lambda v: np.subtract(*np.nanquantile(v, [0.975, 0.025]))  # noqa: E731
    one = paired.paired_gap_difference([(docs[0], docs[2])], "sex")
    assert one["ci"][1] - one["ci"][0] < width(unpaired[0] - unpaired[1])


def test_compare_refuses_to_average_runs_that_differ_beyond_seeds(tmp_path):
    runs = _study(tmp_path, fractions=(0.01, 0.3), epsilons=(1.15,), seeds=(0,))
    with pytest.raises(UsageError, match=r"differ in \['data.options.minority_fraction'\]"):
        C.compare_runs(runs, tmp_path / "cmp")  # x = epsilon only: the two fractions would be averaged
    with pytest.raises(UsageError, match="no field"):
        C.compare_runs(runs, tmp_path / "cmp", series="data.options.typo")


def test_save_figure_is_atomic(tmp_path):
    """A figure that fails half-way through rendering leaves the previous PNG intact and no temp file;
    a good figure replaces it with a readable PNG."""
    from dpft.evaluate import plots

    plt = plots.pyplot()
    target = tmp_path / "groups_sex.png"
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    plots.save_figure(fig, target)
    good = target.read_bytes()
    assert good.startswith(b"\x89PNG\r\n\x1a\n")

    def broken_savefig(f, **kw):
        f.write(b"\x89PNG half")
        raise RuntimeError("renderer died")

    broken, _ = plt.subplots()
    broken.savefig = broken_savefig
    with pytest.raises(RuntimeError, match="renderer died"):
        plots.save_figure(broken, target)
    assert target.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["groups_sex.png"]
