"""ich.metrics against scikit-learn's reference implementations."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, precision_recall_fscore_support
from sklearn.metrics import log_loss as sk_log_loss

from ich.metrics import classification_metrics, confusion_matrix, log_loss


def _sklearn(y_true, y_pred):
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
    return {"accuracy": accuracy_score(y_true, y_pred), "macro_precision": p, "macro_recall": r, "macro_f1": f}


@pytest.mark.parametrize("seed", range(6))
def test_classification_metrics_match_sklearn_on_random_predictions(seed):
    rng = np.random.default_rng(seed)
    c = 17
    n = int(rng.integers(20, 300))
    y_true = rng.integers(0, c, n)
    # Mostly-right predictions with noise; restrict predictions to a subset of classes so some classes are
    # never predicted (precision undefined -> 0) and some predicted classes may be absent from y_true.
    y_pred = np.where(rng.random(n) < 0.6, y_true, rng.integers(0, c, n))
    allowed = rng.choice(c, size=c - 4, replace=False)
    y_pred = np.where(np.isin(y_pred, allowed), y_pred, allowed[0])
    assert len(set(range(c)) - set(y_pred.tolist())) >= 4  # the case the test is about
    ours = classification_metrics(y_true, y_pred, c)
    ref = _sklearn(y_true, y_pred)
    for k, v in ref.items():
        assert ours[k] == pytest.approx(v, abs=1e-12), k


def test_class_absent_from_truth_and_predictions_is_not_averaged():
    # Class 3 exists in the label space (num_classes=5) but occurs nowhere: sklearn ignores it by default.
    y_true = np.array([0, 0, 1, 1, 2, 4, 4])
    y_pred = np.array([0, 1, 1, 1, 2, 2, 4])
    ours = classification_metrics(y_true, y_pred, 5)
    ref = _sklearn(y_true, y_pred)
    for k, v in ref.items():
        assert ours[k] == pytest.approx(v, abs=1e-12), k
    # A class predicted but never true: precision 0 for it, it still counts in the macro average.
    y_true2 = np.array([0, 0, 1, 1])
    y_pred2 = np.array([0, 2, 1, 1])
    ours2 = classification_metrics(y_true2, y_pred2, 3)
    ref2 = _sklearn(y_true2, y_pred2)
    for k, v in ref2.items():
        assert ours2[k] == pytest.approx(v, abs=1e-12), k
    assert ours2["macro_precision"] == pytest.approx((1 + 1 + 0) / 3)  # class 2: predicted once, never right


def test_perfect_and_empty_predictions():
    y = np.arange(10) % 4
    assert classification_metrics(y, y, 4) == {"accuracy": 1.0, "macro_precision": 1.0, "macro_recall": 1.0,
                                               "macro_f1": 1.0}
    empty = classification_metrics(np.array([], int), np.array([], int), 4)
    assert empty == {"accuracy": 0.0, "macro_precision": 0.0, "macro_recall": 0.0, "macro_f1": 0.0}


def test_confusion_matrix_rows_are_truth():
    cm = confusion_matrix([0, 0, 1, 2], [1, 0, 1, 1], 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]


@pytest.mark.parametrize("seed", range(4))
def test_log_loss_matches_sklearn_on_softmax(seed):
    rng = np.random.default_rng(100 + seed)
    n, c = 200, 17
    logits = rng.normal(0, 3, (n, c)).astype(np.float32)
    logits[0] += 500.0  # a large offset must not overflow (softmax is shift invariant)
    y = rng.integers(0, c, n)
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    ref = sk_log_loss(y, probs, labels=np.arange(c))
    assert log_loss(logits, y) == pytest.approx(ref, rel=1e-9, abs=1e-9)


def test_log_loss_of_confident_right_and_wrong_predictions():
    logits = np.array([[10.0, 0.0], [0.0, 10.0]])
    assert log_loss(logits, [0, 1]) == pytest.approx(np.log1p(np.exp(-10.0)))
    assert log_loss(logits, [1, 0]) == pytest.approx(10.0 + np.log1p(np.exp(-10.0)))
