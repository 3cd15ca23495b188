"""metrics.py, bootstrap.py, predictions.py: against scikit-learn, brute force and hand-computed values."""
import numpy as np
import pytest
from sklearn.metrics import recall_score, roc_auc_score, top_k_accuracy_score

from dpft.errors import UsageError
from dpft.evaluate import bootstrap as bs
from dpft import metrics as M
from dpft.workdir.predictions import load_predictions, write_predictions
from dpft.testing.predictions import synthetic_predictions


def _binary(rng, n, ties=False):
    y = rng.random(n) < 0.3
    s = rng.normal(size=n) + y
    return y, (np.round(s, 1) if ties else s)


# ----------------------------------------------------------------------------- AUC / accuracy

def test_auc_hand_computed():
    # pairs (pos, neg): (0.35 > 0.1), (0.35 < 0.4), (0.8 > both) -> 3 of 4
    y, s = np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])
    assert M.auc(y, s)[0] == pytest.approx(0.75)
    assert M.weighted_auc(y, s, np.ones((1, 4)))[0] == pytest.approx(0.75)
    # a tie between a positive and a negative counts one half
    assert M.weighted_auc(np.array([0, 1]), np.array([0.5, 0.5]), np.ones((1, 2)))[0] == pytest.approx(0.5)
    # weight 2 on the misordered negative: pairs 1 + 0*2 + 1 + 1*2 over 2 * 3
    assert M.weighted_auc(y, s, np.array([[1.0, 2.0, 1.0, 1.0]]))[0] == pytest.approx(4 / 6)


@pytest.mark.parametrize("ties", [False, True])
def test_weighted_auc_matches_sklearn(ties):
    rng = np.random.default_rng(0)
    y, s = _binary(rng, 500, ties)
    w = rng.integers(0, 4, size=(5, 500)).astype(float)
    got = M.weighted_auc(y, s, w)
    want = [roc_auc_score(y, s, sample_weight=row) for row in w]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert M.auc(y, s)[0] == pytest.approx(roc_auc_score(y, s))


def test_auc_undefined_is_nan():
    assert np.isnan(M.auc(np.ones(5), np.arange(5.0))[0])
    assert np.isnan(M.weighted_auc(np.zeros(5), np.arange(5.0), np.ones((2, 5)))).all()
    valid = np.array([1, 1, 0, 0], bool)  # only negatives remain after masking
    assert np.isnan(M.auc(np.array([0, 0, 1, 1]), np.arange(4.0), valid=valid)[0])


@pytest.mark.parametrize("k", [1, 5])
def test_topk_matches_sklearn(k):
    rng = np.random.default_rng(1)
    logits, label = rng.normal(size=(300, 10)), rng.integers(0, 10, 300)
    got = M.topk_correct(logits, label, k).mean()
    assert got == pytest.approx(top_k_accuracy_score(label, logits, k=k, labels=np.arange(10)))


def test_per_class_accuracy_matches_sklearn_recall_and_weights():
    rng = np.random.default_rng(2)
    logits, label = rng.normal(size=(200, 4)), rng.integers(0, 3, 200)  # class 3 never occurs
    correct = M.topk_correct(logits, label, 1)
    pc = M.per_class_accuracy(correct, label, 4)
    want = recall_score(label, logits.argmax(1), labels=[0, 1, 2], average=None)
    np.testing.assert_allclose(pc[0, :3], want)
    assert np.isnan(pc[0, 3])
    w = rng.integers(0, 3, size=(3, 200)).astype(float)
    pcw = M.per_class_accuracy(correct, label, 4, w)
    for r in range(3):
        want = [np.sum(w[r] * correct * (label == c)) / np.sum(w[r] * (label == c)) for c in range(3)]
        np.testing.assert_allclose(pcw[r, :3], want)


def _inputs(kw, thresholds=None, max_ovr=20):
    logits = np.asarray(kw["logits"], np.float64)
    probs = 1 / (1 + np.exp(-logits)) if kw["task"] == "multilabel" else np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return M.make_inputs(kw["task"], kw["class_names"], logits, probs, np.asarray(kw["label"]),
                         kw.get("label_mask"), kw.get("eval_tasks", ()), thresholds or {}, max_ovr)


def test_multilabel_suite_respects_label_mask():
    kw = synthetic_predictions(300, task="multilabel", seed=3)
    inp = _inputs(kw)
    out = M.metric_suite(inp)
    j = inp.class_names.index("Edema")
    keep = kw["label_mask"][:, j] > 0
    assert keep.sum() < 300  # some labels are masked
    assert out["auc/Edema"][0] == pytest.approx(roc_auc_score(kw["label"][keep, j], inp.probs[keep, j]))
    dec = inp.probs[keep, j] >= 0.5
    assert out["accuracy/Edema"][0] == pytest.approx(np.mean(dec == (kw["label"][keep, j] > 0)))
    aucs = [roc_auc_score(kw["label"][kw["label_mask"][:, inp.class_names.index(t)] > 0, inp.class_names.index(t)],
                          inp.probs[kw["label_mask"][:, inp.class_names.index(t)] > 0, inp.class_names.index(t)])
            for t in inp.tasks]
    assert out["auc_mean"][0] == pytest.approx(np.mean(aucs))
    # flipping masked-out labels changes nothing
    flipped = dict(kw, label=np.where(kw["label_mask"] > 0, kw["label"], 1 - kw["label"]))
    out2 = M.metric_suite(_inputs(flipped))
    for key in out:
        np.testing.assert_allclose(out2[key], out[key])


def _ece_loop(y, p, bins=10):
    """Expected calibration error by an explicit loop over equal-width bins (sum n_b / N |acc_b - conf_b|)."""
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        sel = (p >= lo) & ((p < hi) if b < bins - 1 else (p <= hi))
        if sel.any():
            total += sel.sum() / len(p) * abs(y[sel].mean() - p[sel].mean())
    return total


@pytest.mark.parametrize("task", ["multilabel", "multiclass"])
def test_fnr_ppv_balanced_accuracy_brier_ece_match_sklearn_and_fairlearn(task):
    """Per task, overall and by group: FNR = 1 - recall, PPV = precision, balanced accuracy, Brier score
    (scikit-learn, fairlearn's MetricFrame by group) and ECE (a loop over bins); with bootstrap weights,
    a replicate equals the metric on its drawn rows."""
    import functools

    from fairlearn.metrics import MetricFrame
    from sklearn.metrics import balanced_accuracy_score, brier_score_loss
    from sklearn.metrics import precision_score as _precision

    precision_score = functools.partial(_precision, zero_division=np.nan)  # undefined is NaN, as in dpft

    kw = synthetic_predictions(400, task=task, seed=5)
    inp = _inputs(kw)
    out = M.metric_suite(inp)
    group = np.random.default_rng(1).choice(["a", "b", "c"], size=400)
    for t, j in zip(inp.tasks, inp.task_index):
        keep = inp.valid[:, j]
        y, d, p = inp.binary_label[keep, j], inp.decision[keep, j], inp.probs[keep, j]
        assert out[f"fnr/{t}"][0] == pytest.approx(1 - recall_score(y, d), rel=1e-12)
        assert out[f"ppv/{t}"][0] == pytest.approx(precision_score(y, d), rel=1e-12, nan_ok=True)
        assert out[f"balanced_accuracy/{t}"][0] == pytest.approx(balanced_accuracy_score(y, d), rel=1e-12)
        assert out[f"brier/{t}"][0] == pytest.approx(brier_score_loss(y, p), rel=1e-12)
        assert out[f"ece/{t}"][0] == pytest.approx(_ece_loop(y, p), rel=1e-12)
        frame = MetricFrame(metrics={"ppv": precision_score, "bacc": balanced_accuracy_score}, y_true=y, y_pred=d,
                            sensitive_features=group[keep])
        brier = MetricFrame(metrics=brier_score_loss, y_true=y, y_pred=p, sensitive_features=group[keep])
        for g in ("a", "b", "c"):
            sub = M.metric_suite(inp.subset(np.flatnonzero(group == g)))
            assert sub[f"ppv/{t}"][0] == pytest.approx(frame.by_group.loc[g, "ppv"], rel=1e-12, nan_ok=True)
            assert sub[f"balanced_accuracy/{t}"][0] == pytest.approx(frame.by_group.loc[g, "bacc"], rel=1e-12)
            assert sub[f"brier/{t}"][0] == pytest.approx(brier.by_group.loc[g], rel=1e-12)
    rng = np.random.default_rng(2)
    draws = rng.integers(0, 400, size=(3, 400))
    weights = np.stack([np.bincount(r, minlength=400) for r in draws]).astype(np.float64)
    boot = M.metric_suite(inp, weights)
    for r, rows in enumerate(draws):
        once = M.metric_suite(inp.subset(rows))
        for t in inp.tasks:
            for m in ("ece", "brier", "ppv", "fnr", "balanced_accuracy"):
                assert boot[f"{m}/{t}"][r] == pytest.approx(once[f"{m}/{t}"][0], rel=1e-9, nan_ok=True)
    assert not M.higher_is_better("ece/Edema") and not M.higher_is_better("fnr/x") and M.higher_is_better("ppv/x")


def test_underdiagnosis_hand_computed():
    # classes: No Finding, Edema. Rows with No Finding label 0 (a finding): 0, 1, 2; predicted NF (p >= .5): 0, 2
    label = np.array([[0, 1], [0, 1], [0, 1], [1, 0], [0, 1]], np.float32)
    mask = np.array([[1, 1], [1, 1], [1, 1], [1, 1], [0, 1]], np.float32)  # row 4: NF label ignored
    logits = np.array([[2, 0], [-2, 0], [1, 0], [3, 0], [5, 0]], np.float32)
    kw = dict(task="multilabel", class_names=("No Finding", "Edema"), logits=logits, label=label,
              label_mask=mask, eval_tasks=("Edema",))
    out = M.metric_suite(_inputs(kw))
    assert out["underdiagnosis"][0] == pytest.approx(2 / 3)


def test_multiclass_macro_auc_matches_sklearn_ovr():
    kw = synthetic_predictions(400, task="multiclass", seed=4, num_classes=4)
    inp = _inputs(kw)
    out = M.metric_suite(inp, overall=True)
    want = roc_auc_score(kw["label"], inp.probs, multi_class="ovr", average="macro")
    assert out["auc_macro"][0] == pytest.approx(want)
    assert out["top1"][0] == pytest.approx(np.mean(kw["logits"].argmax(1) == kw["label"]))
    assert "top5" not in out  # only 4 classes
    assert not _inputs(kw, max_ovr=3).tasks  # too many classes for one-vs-rest


def test_weighted_suite_equals_point_suite_with_unit_weights():
    for task in ("multilabel", "multiclass"):
        inp = _inputs(synthetic_predictions(200, task=task, seed=5, num_classes=7))
        point, ones = M.metric_suite(inp, overall=True), M.metric_suite(inp, np.ones((1, inp.n)), overall=True)
        assert point.keys() == ones.keys()
        for key in point:
            np.testing.assert_allclose(ones[key], point[key], rtol=1e-10, err_msg=key)


# ----------------------------------------------------------------------------- bootstrap

def _brute_force(patient_id, y, s, n_resamples, seed):
    """Explicitly resampled data sets from the same patient draws: AUC and accuracy per replicate."""
    counts, codes = bs.resample_counts(patient_id, n_resamples, seed)
    rows_of = [np.flatnonzero(codes == p) for p in range(counts.shape[1])]
    aucs, accs = [], []
    for r in range(n_resamples):
        idx = np.concatenate([np.tile(rows_of[p], k) for p, k in enumerate(counts[r]) if k] or [np.zeros(0, int)])
        aucs.append(roc_auc_score(y[idx], s[idx]) if 0 < y[idx].sum() < idx.size else np.nan)
        accs.append(np.mean((s[idx] > 0.5) == y[idx]))
    return np.array(aucs), np.array(accs)


def test_bootstrap_equals_brute_force_loop():
    rng = np.random.default_rng(6)
    n = 120
    patient_id = np.array([f"p{i}" for i in rng.integers(0, 50, n)])
    y, s = _binary(rng, n, ties=True)
    fn = lambda w: {"auc": M.weighted_auc(y, s, w), "acc": M.weighted_mean((s > 0.5) == y, w)}  # noqa: E731
    reps = bs.bootstrap(fn, patient_id, n_resamples=40, seed=11, max_weights=1000)  # several chunks
    auc_bf, acc_bf = _brute_force(patient_id, y, s, 40, 11)
    np.testing.assert_allclose(reps["auc"], auc_bf, rtol=1e-12)
    np.testing.assert_allclose(reps["acc"], acc_bf, rtol=1e-12)
    again = bs.bootstrap(fn, patient_id, n_resamples=40, seed=11)
    np.testing.assert_array_equal(again["auc"], reps["auc"])  # same seed -> same result (chunking aside)
    other = bs.bootstrap(fn, patient_id, n_resamples=40, seed=12)
    assert not np.array_equal(other["auc"], reps["auc"])


def test_bootstrap_ci_covers_estimate_and_shrinks_with_n():
    rng = np.random.default_rng(7)
    widths = {}
    for n in (400, 6400):
        y, s = _binary(rng, n)
        pid = np.arange(n).astype(str)
        reps = bs.bootstrap(lambda w: {"auc": M.weighted_auc(y, s, w)}, pid, n_resamples=200, seed=0)
        lo, hi, n_valid = bs.confidence_interval(reps["auc"], 0.95)
        assert n_valid == 200 and lo <= M.auc(y, s)[0] <= hi
        widths[n] = hi - lo
    # standard error ~ 1/sqrt(n): 16x the data -> about a quarter of the width
    assert 0.15 < widths[6400] / widths[400] < 0.4


def test_patient_bootstrap_with_identical_images_equals_per_patient_bootstrap():
    rng = np.random.default_rng(8)
    n_pat, m = 150, 4
    y_p, s_p = _binary(rng, n_pat)
    pid_p = np.array([f"p{i:03d}" for i in range(n_pat)])
    y, s, pid = np.repeat(y_p, m), np.repeat(s_p, m), np.repeat(pid_p, m)  # m identical images per patient
    fn_img = lambda w: {"auc": M.weighted_auc(y, s, w)}  # noqa: E731
    fn_pat = lambda w: {"auc": M.weighted_auc(y_p, s_p, w)}  # noqa: E731
    img = bs.bootstrap(fn_img, pid, n_resamples=300, seed=3)["auc"]
    pat = bs.bootstrap(fn_pat, pid_p, n_resamples=300, seed=3)["auc"]
    np.testing.assert_allclose(img, pat, rtol=1e-12)
    width = lambda x: np.subtract(*bs.confidence_interval(x)[1::-1])  # noqa: E731
    # resampling images instead of patients would pretend to have m times the data: narrower by ~sqrt(m)
    naive = bs.bootstrap(fn_img, np.arange(y.size).astype(str), n_resamples=300, seed=3)["auc"]
    assert width(naive) < 0.7 * width(img)


def test_bootstrap_speed_and_ci_validation():
    rng = np.random.default_rng(9)
    y, s = _binary(rng, 10_000)
    pid = (np.arange(10_000) // 2).astype(str)
    import time
    t = time.perf_counter()
    bs.bootstrap(lambda w: {"auc": M.weighted_auc(y, s, w), "acc": M.weighted_mean(y, w)}, pid, n_resamples=200)
    assert time.perf_counter() - t < 20  # about 0.3 s here; generous for a shared machine
    with pytest.raises(ValueError, match="level"):
        bs.confidence_interval(np.ones(3), 1.5)
    assert np.isnan(bs.confidence_interval(np.full(3, np.nan))[0])
    with pytest.raises(ValueError, match="n_resamples"):
        bs.resample_counts(pid, 0, 0)


# ----------------------------------------------------------------------------- predictions files

@pytest.mark.parametrize("task", ["multilabel", "multiclass"])
def test_predictions_roundtrip(tmp_path, task):
    kw = synthetic_predictions(50, task=task, seed=1)
    npz, js = write_predictions(tmp_path / "test", step=7, epsilon=2.0, delta=1e-5, **kw)
    p = load_predictions(npz)
    assert p.step == 7 and p.task == task and p.epsilon == 2.0 and p.n == 50 and p.path == npz
    np.testing.assert_array_equal(p.label, kw["label"])
    np.testing.assert_allclose(p.logits, np.asarray(kw["logits"], np.float32))
    assert set(p.attrs) == set(kw["attrs"])
    assert (p.label_mask is None) == (task == "multiclass")
    probs = p.probabilities()
    assert probs.shape == p.logits.shape and np.all((probs > 0) & (probs < 1))
    if task == "multiclass":
        np.testing.assert_allclose(probs.sum(1), 1.0)


def test_predictions_errors_name_file_and_field(tmp_path):
    kw = synthetic_predictions(20, task="multilabel", seed=1)
    with pytest.raises(UsageError, match=r"test\.npz.*'logits'.*shape"):
        write_predictions(tmp_path / "test", step=1, **dict(kw, logits=kw["logits"][:, :3]))
    with pytest.raises(UsageError, match=r"test\.npz.*'label_mask'"):
        write_predictions(tmp_path / "test", step=1, **{k: v for k, v in kw.items() if k != "label_mask"})
    with pytest.raises(UsageError, match=r"test\.json.*'eval_tasks'"):
        write_predictions(tmp_path / "test", step=1, **dict(kw, eval_tasks=("Nope",)))
    npz, js = write_predictions(tmp_path / "test", step=1, **kw)
    with np.load(npz) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez(npz, **dict(arrays, attr_sex=arrays["attr_sex"][:5]))
    with pytest.raises(UsageError, match=r"test\.npz.*'attr_sex'.*shape"):
        load_predictions(npz)
    (tmp_path / "test.json").write_text('{"task": "multilabel"}')
    with pytest.raises(UsageError, match=r"test\.json.*'class_names'.*missing"):
        load_predictions(npz)
    with pytest.raises(UsageError, match="not found"):
        load_predictions(tmp_path / "nothere.npz")
