"""Classification metrics, each defined once (numpy only): its name, its direction and how it is computed.

A metric reads either confusion matrices (a batch (R, K, K) of counts -> (R,) values: predictions suffice, and
soups/stats.py scores R bootstrap resamples with the same function that scores one evaluation) or logits (log
loss). Training figures (ich/train.py), the soups' figures and selection, their options, the bootstrap, the
report and the plots read this registry: a new metric is one `register(Metric(...))`, here or in any module the
process imports before it needs the metric.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    of_confusion: Callable[[np.ndarray], np.ndarray] | None = None  # (R, K, K) counts (rows true) -> (R,)
    of_logits: Callable[[np.ndarray, np.ndarray], float] | None = None  # (logits (N, K), labels (N,)) -> value
    label: str = ""  # its column in the report's results table (default: the name)
    table: bool = True  # a column of the report's results table (a fraction, shown in %); needs of_confusion
    interval: bool = False  # test figures carry its 95% bootstrap interval and paired difference; needs of_confusion
    short: str = ""  # short name: the report's Δ column ("ΔF1") and, lowercased, paired-difference figures (f1_diff)

    def __post_init__(self) -> None:
        if (self.of_confusion is None) == (self.of_logits is None):
            raise ValueError(f"metric {self.name!r}: give exactly one of of_confusion and of_logits")
        if self.of_logits is not None and (self.table or self.interval):
            raise ValueError(f"metric {self.name!r}: the table and the bootstrap score predictions; "
                             "a metric of logits needs table=False, interval=False")
        if self.interval and not self.table:
            raise ValueError(f"metric {self.name!r}: an interval metric is a column of the table (table=True)")

    @property
    def column(self) -> str:
        return self.label or self.name

    @property
    def diff_name(self) -> str:
        return (self.short or self.name).lower()

    @property
    def delta_label(self) -> str:
        return f"Δ{self.short or self.name}"

    def value(self, scores: np.ndarray, labels, num_classes: int) -> float:
        """The metric of logits (N, K), or of predicted classes (N,) for a metric of the confusion matrix."""
        scores = np.asarray(scores)
        if self.of_logits is not None:
            if scores.ndim != 2:
                raise ValueError(f"metric {self.name!r} needs logits (N, K), got an array of shape {scores.shape}")
            return float(self.of_logits(scores, np.asarray(labels)))
        pred = scores.argmax(axis=1) if scores.ndim == 2 else scores
        return float(self.of_confusion(confusion_matrix(labels, pred, num_classes)[None])[0])


METRICS: dict[str, Metric] = {}  # by name, in registration order: the order of figures, columns and choices


def register(metric: Metric) -> Metric:
    if metric.name in METRICS:
        raise ValueError(f"metric {metric.name!r} is already registered")
    METRICS[metric.name] = metric
    return metric


def metric_names() -> tuple[str, ...]:
    return tuple(METRICS)


def get_metric(name: str) -> Metric:
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {name!r}") from None


def higher_is_better(name: str) -> bool:
    return get_metric(name).higher_is_better


def metric_of_key(key: str) -> Metric | None:
    """The metric a logged key names ("val_loss", "val_soup_macro_f1", "macro_f1"): the longest registered name
    that ends it; None for other keys."""
    found = [m for name, m in METRICS.items() if key == name or key.endswith("_" + name)]
    return max(found, key=lambda m: len(m.name)) if found else None


def metrics_of(logits: np.ndarray, labels, num_classes: int) -> dict[str, float]:
    """Every registered metric of logits (N, K) against labels, in registration order (one confusion matrix)."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    cm = confusion_matrix(labels, logits.argmax(axis=1), num_classes)[None]
    return {m.name: float(m.of_confusion(cm)[0]) if m.of_confusion is not None else float(m.of_logits(logits, labels))
            for m in METRICS.values()}


def classification_metrics(y_true, y_pred, num_classes: int) -> dict[str, float]:
    """The metrics of predicted classes (every metric of the confusion matrix: top-1 accuracy, macro
    precision/recall/F1, ...). Macro averages run over the classes present in y_true or y_pred, as scikit-learn's."""
    cm = confusion_matrix(y_true, y_pred, num_classes)[None]
    return {m.name: float(m.of_confusion(cm)[0]) for m in METRICS.values() if m.of_confusion is not None}


# ---------------------------------------------------------------------------------------------- the computations

def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def per_class_prf(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall, F1 of a confusion matrix (K, K) or a batch (R, K, K) (0 where undefined, like
    sklearn's zero_division=0)."""
    tp = np.diagonal(cm, axis1=-2, axis2=-1).astype(np.float64)
    predicted = cm.sum(axis=-2).astype(np.float64)
    actual = cm.sum(axis=-1).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return precision, recall, f1


def macro_mean(per_class: np.ndarray, cm: np.ndarray) -> np.ndarray:
    """(R,) means of per-class values (R, K) over each matrix's classes present in the truth or the predictions
    (0 when none). Rows with the same number of such classes are averaged together as (rows, n) arrays, so each
    row's mean is the mean of its present classes alone, to the last bit, for one matrix or a thousand."""
    present = (cm.sum(axis=-2) + cm.sum(axis=-1)) > 0
    counts = present.sum(axis=1)
    out = np.zeros(len(cm))
    for n in np.unique(counts[counts > 0]):
        rows = counts == n
        out[rows] = per_class[rows][present[rows]].reshape(-1, n).mean(axis=1)
    return out


def accuracy_of_confusion(cm: np.ndarray) -> np.ndarray:
    n = cm.sum(axis=(-2, -1))
    return np.divide(np.trace(cm, axis1=-2, axis2=-1), n, out=np.zeros(len(cm)), where=n > 0)


def log_loss(logits: np.ndarray, y_true) -> float:
    """Mean cross-entropy of raw logits against integer labels."""
    logits = np.asarray(logits, dtype=np.float64)
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(logp)), np.asarray(y_true)].mean())


def _macro(which: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda cm: macro_mean(per_class_prf(cm)[which], cm)


register(Metric("accuracy", True, of_confusion=accuracy_of_confusion, interval=True, short="acc"))
register(Metric("macro_precision", True, of_confusion=_macro(0), label="macro P"))
register(Metric("macro_recall", True, of_confusion=_macro(1), label="macro R"))
register(Metric("macro_f1", True, of_confusion=_macro(2), label="macro F1", interval=True, short="F1"))
register(Metric("loss", False, of_logits=lambda logits, labels: log_loss(logits, labels) if len(labels) else float("nan"),
                table=False))
