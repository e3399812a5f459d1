"""Bootstrap intervals and McNemar's exact test."""
import math
import time

import numpy as np
import pytest
from scipy.stats import binomtest

from ich.metrics import classification_metrics
from soups.stats import (bootstrap_ci, mcnemar_exact, metric_on_resamples, paired_bootstrap_diff,
                         paired_comparison, resample_indices)


def fake_predictions(n=740, k=17, acc=0.7, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(k), n // k + 1)[:n]
    pred = np.where(rng.random(n) < acc, y, rng.integers(0, k, n))
    return y, pred


def test_vectorized_metrics_match_ich_metrics_per_resample():
    y, pred = fake_predictions(n=200, k=7)
    idx = resample_indices(y, 20, np.random.default_rng(0), stratify=False)
    acc = metric_on_resamples(y, pred, idx, "accuracy", 7)
    f1 = metric_on_resamples(y, pred, idx, "macro_f1", 7)
    for r in range(20):
        m = classification_metrics(y[idx[r]], pred[idx[r]], 7)
        assert acc[r] == pytest.approx(m["accuracy"], rel=1e-12)
        assert f1[r] == pytest.approx(m["macro_f1"], rel=1e-12)


def test_stratified_resamples_keep_class_counts():
    y, _ = fake_predictions(n=100, k=3)
    idx = resample_indices(y, 50, np.random.default_rng(1), stratify=True)
    for row in idx:
        assert np.array_equal(np.bincount(y[row], minlength=3), np.bincount(y, minlength=3))


def cpu_seconds(fn) -> float:
    """CPU time of fn() in this process (every thread), not wall: a loaded machine cannot stretch it."""
    start = time.process_time()
    fn()
    return time.process_time() - start


def test_bootstrap_ci_point_and_order_and_speed():
    y, pred = fake_predictions()
    # 1000 resamples of 740 images, vectorized: ~0.01-0.03 CPU s measured here, the bound 0.5 CPU s (a per-image
    # Python loop costs ~0.2). Control: a planted call that burns 0.6 CPU s fails the same bound.
    assert cpu_seconds(lambda: bootstrap_ci(y, pred, "accuracy", n_resamples=1000)) < 0.5

    def planted_slow():
        start = time.process_time()
        while time.process_time() - start < 0.6:
            pass
    assert not cpu_seconds(planted_slow) < 0.5
    ci = bootstrap_ci(y, pred, "accuracy", n_resamples=1000)
    assert ci.point == pytest.approx(np.mean(y == pred))
    assert ci.low < ci.point < ci.high
    assert 0.02 < ci.high - ci.low < 0.1  # ~ +-1.96 * 1.7 points at n=740
    f1 = bootstrap_ci(y, pred, "macro_f1", n_resamples=1000, num_classes=17)
    assert f1.point == pytest.approx(classification_metrics(y, pred, 17)["macro_f1"])
    assert f1.low < f1.point < f1.high
    assert bootstrap_ci(y, pred, seed=3) == bootstrap_ci(y, pred, seed=3)
    with pytest.raises(ValueError, match="metric must be one of"):
        bootstrap_ci(y, pred, "top5")


def test_bootstrap_coverage_of_known_accuracy():
    # 1,000 simulated test sets whose true per-image accuracy is 0.7: the 95% interval should cover 0.7
    # about 95% of the time (percentile bootstrap is a little liberal, so ask for >= 93%).
    y = np.repeat(np.arange(17), 44)[:740]
    covered = 0
    for s in range(1000):
        rng = np.random.default_rng(10_000 + s)
        pred = np.where(rng.random(740) < 0.7, y, (y + 1) % 17)
        ci = bootstrap_ci(y, pred, n_resamples=200, seed=s)
        covered += ci.low <= 0.7 <= ci.high
    assert 930 <= covered <= 975


def test_paired_diff_identical_predictions_is_zero():
    y, pred = fake_predictions()
    for metric in ("accuracy", "macro_f1"):
        ci = paired_bootstrap_diff(y, pred, pred, metric)
        assert (ci.point, ci.low, ci.high) == (0.0, 0.0, 0.0)
    m = mcnemar_exact(y, pred, pred)
    assert (m.b, m.c, m.p_value) == (0, 0, 1.0)


def test_paired_diff_uses_same_resamples():
    # b differs from a on 10 images where a is right and b wrong: the difference is always >= 0 when paired
    y, a = fake_predictions(n=300, acc=1.0)
    b = a.copy()
    b[:10] = (b[:10] + 1) % 17
    ci = paired_bootstrap_diff(y, a, b, "accuracy", n_resamples=500)
    assert ci.point == pytest.approx(10 / 300)
    assert ci.low >= 0.0 and ci.high > ci.low


def hand_mcnemar_p(b, c):
    n, k = b + c, min(b, c)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def test_mcnemar_hand_worked_table():
    # 2x2 table: both right 50, a right/b wrong 9, a wrong/b right 2, both wrong 39
    y = np.zeros(100, dtype=int)
    a = np.array([0] * 50 + [0] * 9 + [1] * 2 + [1] * 39)
    b = np.array([0] * 50 + [1] * 9 + [0] * 2 + [1] * 39)
    m = mcnemar_exact(y, a, b)
    assert (m.b, m.c) == (9, 2)
    # P = 2 * (C(11,0) + C(11,1) + C(11,2)) / 2^11 = 2 * 67 / 2048
    assert m.p_value == pytest.approx(134 / 2048, rel=1e-12)
    assert m.p_value == pytest.approx(binomtest(9, 11, 0.5).pvalue, rel=1e-12)
    rng = np.random.default_rng(0)
    for _ in range(20):
        bb, cc = rng.integers(0, 30, 2)
        y = np.zeros(bb + cc, dtype=int)
        pa = np.array([0] * bb + [1] * cc)
        pb = 1 - pa
        if bb + cc:
            assert mcnemar_exact(y, pa, pb).p_value == pytest.approx(hand_mcnemar_p(bb, cc), rel=1e-9)


def test_paired_comparison_flat_floats():
    y, single = fake_predictions(seed=1, acc=0.68)
    rng = np.random.default_rng(2)
    soup = np.where(rng.random(len(y)) < 0.1, y, single)  # soup fixes ~10% of images
    out = paired_comparison(y, soup, single, n_resamples=300)
    assert set(out) == {"acc_diff", "acc_diff_low", "acc_diff_high", "f1_diff", "f1_diff_low", "f1_diff_high",
                        "mcnemar_b", "mcnemar_c", "mcnemar_p"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())
    assert out["mcnemar_c"] == 0.0 and out["mcnemar_b"] > 0
    assert out["acc_diff"] == pytest.approx(out["mcnemar_b"] / len(y))
    assert 0 < out["acc_diff_low"] <= out["acc_diff"] <= out["acc_diff_high"]
    assert out["mcnemar_p"] < 1e-6


def test_length_mismatch_refused():
    with pytest.raises(ValueError, match="predictions have 3 items but y_true has 4"):
        mcnemar_exact([0, 1, 2, 3], [0, 1, 2], [0, 1, 2])
