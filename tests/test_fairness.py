"""fairness.py: thresholds, groups, gaps, parity metrics vs fairlearn / scikit-learn / numpy brute force."""
import functools

import numpy as np
import pytest
from fairlearn.metrics import (demographic_parity_difference, demographic_parity_ratio, equal_opportunity_difference,
                               equal_opportunity_ratio, equalized_odds_difference, equalized_odds_ratio)
from sklearn.metrics import f1_score, roc_auc_score

from dpft.evaluate import fairness as F
from dpft import metrics as M
from dpft.testing.predictions import synthetic_predictions


def _inputs(kw, thresholds=None):
    logits = np.asarray(kw["logits"], np.float64)
    if kw["task"] == "multilabel":
        probs = 1 / (1 + np.exp(-logits))
    else:
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return M.make_inputs(kw["task"], kw["class_names"], logits, probs, np.asarray(kw["label"]),
                         kw.get("label_mask"), kw.get("eval_tasks", ()), thresholds or {})


# ----------------------------------------------------------------------------- thresholds

def test_youden_threshold_is_brute_force_optimum():
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.4
    s = rng.normal(size=300) + 1.2 * y
    thr = F.choose_threshold(y, s, "youden")
    j = lambda t: np.mean(s[y] >= t) - np.mean(s[~y] >= t)  # noqa: E731
    best = max(j(t) for t in np.unique(s))
    assert j(thr) == pytest.approx(best)


def test_target_fpr_threshold():
    rng = np.random.default_rng(1)
    y = rng.random(500) < 0.5
    s = rng.normal(size=500) + y
    thr = F.choose_threshold(y, s, "fpr", target_fpr=0.1)
    assert np.mean(s[~y] >= thr) <= 0.1
    lower = s[s < thr].max()  # the next lower threshold would exceed the target
    assert np.mean(s[~y] >= lower) > 0.1
    assert F.choose_threshold(np.ones(5, bool), np.arange(5.0)) == 0.5  # single class: default
    with pytest.raises(ValueError, match="method"):
        F.choose_threshold(y, s, "median")


def test_choose_thresholds_uses_only_unmasked_rows():
    label = np.array([[1], [0], [1], [0]], np.float32)
    probs = np.array([[0.9], [0.2], [0.1], [0.95]])
    mask = np.array([[1], [1], [0], [0]], np.float32)  # the two misordered rows are ignored
    thr = F.choose_thresholds(probs, label, mask, ["A"], ["A"])
    assert 0.2 < thr["A"] <= 0.9


def test_f1_and_fixed_thresholds_and_fallback_reason():
    rng = np.random.default_rng(7)
    y = rng.random(400) < 0.3
    s = rng.normal(size=400) + 1.5 * y
    thr = F.choose_threshold(y, s, "f1")
    best = max(f1_score(y, s >= t) for t in np.unique(s))  # brute force over every candidate threshold
    assert f1_score(y, s >= thr) == pytest.approx(best)
    assert F.select_threshold(y, s, "fixed", fixed=0.3) == F.Threshold(0.3, "fixed", None)
    one = F.select_threshold(np.zeros(6, bool), np.arange(6.0), "youden", fixed=0.4)
    assert one.value == 0.4 and "0 positive / 6 negative" in one.fallback
    assert F.select_threshold(y, s, "youden").fallback is None


# ----------------------------------------------------------------------------- parity

FAIRLEARN = {"demographic_parity_difference": demographic_parity_difference,
             "demographic_parity_ratio": demographic_parity_ratio,
             "equal_opportunity_difference": equal_opportunity_difference,
             "equal_opportunity_ratio": equal_opportunity_ratio,
             "equalized_odds_difference": equalized_odds_difference, "equalized_odds_ratio": equalized_odds_ratio}


#: fairlearn's to_overall method and the mean aggregation of equalized odds, each as its own function.
FAIRLEARN_ALL = {**FAIRLEARN, **{f"{name}_to_overall": functools.partial(fn, method="to_overall")
                                 for name, fn in FAIRLEARN.items()},
                 "equalized_odds_difference_mean_agg": functools.partial(equalized_odds_difference, agg="mean"),
                 "equalized_odds_ratio_mean_agg": functools.partial(equalized_odds_ratio, agg="mean")}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_parity_equals_fairlearn_for_every_metric(seed):
    rng = np.random.default_rng(seed)
    n = 600
    g = rng.choice(["x", "y", "z", "w"][: 2 + seed], n)
    y = rng.random(n) < np.where(g == "x", 0.3, 0.5)
    p = rng.random(n) < np.where(y, 0.7, 0.2) + 0.1 * (g == "y")
    w = rng.integers(1, 4, n).astype(float)
    ours = F.parity(y, p, g)
    ours_w = F.parity(y, p, g, sample_weight=w)
    assert set(ours) == set(F.ALL_PARITY_METRICS) == set(FAIRLEARN_ALL)
    for name, fn in FAIRLEARN_ALL.items():
        assert ours[name] == pytest.approx(fn(y, p, sensitive_features=g), abs=1e-12), name
        assert ours_w[name] == pytest.approx(fn(y, p, sensitive_features=g, sample_weight=w), abs=1e-12), name


def test_parity_hand_computed_and_group_without_positives_left_out():
    y = np.array([1, 1, 0, 0, 1, 0, 0, 0])
    p = np.array([1, 0, 1, 0, 1, 1, 1, 0])
    g = np.array(["a", "a", "a", "a", "b", "b", "b", "b"])
    out = F.parity(y, p, g)
    # selection rates: a 2/4, b 3/4; TPR a 1/2, b 1/1; FPR a 1/2, b 2/3
    assert out["demographic_parity_difference"] == pytest.approx(0.25)
    assert out["demographic_parity_ratio"] == pytest.approx(2 / 3)
    assert out["equal_opportunity_difference"] == pytest.approx(0.5)
    assert out["equalized_odds_difference"] == pytest.approx(max(0.5, 2 / 3 - 1 / 2))
    assert out["equalized_odds_ratio"] == pytest.approx(min(0.5, 0.5 / (2 / 3)))
    # group c has no positives: left out of the TPR comparisons (fairlearn alone would use TPR 0) ...
    y2, p2, g2 = np.r_[y, 0, 0], np.r_[p, 0, 1], np.concatenate([g, ["c", "c"]])
    out2 = F.parity(y2, p2, g2)
    assert equal_opportunity_difference(y2, p2, sensitive_features=g2) == pytest.approx(1.0)
    keep = g2 != "c"  # ... so it equals fairlearn on the groups that have positives
    assert out2["equal_opportunity_difference"] == pytest.approx(
        equal_opportunity_difference(y2[keep], p2[keep], sensitive_features=g2[keep]))
    # but c still counts where it has the class: selection rate and FPR
    assert out2["demographic_parity_difference"] == pytest.approx(
        demographic_parity_difference(y2, p2, sensitive_features=g2))


@pytest.mark.parametrize("y, p, g", [([1], [0], ["a"]), ([1, 0], [1, 1], ["a", "b"]), ([], [], []),
                                     ([1, 1, 0], [1, 0, 1], ["a", "a", "a"])])
def test_parity_small_inputs_undefined_not_zero_and_no_crash(y, p, g):
    """The inputs that crashed fairlearn ("Feature array has too many dimensions") give NaN where
    fewer than two groups can be compared, never 0."""
    out = F.parity(np.array(y, int), np.array(p, int), np.array(g, str))
    assert np.isnan(out["equal_opportunity_difference"])  # at most one group has positives
    assert np.isnan(out["equalized_odds_difference"]) and np.isnan(out["equalized_odds_ratio"])
    if len(set(g)) < 2:
        assert all(np.isnan(v) for v in out.values())
    else:  # two groups with examples: selection rates compare (1 vs 1)
        assert out["demographic_parity_difference"] == 0.0 and out["demographic_parity_ratio"] == 1.0


def test_equalized_odds_ratio_is_not_hidden_by_a_zero_over_zero_fpr_ratio():
    """The review's case (digit 0): no false positives in any group (FPR ratio 0/0) while the minority's
    TPR is 0: the equalized-odds ratio is 0, the worst disparity, as fairlearn says; not undefined. The
    difference is the TPR gap. Only when neither component is defined is it undefined."""
    y = np.array([1] * 30 + [0] * 30 + [1] * 5 + [0] * 5)
    p = np.array([1] * 29 + [0] + [0] * 30 + [0] * 5 + [0] * 5)
    g = np.array(["majority"] * 60 + ["minority"] * 10)
    out = F.parity(y, p, g)
    assert np.isnan(F.rate_ratio(np.array([[0.0], [0.0]]))[0])  # the FPR ratio alone: 0/0
    assert out["equalized_odds_ratio"] == equalized_odds_ratio(y, p, sensitive_features=g) == 0.0
    assert out["equalized_odds_difference"] == pytest.approx(equalized_odds_difference(y, p, sensitive_features=g))
    assert out["equalized_odds_difference"] == pytest.approx(29 / 30)


def test_ratio_undefined_when_every_rate_is_zero():
    v = np.zeros((3, 1))
    assert np.isnan(F.rate_ratio(v)[0]) and F.rate_difference(v)[0] == 0.0
    v[0, 0] = np.nan
    assert F.rate_difference(v)[0] == 0.0 and np.isnan(F.rate_difference(v[:1])[0])


# ----------------------------------------------------------------------------- gaps

def test_summarise_groups_hand_computed():
    vals = {"a": np.array([0.8, 0.7, np.nan]), "b": np.array([0.6, np.nan, np.nan]), "c": np.array([0.9, 0.75, 0.5])}
    s = F.summarise_groups(vals, "auc/Edema")
    np.testing.assert_allclose(s["gap"], [0.3, 0.05, np.nan])  # one defined group: undefined, not 0
    np.testing.assert_allclose(s["worst"], [0.6, 0.7, np.nan])
    np.testing.assert_allclose(s["n_defined"], [3, 2, 1])
    np.testing.assert_allclose(s["gap_to_best/b"], [0.3, np.nan, np.nan])
    np.testing.assert_allclose(s["gap_to_best/a"], [0.1, 0.05, np.nan])
    low = F.summarise_groups(vals, "fpr/Edema")  # lower is better: worst = max
    np.testing.assert_allclose(low["worst"], [0.9, 0.75, np.nan])
    np.testing.assert_allclose(low["gap_to_best/c"], [0.3, 0.05, np.nan])


def _plan(inp, attrs, included=None):
    return F.plan_groups(inp, attrs, included)


def test_group_metrics_match_sklearn_on_each_group():
    kw = synthetic_predictions(600, task="multilabel", seed=3)
    inp = _inputs(kw, {"Edema": 0.4})
    out = F.all_metrics(inp, _plan(inp, kw["attrs"]))
    j = inp.class_names.index("Edema")
    per_group = {}
    for g in ("F", "M"):
        rows = (kw["attrs"]["sex"] == g) & (kw["label_mask"][:, j] > 0)
        per_group[g] = roc_auc_score(kw["label"][rows, j], inp.probs[rows, j])
        assert out[("group", "sex", g, "auc/Edema")][0] == pytest.approx(per_group[g])
        pos = rows & (kw["label"][:, j] > 0)
        assert out[("group", "sex", g, "tpr/Edema")][0] == pytest.approx(np.mean(inp.probs[pos, j] >= 0.4))
    assert out[("gap", "sex", "auc/Edema", "gap")][0] == pytest.approx(abs(per_group["F"] - per_group["M"]))
    assert out[("gap", "sex", "auc/Edema", "worst")][0] == pytest.approx(min(per_group.values()))


@pytest.mark.parametrize("task", ["multilabel", "multiclass"])
def test_every_parity_metric_per_task_equals_fairlearn(task):
    kw = synthetic_predictions(500, task=task, seed=4)
    inp = _inputs(kw, {"Edema": 0.3, "No Finding": 0.6})
    attr = "race" if task == "multilabel" else "group"
    values = np.asarray(kw["attrs"][attr])
    keep_groups = sorted(set(values))[1:] if task == "multilabel" else sorted(set(values))  # drop one group
    out = F.all_metrics(inp, _plan(inp, {attr: values}, {attr: keep_groups}))
    assert inp.tasks
    for t, j in zip(inp.tasks, inp.task_index):
        rows = np.isin(values, keep_groups) & inp.valid[:, j]
        y, p, g = inp.binary_label[rows, j], inp.decision[rows, j], values[rows]
        for name, fn in FAIRLEARN.items():
            assert out[("parity", attr, f"{name}/{t}")][0] == pytest.approx(fn(y, p, sensitive_features=g)), (t, name)
    mean = np.mean([out[("parity", attr, f"equalized_odds_difference/{t}")][0] for t in inp.tasks])
    assert out[("parity", attr, "equalized_odds_difference/mean")][0] == pytest.approx(mean)


@pytest.mark.parametrize("task", ["multilabel", "multiclass"])
def test_weighted_engine_equals_explicitly_resampled_data(task):
    """Bootstrap weights (counts) give the metrics of the data with each row repeated that often."""
    kw = synthetic_predictions(300, task=task, seed=6)
    inp = _inputs(kw, {"Edema": 0.3, "No Finding": 0.6})
    plan = _plan(inp, kw["attrs"])
    counts = np.random.default_rng(0).integers(0, 3, inp.n)
    weighted = F.all_metrics(inp, plan, counts[None, :].astype(float))
    rep = np.repeat(np.arange(inp.n), counts)
    plan_rep = F.GroupPlan({a: np.asarray(v)[rep] for a, v in plan.attrs.items()}, plan.included,
                           plan.common_tasks, plan.parity_tasks)
    explicit = F.all_metrics(inp.subset(rep), plan_rep, None)
    assert weighted.keys() == explicit.keys() and any(k[0] == "parity" for k in weighted)
    for key in weighted:
        np.testing.assert_allclose(weighted[key], explicit[key], rtol=1e-9, atol=1e-12, err_msg=str(key))


def test_group_mean_averages_tasks_defined_in_every_group():
    """A group lacking class 3 must not look better by averaging fewer AUCs."""
    kw = synthetic_predictions(400, task="multiclass", seed=8)
    label, g = kw["label"], np.asarray(kw["attrs"]["group"]).copy()
    g[(label == 3)] = "A"  # group B has no example of class 3
    inp = _inputs(kw)
    plan = _plan(inp, {"group": g})
    assert plan.common_tasks["group"]["auc_macro"] == tuple(t for t in inp.class_names if t != "class_3")
    out = F.all_metrics(inp, plan)
    for grp in ("A", "B"):
        rows = g == grp
        aucs = [roc_auc_score(label[rows] == j, inp.probs[rows, j]) for j in range(5) if j != 3]
        assert out[("group", "group", grp, "auc_macro")][0] == pytest.approx(np.mean(aucs))
    assert np.isnan(out[("group", "group", "B", "auc/class_3")][0])
    # the per-class AUC gap of class 3 is defined in one group only: undefined, with the reason
    assert np.isnan(out[("gap", "group", "auc/class_3", "gap")][0])
    key = ("gap", "group", "auc/class_3", "gap")
    assert F.undefined_reason(key, inp, plan, out) == "auc/class_3 defined in 1 of 2 compared groups of group (needs 2)"
    why = F.undefined_reason(("group", "group", "B", "auc/class_3"), inp, plan, out)
    assert why.startswith("class_3: 0 positive /") and "needs both classes" in why
    eo = F.undefined_reason(("parity", "group", "equal_opportunity_difference/class_3"), inp, plan, out)
    assert "1 of 2 compared groups have positives" in eo
    # the overall mean keeps every class
    overall = [roc_auc_score(label == j, inp.probs[:, j]) for j in range(5)]
    assert out[("overall", "auc_macro")][0] == pytest.approx(np.mean(overall))


# ----------------------------------------------------------------------------- groups

def test_intersectional_groups_equal_brute_force_subsets():
    kw = synthetic_predictions(800, task="multilabel", seed=9)
    attrs = F.add_intersections(kw["attrs"], ["sex*race"])
    assert "sex&race" in attrs
    inp = _inputs(kw, {"Edema": 0.4})
    out = F.all_metrics(inp, _plan(inp, attrs))
    j = inp.class_names.index("Edema")
    groups = set(attrs["sex&race"])
    assert groups == {f"{s} & {r}" for s in ("F", "M") for r in ("White", "Black", "Asian")}
    for s in ("F", "M"):
        for r in ("White", "Asian"):
            rows = (kw["attrs"]["sex"] == s) & (kw["attrs"]["race"] == r) & (kw["label_mask"][:, j] > 0)
            assert out[("group", "sex&race", f"{s} & {r}", "auc/Edema")][0] == pytest.approx(
                roc_auc_score(kw["label"][rows, j], inp.probs[rows, j]))
    with pytest.raises(ValueError, match="unknown attribute"):
        F.add_intersections(kw["attrs"], ["sex*site"])
    with pytest.raises(ValueError, match="two or more"):
        F.add_intersections(kw["attrs"], ["sex"])


def test_user_exclusions_reach_intersections():
    ex = F.parse_exclusions(["race=Unknown"], {"race": None, "sex": None})
    assert ex == {"race": {"Unknown"}}
    assert F.excluded_by_user("race", "Unknown", ex).endswith("(race=Unknown)")
    assert F.excluded_by_user("sex&race", "F & Unknown", ex).endswith("(race=Unknown)")
    assert F.excluded_by_user("sex&race", "F & White", ex) is None
    with pytest.raises(ValueError, match="ATTRIBUTE=GROUP"):
        F.parse_exclusions(["race"], {"race": None})
    with pytest.raises(ValueError, match="unknown attribute"):
        F.parse_exclusions(["site=x"], {"race": None})


def test_small_and_missing_class_are_separate_facts():
    kw = synthetic_predictions(400, task="multilabel", seed=5)
    inp = _inputs(kw)
    sex, pid = kw["attrs"]["sex"], kw["patient_id"]
    small = np.flatnonzero(sex == "F")[:10]  # 2 images per patient: at most 10 patients
    info = F.group_info(inp.subset(small), pid[small], 30)
    assert info["small"] and info["small_reason"] == f"{np.unique(pid[small]).size} patients < 30"
    big = np.flatnonzero(sex == "M")
    info = F.group_info(inp.subset(big), pid[big], 30)
    assert not info["small"] and info["missing_class"] == {}
    # many patients, but every Edema label negative: not small, missing a class for Edema only
    j = inp.class_names.index("Edema")
    neg = np.flatnonzero((kw["label"][:, j] == 0) & (kw["label_mask"][:, j] > 0))
    info = F.group_info(inp.subset(neg), pid[neg], 30)
    assert not info["small"] and list(info["missing_class"]) == ["Edema"]
    assert info["missing_class"]["Edema"].startswith("0 positive /")


def test_ratio_of_zero_rates_is_left_out_of_the_equalized_odds_ratio():
    """Perfect predictions: FPR 0 in every group, so the FPR ratio is 0/0 and the equalized odds ratio is
    the TPR ratio alone, 1.0, as fairlearn (until 2026-12-07 dpft left it undefined, which hid the
    worst tasks: tests above)."""
    kw = synthetic_predictions(200, task="multiclass", seed=15, num_classes=3)
    kw["logits"] = 10.0 * np.eye(3)[kw["label"]]
    inp = _inputs(kw)
    plan = _plan(inp, kw["attrs"])
    out = F.all_metrics(inp, plan)
    key = ("parity", "group", "equalized_odds_ratio/class_1")
    g = np.asarray(kw["attrs"]["group"])
    assert out[key][0] == 1.0 == equalized_odds_ratio(inp.binary_label[:, 1], inp.decision[:, 1], sensitive_features=g)
    assert out[("parity", "group", "equalized_odds_difference/class_1")][0] == 0.0  # defined: 0 is the true value
    assert out[("parity", "group", "equal_opportunity_ratio/class_1")][0] == 1.0
    g = np.asarray(kw["attrs"]["group"])
    y, p = inp.binary_label[:, 1], inp.decision[:, 1]
    assert equalized_odds_difference(y, p, sensitive_features=g) == 0.0
