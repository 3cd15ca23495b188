"""fairness.py: thresholds, gaps, fairlearn parity, per-group metrics vs independent computations."""
import numpy as np
import pytest
from fairlearn.metrics import demographic_parity_difference, equal_opportunity_difference
from sklearn.metrics import roc_auc_score

from dpft.evaluate import fairness as F
from dpft.evaluate import metrics as M
from dpft.evaluate.predictions import synthetic_predictions


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


# ----------------------------------------------------------------------------- parity

def test_fairlearn_parity_hand_computed():
    y = np.array([1, 1, 0, 0, 1, 0, 0, 0])
    p = np.array([1, 0, 1, 0, 1, 1, 1, 0])
    g = np.array(["a", "a", "a", "a", "b", "b", "b", "b"])
    # selection rates: a 2/4, b 3/4 -> 0.25; TPR: a 1/2, b 1/1 -> 0.5
    out = F.fairlearn_parity(y, p, g, by_group=True)
    assert out["demographic_parity_difference"] == pytest.approx(0.25)
    assert out["equal_opportunity_difference"] == pytest.approx(0.5)
    bg = out["by_group"]
    assert bg.loc["a", "fpr"] == pytest.approx(0.5) and bg.loc["b", "fpr"] == pytest.approx(2 / 3)
    # group c has no positives: left out of the equal opportunity difference (fairlearn alone would use TPR 0)
    y2, p2, g2 = np.r_[y, 0, 0], np.r_[p, 0, 1], np.concatenate([g, ["c", "c"]])
    out2 = F.fairlearn_parity(y2, p2, g2)
    assert out2["equal_opportunity_difference"] == pytest.approx(0.5)
    assert equal_opportunity_difference(y2, p2, sensitive_features=g2) == pytest.approx(1.0)


def test_fairlearn_parity_compressed_equals_plain_fairlearn():
    rng = np.random.default_rng(2)
    y, p = rng.integers(0, 2, 1000), rng.integers(0, 2, 1000)
    g = rng.choice(["x", "y", "z"], 1000)
    out = F.fairlearn_parity(y, p, g)
    assert out["demographic_parity_difference"] == pytest.approx(demographic_parity_difference(y, p, sensitive_features=g))
    assert out["equal_opportunity_difference"] == pytest.approx(equal_opportunity_difference(y, p, sensitive_features=g))


# ----------------------------------------------------------------------------- gaps

def test_summarise_groups_hand_computed():
    vals = {"a": np.array([0.8, 0.7]), "b": np.array([0.6, np.nan]), "c": np.array([0.9, 0.75])}
    s = F.summarise_groups(vals, "auc/Edema")
    np.testing.assert_allclose(s["gap"], [0.3, 0.05])
    np.testing.assert_allclose(s["worst"], [0.6, 0.7])
    np.testing.assert_allclose(s["gap_to_best/b"], [0.3, np.nan])
    np.testing.assert_allclose(s["gap_to_best/a"], [0.1, 0.05])
    low = F.summarise_groups(vals, "fpr/Edema")  # lower is better: worst = max
    np.testing.assert_allclose(low["worst"], [0.9, 0.75])
    np.testing.assert_allclose(low["gap_to_best/c"], [0.3, 0.05])


def test_group_metrics_match_sklearn_on_each_group():
    kw = synthetic_predictions(600, task="multilabel", seed=3)
    inp = _inputs(kw, {"Edema": 0.4})
    out = F.all_metrics(inp, kw["attrs"])
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
    rows = kw["label_mask"][:, j] > 0
    dpd = demographic_parity_difference(kw["label"][rows, j], inp.probs[rows, j] >= 0.4,
                                        sensitive_features=kw["attrs"]["sex"][rows])
    assert out[("parity", "sex", "demographic_parity_difference/Edema")][0] == pytest.approx(dpd)


@pytest.mark.parametrize("task", ["multilabel", "multiclass"])
def test_library_point_estimates_equal_weighted_engine(task):
    """sklearn/fairlearn (weights=None) and the vectorised weighted code (unit weights) agree on every key."""
    kw = synthetic_predictions(500, task=task, seed=4)
    inp = _inputs(kw, {"Edema": 0.3, "No Finding": 0.6})
    gap_groups = {a: sorted(set(v))[1:] for a, v in kw["attrs"].items()}  # drop one group from gaps
    point = F.all_metrics(inp, kw["attrs"], None, gap_groups)
    engine = F.all_metrics(inp, kw["attrs"], np.ones((1, inp.n)), gap_groups)
    assert point.keys() == engine.keys()
    assert any(k[0] == "parity" for k in point)
    for key in point:
        np.testing.assert_allclose(engine[key], point[key], rtol=1e-9, atol=1e-12, err_msg=str(key))


def test_small_groups_flagged():
    kw = synthetic_predictions(200, task="multilabel", seed=5)
    inp = _inputs(kw)
    sex = kw["attrs"]["sex"]
    small = np.flatnonzero(sex == "F")[:10]
    flags = F.group_flags(inp.subset(small), kw["patient_id"][small], 30)
    assert any("n=10 < 30" in f for f in flags)
    assert F.group_flags(inp.subset(np.flatnonzero(sex == "M")), kw["patient_id"], 30) == []
    # a group whose Edema labels are all negative is flagged for Edema
    j = inp.class_names.index("Edema")
    neg = np.flatnonzero((kw["label"][:, j] == 0) & (kw["label_mask"][:, j] > 0))[:40]
    assert any(f.startswith("Edema:") for f in F.group_flags(inp.subset(neg), kw["patient_id"][neg], 30))
