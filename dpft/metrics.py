"""Classification metrics on predictions, with optional bootstrap weights (pure numpy).

Below both training and evaluation: the training loop's quick evaluation
(`dpft.inference.predictor.Predictor.quick_eval`) and `dpft evaluate`'s reports read the same suite.

Weights convention, used by every function here: `weights` is None (the plain estimate, one
value, computed by scikit-learn where it defines the metric) or float [R, N], one row per
bootstrap replicate, where row r holds how often each example was drawn (see bootstrap.py).
Each function returns float64 [R] (R = 1 when weights is None); undefined values are NaN
(e.g. AUC on a subset with a single class).

Metric names produced by `metric_suite` (T = a binary task: a multilabel eval task, or a class
one-vs-rest for multiclass with at most `max_ovr_classes` classes):
  multiclass: top1, top5 (C > 5), class_accuracy/<class> (overall only), auc/T, auc_macro,
              tpr/T, fpr/T, selection_rate/T (decision: argmax == T, no threshold)
  multilabel: auc/T, auc_mean, accuracy/T, accuracy_mean, tpr/T, fpr/T, selection_rate/T
              (decision: sigmoid(logit) >= threshold[T]; labels with label_mask == 0 excluded),
  both, per task: fnr/T (1 - TPR), ppv/T (precision: positives among predicted positives),
              balanced_accuracy/T ((TPR + TNR) / 2), brier/T (mean squared error of the task's
              probability), ece/T (expected calibration error over ECE_BINS equal-width bins:
              sum over bins of |positives - summed probability| / N),
              underdiagnosis (if "No Finding" is a class: predicted No Finding among examples
              whose No Finding label is 0, i.e. the FPR of No Finding; Seyyed-Kalantari et al. 2021)
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Mapping, Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

NO_FINDING = "No Finding"
LOWER_IS_BETTER = ("fpr", "fnr", "brier", "ece", "underdiagnosis")  # metric-name prefixes where smaller is better
ECE_BINS = 10


def higher_is_better(metric: str) -> bool:
    """True unless the metric name (before '/') is a rate where smaller is better."""
    return metric.split("/")[0] not in LOWER_IS_BETTER


def _rows(weights: np.ndarray | None, n: int) -> np.ndarray:
    return np.ones((1, n)) if weights is None else np.asarray(weights, np.float64)


def _nanmean_rows(cols: Sequence[np.ndarray]) -> np.ndarray:
    """Mean over metrics ignoring NaN: list of [R] -> [R] (NaN only if all are NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.stack(cols), axis=0)


def weighted_mean(x: np.ndarray, weights: np.ndarray | None, valid: np.ndarray | None = None) -> np.ndarray:
    """sum(w * x * valid) / sum(w * valid) per replicate: x [N] -> [R]; NaN where the denominator is 0."""
    x = np.asarray(x, np.float64)
    v = np.ones_like(x) if valid is None else np.asarray(valid, np.float64)
    w = _rows(weights, x.shape[0])
    num, den = w @ (x * v), w @ v
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def topk_correct(logits: np.ndarray, label: np.ndarray, k: int) -> np.ndarray:
    """bool [N]: fewer than k classes have a strictly larger logit than the true class [N, C], [N]."""
    logits = np.asarray(logits)
    true = np.take_along_axis(logits, np.asarray(label)[:, None], axis=1)
    return (logits > true).sum(axis=1) < k


def weighted_auc(y: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC per replicate: y bool [N], score [N], weights [R, N] -> [R].

    Weighted Mann-Whitney statistic P(score_pos > score_neg) + 0.5 P(tie), which equals
    sklearn's roc_auc_score(y, score, sample_weight=w). Sorting and searching are shared by all
    replicates; per replicate it is one cumulative sum over the negatives and two gathers.
    """
    y = np.asarray(y, bool)
    score = np.asarray(score, np.float64)
    w = np.asarray(weights, np.float64)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    if pos.size == 0 or neg.size == 0:
        return np.full(w.shape[0], np.nan)
    neg = neg[np.argsort(score[neg], kind="mergesort")]
    neg_scores = score[neg]
    cum = np.zeros((w.shape[0], neg.size + 1))
    np.cumsum(w[:, neg], axis=1, out=cum[:, 1:])  # cum[:, k] = weight of the k lowest-scoring negatives
    below = np.searchsorted(neg_scores, score[pos], side="left")  # negatives strictly below each positive
    upto = np.searchsorted(neg_scores, score[pos], side="right")  # ... below or tied
    credit = cum[:, below] if np.array_equal(below, upto) else 0.5 * (cum[:, below] + cum[:, upto])
    wp = w[:, pos]
    num = (wp * credit).sum(axis=1)
    den = wp.sum(axis=1) * cum[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def auc(y: np.ndarray, score: np.ndarray, weights: np.ndarray | None = None,
        valid: np.ndarray | None = None) -> np.ndarray:
    """ROC AUC of binary y [N] vs score [N] over rows where valid: sklearn if weights is None, else weighted [R]."""
    y = np.asarray(y).astype(bool)
    score = np.asarray(score, np.float64)
    if valid is not None:
        keep = np.asarray(valid, bool)
        y, score = y[keep], score[keep]
        weights = None if weights is None else np.asarray(weights)[:, keep]
    if weights is not None:
        return weighted_auc(y, score, weights)
    if y.size == 0 or y.all() or not y.any():
        return np.array([np.nan])
    return np.array([roc_auc_score(y, score)])


def calibration_error(y: np.ndarray, p: np.ndarray, valid: np.ndarray, weights: np.ndarray | None = None,
                      bins: int = ECE_BINS) -> np.ndarray:
    """Expected calibration error of probabilities p [N] for labels y [N] over the `valid` rows: equal-width
    bins of p, sum over bins of |sum(y) - sum(p)| / N (= sum of n_b / N |accuracy_b - confidence_b|); [R]."""
    b = np.minimum((np.asarray(p, np.float64) * bins).astype(int), bins - 1)
    member = ((b[:, None] == np.arange(bins)[None, :]) & np.asarray(valid, bool)[:, None]).astype(np.float64)
    w = _rows(weights, len(b))
    gap = np.abs(w @ (member * np.asarray(y, np.float64)[:, None]) - w @ (member * np.asarray(p, np.float64)[:, None]))
    total = (w @ member).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, gap.sum(axis=1) / np.where(total > 0, total, 1.0), np.nan)


def per_class_accuracy(correct: np.ndarray, label: np.ndarray, num_classes: int,
                       weights: np.ndarray | None = None) -> np.ndarray:
    """Accuracy within each true class: correct bool [N], label int [N] -> [R, C] (NaN: class absent).

    Sorts by label and sums per class, so memory is O(R N), not O(N C).
    """
    label = np.asarray(label)
    w = _rows(weights, label.shape[0])
    out = np.full((w.shape[0], num_classes), np.nan)
    if label.size == 0:
        return out
    order = np.argsort(label, kind="mergesort")
    present, starts = np.unique(label[order], return_index=True)
    ws = w[:, order]
    num = np.add.reduceat(ws * np.asarray(correct, np.float64)[order], starts, axis=1)
    den = np.add.reduceat(ws, starts, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out[:, present] = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return out


@dataclasses.dataclass(frozen=True)
class EvalInputs:
    """Everything the metrics need, for N examples. Built by `make_inputs`.

    probs float64 [N, C]; label int [N] or float [N, L]; valid bool [N, C] (which labels count);
    decision bool [N, C] (the binary decision per class/task); tasks: names of the binary tasks T
    and task_index their columns; thresholds: per task (multilabel) or empty (multiclass: argmax).
    """

    task: str
    class_names: tuple[str, ...]
    logits: np.ndarray
    probs: np.ndarray
    label: np.ndarray
    valid: np.ndarray
    decision: np.ndarray
    tasks: tuple[str, ...]
    task_index: tuple[int, ...]
    thresholds: Mapping[str, float]

    @property
    def n(self) -> int:
        return int(self.probs.shape[0])

    @property
    def binary_label(self) -> np.ndarray:
        """bool [N, C]: multilabel labels, or one-hot of the multiclass label."""
        if self.task == "multilabel":
            return np.asarray(self.label) > 0.5
        return np.eye(len(self.class_names), dtype=bool)[self.label]

    @property
    def no_finding(self) -> int | None:
        if self.task == "multilabel" and NO_FINDING in self.class_names:
            return self.class_names.index(NO_FINDING)
        return None

    def subset(self, idx: np.ndarray) -> "EvalInputs":
        """The same inputs restricted to rows idx (int or bool [N])."""
        return dataclasses.replace(self, logits=self.logits[idx], probs=self.probs[idx], label=self.label[idx],
                                   valid=self.valid[idx], decision=self.decision[idx])


def make_inputs(task: str, class_names: Sequence[str], logits: np.ndarray, probs: np.ndarray, label: np.ndarray,
                label_mask: np.ndarray | None, eval_tasks: Sequence[str], thresholds: Mapping[str, float],
                max_ovr_classes: int = 20) -> EvalInputs:
    """Binary decisions and task list: multilabel thresholds per class name (missing -> 0.5),
    multiclass argmax one-vs-rest for C <= max_ovr_classes (else no per-class binary tasks)."""
    class_names = tuple(class_names)
    c = len(class_names)
    if task == "multilabel":
        tasks = tuple(eval_tasks) or class_names
        thr = np.array([float(thresholds.get(name, 0.5)) for name in class_names])
        decision = probs >= thr[None, :]
        valid = np.asarray(label_mask) > 0
        used = {t: float(thresholds.get(t, 0.5)) for t in tasks}
        nf = NO_FINDING
        if nf in class_names:
            used[nf] = float(thresholds.get(nf, 0.5))
    else:
        tasks = class_names if c <= max_ovr_classes else ()
        decision = np.eye(c, dtype=bool)[np.argmax(logits, axis=1)]
        valid = np.ones((len(label), c), bool)
        used = {}
    return EvalInputs(task=task, class_names=class_names, logits=np.asarray(logits), probs=np.asarray(probs),
                      label=np.asarray(label), valid=valid, decision=decision, tasks=tasks,
                      task_index=tuple(class_names.index(t) for t in tasks), thresholds=used)


def metric_suite(inp: EvalInputs, weights: np.ndarray | None = None, *, overall: bool = False) -> dict[str, np.ndarray]:
    """All metrics named in the module doc for these rows: name -> [R]. `overall` adds per-class accuracy.

    The ratio metrics are gathered into one [N, M] matrix so the weights are read once.
    """
    out: dict[str, np.ndarray] = {}
    ratios: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # name -> (x [N], valid [N])
    y = inp.binary_label
    ones = np.ones(inp.n, bool)
    if inp.task == "multiclass":
        correct = topk_correct(inp.logits, inp.label, 1)
        ratios["top1"] = (correct, ones)
        if len(inp.class_names) > 5:
            ratios["top5"] = (topk_correct(inp.logits, inp.label, 5), ones)
        if overall:
            pc = per_class_accuracy(correct, inp.label, len(inp.class_names), weights)
            out.update({f"class_accuracy/{name}": pc[:, j] for j, name in enumerate(inp.class_names)})
    for t, j in zip(inp.tasks, inp.task_index):
        out[f"auc/{t}"] = auc(y[:, j], inp.probs[:, j], weights, valid=inp.valid[:, j])
        d, v = inp.decision[:, j], inp.valid[:, j]
        if inp.task == "multilabel":
            ratios[f"accuracy/{t}"] = (d == y[:, j], v)
        ratios[f"tpr/{t}"] = (d, v & y[:, j])
        ratios[f"fpr/{t}"] = (d, v & ~y[:, j])
        ratios[f"selection_rate/{t}"] = (d, v)
        ratios[f"fnr/{t}"] = (~d, v & y[:, j])
        ratios[f"ppv/{t}"] = (y[:, j], v & d)
        ratios[f"brier/{t}"] = ((inp.probs[:, j] - y[:, j]) ** 2, v)
        out[f"ece/{t}"] = calibration_error(y[:, j], inp.probs[:, j], v, weights)
    nf = inp.no_finding
    if nf is not None:
        ratios["underdiagnosis"] = (inp.decision[:, nf], inp.valid[:, nf] & ~y[:, nf])
    if ratios:
        x = np.stack([r[0] for r in ratios.values()], axis=1).astype(np.float64)  # [N, M]
        v = np.stack([r[1] for r in ratios.values()], axis=1).astype(np.float64)
        w = _rows(weights, inp.n)
        num, den = w @ (x * v), w @ v  # [R, M]
        with np.errstate(invalid="ignore", divide="ignore"):
            val = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
        out.update({name: val[:, m] for m, name in enumerate(ratios)})
        for t in inp.tasks:
            out[f"balanced_accuracy/{t}"] = (out[f"tpr/{t}"] + 1.0 - out[f"fpr/{t}"]) / 2.0
    if inp.tasks:
        key = "auc_mean" if inp.task == "multilabel" else "auc_macro"
        out[key] = _nanmean_rows([out[f"auc/{t}"] for t in inp.tasks])
    if inp.task == "multilabel" and inp.tasks:
        out["accuracy_mean"] = _nanmean_rows([out[f"accuracy/{t}"] for t in inp.tasks])
    return out


def headline_metrics(inp: EvalInputs) -> list[str]:
    """The metrics shown in report tables and plots, most important first."""
    if inp.task == "multilabel":
        names = ["auc_mean"] + [f"auc/{t}" for t in inp.tasks] + ["accuracy_mean"]
        return names + (["underdiagnosis"] if inp.no_finding is not None else [])
    names = ["top1"] + (["top5"] if len(inp.class_names) > 5 else [])
    return names + (["auc_macro"] if inp.tasks else [])
