"""Classification metrics from predictions: numbers in, numbers out (numpy only)."""
from __future__ import annotations

import numpy as np

METRIC_NAMES = ("accuracy", "macro_precision", "macro_recall", "macro_f1")


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def per_class_prf(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall, F1 from a confusion matrix (0 where undefined, like sklearn's zero_division=0)."""
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    actual = cm.sum(axis=1).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return precision, recall, f1


def classification_metrics(y_true, y_pred, num_classes: int) -> dict[str, float]:
    """Top-1 accuracy and macro precision/recall/F1.

    Macro averages run over the classes present in y_true or y_pred, as scikit-learn does by default."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    precision, recall, f1 = per_class_prf(cm)
    present = (cm.sum(axis=0) + cm.sum(axis=1)) > 0
    n = cm.sum()
    return {
        "accuracy": float(np.trace(cm) / n) if n else 0.0,
        "macro_precision": float(precision[present].mean()) if present.any() else 0.0,
        "macro_recall": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
    }


def log_loss(logits: np.ndarray, y_true) -> float:
    """Mean cross-entropy of raw logits against integer labels."""
    logits = np.asarray(logits, dtype=np.float64)
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(logp)), np.asarray(y_true)].mean())
