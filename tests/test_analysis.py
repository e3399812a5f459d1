"""Analysis math: soft voting, CE distances, MDS, bias-variance decompositions."""
import math
import warnings

import numpy as np
import pytest

from soups.analysis import (bias_variance_01, bias_variance_ce, ce_distance, ce_distance_matrix, main_prediction,
                            mds_embed, soft_vote, softmax)


def random_probs(M, N, C, seed=0):
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.ones(C) * 0.7, size=(M, N))


def test_softmax_and_soft_vote_average_logits_not_probabilities():
    a = np.array([[4.0, 0.0, 0.0]])
    b = np.array([[0.0, 2.0, 0.0]])
    expected = softmax((a + b) / 2)
    assert np.allclose(soft_vote([a, b]), expected)
    assert not np.allclose(soft_vote([a, b]), (softmax(a) + softmax(b)) / 2)
    assert np.allclose(softmax(np.array([[1000.0, 1000.0]])), 0.5)  # stable for large logits


def test_ce_distance_hand_computed_2x2():
    p = np.array([[0.5, 0.5], [0.9, 0.1]])
    q = np.array([[0.8, 0.2], [0.2, 0.8]])
    hand = -(1 / 2) * (
        0.5 * math.log(0.8) + 0.5 * math.log(0.2) + 0.8 * math.log(0.5) + 0.2 * math.log(0.5)
        + 0.9 * math.log(0.2) + 0.1 * math.log(0.8) + 0.2 * math.log(0.9) + 0.8 * math.log(0.1))
    assert ce_distance(p, q) == pytest.approx(hand, rel=1e-12)
    D = ce_distance_matrix([p, q])
    assert D[0, 1] == pytest.approx(hand, rel=1e-12)


def test_ce_distance_clamps_zero_probabilities():
    p = np.array([[1.0, 0.0]])
    q = np.array([[0.0, 1.0]])
    assert ce_distance(p, q) == pytest.approx(-2 * math.log(1e-8))


def test_ce_distance_matrix_symmetric_zero_diagonal():
    P = random_probs(5, 40, 6)
    D = ce_distance_matrix(list(P))
    assert np.array_equal(D, D.T)
    assert np.all(np.diag(D) == 0.0)
    assert np.all(D[~np.eye(5, dtype=bool)] > 0)
    assert D[1, 3] == pytest.approx(ce_distance(P[1], P[3]), rel=1e-12)


def pairwise(X):
    return np.linalg.norm(X[:, None] - X[None], axis=-1)


def test_mds_recovers_euclidean_distances_deterministically():
    X = np.random.default_rng(3).normal(size=(8, 2)) * 3
    D = pairwise(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no FutureWarning about renamed parameters
        E = mds_embed(D, seed=0)
        E2 = mds_embed(D, seed=0)
    assert E.shape == (8, 2)
    assert np.allclose(pairwise(E), D, atol=1e-4)  # equal up to rotation/reflection/translation
    assert np.array_equal(E, E2)


def test_mds_small_and_bad_inputs():
    assert np.allclose(pairwise(mds_embed(np.array([[0.0, 2.0], [2.0, 0.0]]))), [[0, 2], [2, 0]])
    with pytest.raises(ValueError, match="symmetric"):
        mds_embed(np.array([[0.0, 1.0, 2.0], [1.5, 0.0, 1.0], [2.0, 1.0, 0.0]]))


def test_bias_variance_ce_identity_on_random_predictions():
    P = random_probs(7, 200, 5, seed=1)
    y = np.random.default_rng(2).integers(0, 5, 200)
    r = bias_variance_ce(P, y)
    direct_loss = -np.mean(np.log(P[:, np.arange(200), y]))
    assert r["expected_loss"] == pytest.approx(direct_loss, rel=1e-9)
    assert r["expected_loss"] == pytest.approx(r["bias2"] + r["variance"], rel=1e-10)
    assert r["variance"] > 0


def test_bias_variance_ce_against_a_slow_hand_computation():
    P = random_probs(3, 4, 3, seed=5)
    y = np.array([0, 2, 1, 1])
    bias2, var = 0.0, 0.0
    for i in range(4):
        g = [math.exp(sum(math.log(P[m, i, c]) for m in range(3)) / 3) for c in range(3)]
        bar = [v / sum(g) for v in g]
        bias2 += -math.log(bar[y[i]]) / 4
        for m in range(3):
            var += sum(bar[c] * math.log(bar[c] / P[m, i, c]) for c in range(3)) / 12
    r = bias_variance_ce(P, y)
    assert r["bias2"] == pytest.approx(bias2, rel=1e-10)
    assert r["variance"] == pytest.approx(var, rel=1e-10)


def test_bias_variance_01_hand_worked():
    y = np.array([0, 1, 2, 0, 2])
    preds = np.array([[0, 1, 1, 2, 2],
                      [0, 2, 1, 1, 0],
                      [1, 1, 2, 1, 1]])
    # sample 4: all three disagree -> main is the lowest class, 0
    assert main_prediction(preds).tolist() == [0, 1, 1, 1, 0]
    r = bias_variance_01(preds, y)
    assert r["bias"] == pytest.approx(3 / 5)
    assert r["variance"] == pytest.approx(2 / 5)
    assert r["variance_unbiased"] == pytest.approx(2 / 15)
    assert r["variance_biased"] == pytest.approx(4 / 15)
    assert r["net_variance"] == pytest.approx(0.0, abs=1e-12)
    assert r["expected_loss"] == pytest.approx(3 / 5)


def test_bias_variance_01_identity_on_random_predictions():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 6, 300)
    preds = np.where(rng.random((9, 300)) < 0.6, y, rng.integers(0, 6, (9, 300)))
    r = bias_variance_01(preds, y)
    assert r["expected_loss"] == pytest.approx(r["bias"] + r["net_variance"], rel=1e-12)


def test_identical_models_have_zero_variance():
    P = np.repeat(random_probs(1, 50, 4, seed=6), 5, axis=0)
    y = np.random.default_rng(7).integers(0, 4, 50)
    ce = bias_variance_ce(P, y)
    assert ce["variance"] == pytest.approx(0.0, abs=1e-12)
    assert ce["bias2"] == pytest.approx(ce["expected_loss"], rel=1e-12)
    zo = bias_variance_01(P.argmax(-1), y)
    assert zo["variance"] == 0.0 and zo["net_variance"] == 0.0
    assert zo["bias"] == zo["expected_loss"]
