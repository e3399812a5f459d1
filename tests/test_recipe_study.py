"""bench/recipe_study.py's pooled-over-seeds difference (pure numpy; no training)."""
import numpy as np
import pytest

from bench.recipe_study import pooled_delta
from soups.stats import paired_bootstrap_diff


def _preds(rng, y, right):
    """Predictions right on about `right` of the images, a wrong class elsewhere."""
    wrong = (y + rng.integers(1, 3, size=len(y))) % 3
    return np.where(rng.random(len(y)) < right, y, wrong)


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1"])
def test_one_seed_is_the_paired_bootstrap(metric):
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, size=300)
    soup, best = _preds(rng, y, 0.8), _preds(rng, y, 0.7)
    ci = paired_bootstrap_diff(y, soup, best, metric, n_resamples=300, seed=0, num_classes=3)
    assert pooled_delta(y, [soup], [best], metric, 3, 300) == pytest.approx([ci.point, ci.low, ci.high])


def test_seeds_are_averaged_on_the_same_images():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, size=400)
    soups = [_preds(rng, y, 0.8), _preds(rng, y, 0.6)]
    bests = [_preds(rng, y, 0.7), _preds(rng, y, 0.7)]
    point, low, high = pooled_delta(y, soups, bests, "accuracy", 3, 500)
    expected = np.mean([(s == y).mean() - (b == y).mean() for s, b in zip(soups, bests)])
    assert point == pytest.approx(expected)
    assert low <= point <= high
    # the same seed twice is that seed alone
    assert pooled_delta(y, soups[:1] * 2, bests[:1] * 2, "accuracy", 3, 500) == pytest.approx(
        pooled_delta(y, soups[:1], bests[:1], "accuracy", 3, 500))
