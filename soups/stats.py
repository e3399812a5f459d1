"""Honest comparisons on one test set: bootstrap intervals and a paired exact test.

At ICH-17 scale (~740 test images) one accuracy figure has a binomial sd of ~1.3 points, so a soup-versus-
single difference is reported with a 95% bootstrap interval (same resampled images for both models) and
McNemar's exact test on the images where exactly one of the two is right.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest

from ich.metrics import METRICS, Metric, confusion_matrix


@dataclass
class CI:
    point: float
    low: float
    high: float


@dataclass
class McNemar:
    b: int  # a right, b wrong
    c: int  # a wrong, b right
    p_value: float


def _labels(y_true, *preds) -> list[np.ndarray]:
    arrays = [np.asarray(a, dtype=np.int64).ravel() for a in (y_true, *preds)]
    n = len(arrays[0])
    for a in arrays[1:]:
        if len(a) != n:
            raise ValueError(f"predictions have {len(a)} items but y_true has {n}")
    if n == 0:
        raise ValueError("no evaluated items")
    return arrays


def _num_classes(num_classes: int | None, *arrays: np.ndarray) -> int:
    return num_classes if num_classes is not None else int(max(a.max() for a in arrays)) + 1


def resample_indices(y_true: np.ndarray, n_resamples: int, rng: np.random.Generator,
                     stratify: bool = True) -> np.ndarray:
    """(R, N) bootstrap indices; with stratify, each resample keeps every true class's count."""
    n = len(y_true)
    if not stratify:
        return rng.integers(0, n, size=(n_resamples, n))
    parts = []
    for c in np.unique(y_true):
        members = np.flatnonzero(y_true == c)
        parts.append(members[rng.integers(0, len(members), size=(n_resamples, len(members)))])
    return np.concatenate(parts, axis=1)


def bootstrap_metric(name: str) -> Metric:
    """The registered metric of that name if predictions suffice for it (it reads confusion matrices)."""
    metric = METRICS.get(name)
    if metric is None or metric.of_confusion is None:
        names = ", ".join(m.name for m in METRICS.values() if m.of_confusion is not None)
        raise ValueError(f"metric must be one of {names}, got {name!r}")
    return metric


def interval_metrics() -> list[Metric]:
    """The metrics whose test figures carry a bootstrap interval and a paired difference (accuracy, macro F1)."""
    return [m for m in METRICS.values() if m.interval]


def resampled_confusion(y_true: np.ndarray, y_pred: np.ndarray, idx: np.ndarray, num_classes: int) -> np.ndarray:
    """(R, K, K) confusion matrices of every resample (row of idx), by one bincount."""
    R, K = idx.shape[0], num_classes
    codes = (np.arange(R)[:, None] * K + y_true[idx]) * K + y_pred[idx]
    return np.bincount(codes.ravel(), minlength=R * K * K).reshape(R, K, K)


def metric_on_resamples(y_true: np.ndarray, y_pred: np.ndarray, idx: np.ndarray, metric: str,
                        num_classes: int) -> np.ndarray:
    """metric for every resample (row of idx) at once -> (R,): the registered metric's own function of
    confusion matrices (ich/metrics.py), on R matrices instead of one."""
    return bootstrap_metric(metric).of_confusion(resampled_confusion(y_true, y_pred, idx, num_classes))


def point_metric(y_true, y_pred, metric: str, num_classes: int) -> float:
    return float(bootstrap_metric(metric).of_confusion(confusion_matrix(y_true, y_pred, num_classes)[None])[0])


def _interval(point: float, samples: np.ndarray, alpha: float) -> CI:
    low, high = np.quantile(samples, [alpha / 2, 1 - alpha / 2])
    return CI(float(point), float(low), float(high))


def bootstrap_ci(y_true, y_pred, metric: str = "accuracy", *, n_resamples: int = 1000, alpha: float = 0.05,
                 seed: int = 0, stratify: bool = True, num_classes: int | None = None) -> CI:
    """Percentile bootstrap interval of a metric over the evaluated images (within each true class when stratify)."""
    y_true, y_pred = _labels(y_true, y_pred)
    K = _num_classes(num_classes, y_true, y_pred)
    idx = resample_indices(y_true, n_resamples, np.random.default_rng(seed), stratify)
    samples = metric_on_resamples(y_true, y_pred, idx, metric, K)
    return _interval(point_metric(y_true, y_pred, metric, K), samples, alpha)


def paired_bootstrap_diff(y_true, pred_a, pred_b, metric: str = "accuracy", *, n_resamples: int = 1000,
                          alpha: float = 0.05, seed: int = 0, stratify: bool = True,
                          num_classes: int | None = None) -> CI:
    """Percentile bootstrap interval of metric(a) - metric(b), both scored on the same resampled images."""
    y_true, pred_a, pred_b = _labels(y_true, pred_a, pred_b)
    K = _num_classes(num_classes, y_true, pred_a, pred_b)
    idx = resample_indices(y_true, n_resamples, np.random.default_rng(seed), stratify)
    diffs = metric_on_resamples(y_true, pred_a, idx, metric, K) - metric_on_resamples(y_true, pred_b, idx, metric, K)
    point = point_metric(y_true, pred_a, metric, K) - point_metric(y_true, pred_b, metric, K)
    return _interval(point, diffs, alpha)


def mcnemar_exact(y_true, pred_a, pred_b) -> McNemar:
    """McNemar's exact test: two-sided binomial test of b vs c discordant pairs at p = 1/2 (p = 1 when none)."""
    y_true, pred_a, pred_b = _labels(y_true, pred_a, pred_b)
    right_a, right_b = pred_a == y_true, pred_b == y_true
    b = int((right_a & ~right_b).sum())
    c = int((~right_a & right_b).sum())
    p = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)
    return McNemar(b, c, min(p, 1.0))


def paired_comparison(y_true, pred_soup, pred_single, *, n_resamples: int = 1000, alpha: float = 0.05,
                      seed: int = 0, stratify: bool = True, num_classes: int | None = None) -> dict[str, float]:
    """Soup vs single model on the same images, as flat floats ready to log as metrics: for each interval metric,
    acc_diff(_low/_high), f1_diff(_low/_high) (soup - single, bootstrap interval); mcnemar_b/c/p."""
    out: dict[str, float] = {}
    for metric in interval_metrics():
        ci = paired_bootstrap_diff(y_true, pred_soup, pred_single, metric.name, n_resamples=n_resamples, alpha=alpha,
                                   seed=seed, stratify=stratify, num_classes=num_classes)
        p = metric.diff_name
        out[f"{p}_diff"], out[f"{p}_diff_low"], out[f"{p}_diff_high"] = ci.point, ci.low, ci.high
    test = mcnemar_exact(y_true, pred_soup, pred_single)
    out["mcnemar_b"], out["mcnemar_c"], out["mcnemar_p"] = float(test.b), float(test.c), test.p_value
    return out
