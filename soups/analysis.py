"""Analysis of soups from predictions: soft voting, cross-entropy distances, MDS, bias-variance.

Predictions in, numbers out (numpy). Shapes: logits/probs (N, C) per model, stacked (M, N, C); labels (N,).
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

CE_CLAMP = 1e-8  # the paper clamps probabilities at 1e-8 before taking logs


def softmax(logits, axis: int = -1) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def soft_vote(logits_list: Sequence) -> np.ndarray:
    """Soft-voting ensemble: the mean of the models' logits, then softmax -> (N, C) probabilities."""
    return softmax(np.mean(np.stack([np.asarray(x, dtype=np.float64) for x in logits_list]), axis=0))


def ce_distance(p, q, eps: float = CE_CLAMP) -> float:
    """d(p, q) = -(1/N) sum_i sum_c [p_ic log q_ic + q_ic log p_ic], probabilities clamped at eps.

    Note d(p, p) = 2 H(p) is not 0; ce_distance_matrix sets its diagonal to 0 by definition."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    lp, lq = np.log(np.clip(p, eps, None)), np.log(np.clip(q, eps, None))
    return float(-(p * lq + q * lp).sum() / p.shape[0])


def ce_distance_matrix(probs_list: Sequence, eps: float = CE_CLAMP) -> np.ndarray:
    """(M, M) symmetric matrix of ce_distance between every pair of models, diagonal exactly 0."""
    P = np.stack([np.asarray(p, dtype=np.float64) for p in probs_list])  # (M, N, C)
    L = np.log(np.clip(P, eps, None))
    cross = np.einsum("anc,bnc->ab", P, L)  # cross[a, b] = sum p_a log p_b
    D = -(cross + cross.T) / P.shape[1]
    np.fill_diagonal(D, 0.0)
    return D


def mds_embed(D, seed: int = 0) -> np.ndarray:
    """Metric MDS of a precomputed dissimilarity matrix into 2-D -> (M, 2).

    Classical-MDS initialisation (then SMACOF) makes the result deterministic; parameters are spelled out
    for scikit-learn >= 1.8, where metric/dissimilarity were renamed metric_mds/metric.
    """
    from sklearn.manifold import MDS

    D = np.asarray(D, dtype=np.float64)
    if D.ndim != 2 or D.shape[0] != D.shape[1]:
        raise ValueError(f"mds_embed: need a square dissimilarity matrix, got shape {D.shape}")
    if not np.allclose(D, D.T):
        raise ValueError("mds_embed: dissimilarity matrix is not symmetric")
    if D.shape[0] < 3:  # SMACOF is pointless here; place the points on a line
        out = np.zeros((D.shape[0], 2))
        if D.shape[0] == 2:
            out[1, 0] = D[0, 1]
        return out
    mds = MDS(n_components=2, metric_mds=True, metric="precomputed", init="classical_mds", n_init=1,
              max_iter=1000, eps=1e-9, random_state=seed, normalized_stress=False)
    with warnings.catch_warnings():
        # classical_mds init ignores n_init; some versions say so in a UserWarning
        warnings.filterwarnings("ignore", message=".*n_init.*", category=UserWarning)
        return mds.fit_transform(D)


def _log_probs(probs, eps: float) -> np.ndarray:
    """log of probabilities clamped at eps and renormalized, so each row is a proper distribution."""
    lp = np.log(np.clip(np.asarray(probs, dtype=np.float64), eps, None))
    return lp - np.log(np.exp(lp).sum(axis=-1, keepdims=True))


def bias_variance_ce(probs, y, eps: float = 1e-12) -> dict[str, float]:
    """Bias-variance decomposition of the cross-entropy loss over M models (Yang et al. 2020).

    probs: (M, N, C); y: (N,). pi_bar = normalize(exp(mean_m log pi_m)) (the geometric-mean prediction);
      bias2     = mean_i -log pi_bar[i, y_i]
      variance  = mean_i mean_m KL(pi_bar_i || pi_m,i)
      expected_loss = mean_m mean_i -log pi_m[i, y_i] = bias2 + variance, exactly:
    with Z_i = sum_c exp(mean_m log pi_mic) (<= 1), E_m[-log pi_m,iy] = -log pi_bar_iy - log Z_i and
    KL(pi_bar || pi_m) averaged over m is sum_c pi_bar_c (log pi_bar_c - mean_m log pi_mc) = -log Z_i.
    Probabilities are clamped at eps and renormalized first, so the identity holds for the numbers used.
    """
    L = _log_probs(probs, eps)  # (M, N, C)
    y = np.asarray(y, dtype=np.int64)
    n = np.arange(L.shape[1])
    mean_log = L.mean(axis=0)  # (N, C)
    log_bar = mean_log - np.log(np.exp(mean_log).sum(axis=-1, keepdims=True))
    bar = np.exp(log_bar)
    expected_loss = float(-L[:, n, y].mean())
    bias2 = float(-log_bar[n, y].mean())
    kl = (bar[None] * (log_bar[None] - L)).sum(axis=-1)  # (M, N)
    variance = float(kl.mean())
    return {"expected_loss": expected_loss, "bias2": bias2, "variance": variance}


def main_prediction(preds, num_classes: int | None = None) -> np.ndarray:
    """Mode over models per sample, ties broken by the lowest class index. preds: (M, N) -> (N,)."""
    preds = np.asarray(preds, dtype=np.int64)
    M, N = preds.shape
    K = int(preds.max()) + 1 if num_classes is None else num_classes
    counts = np.bincount((np.arange(N)[None, :] * K + preds).ravel(), minlength=N * K).reshape(N, K)
    return counts.argmax(axis=1)  # argmax returns the first maximum = lowest class index


def bias_variance_01(preds, y, num_classes: int | None = None) -> dict[str, float]:
    """Bias-variance decomposition of the 0-1 loss over M models (Domingos 2000), noise-free.

    preds: (M, N) predicted labels; y: (N,). main = mode over models;
      bias     = mean_i [main_i != y_i]
      variance = mean_i mean_m [pred_mi != main_i]
    Domingos' split: variance_unbiased (samples where main is right) adds to the loss, variance_biased
    (main is wrong) subtracts, weighted by P(pred = y | pred != main), so
      expected_loss = bias + net_variance, net_variance = variance_unbiased - sum over biased samples.
    """
    preds = np.asarray(preds, dtype=np.int64)
    y = np.asarray(y, dtype=np.int64)
    K = max(int(preds.max()), int(y.max())) + 1 if num_classes is None else num_classes
    main = main_prediction(preds, K)
    biased = main != y  # (N,)
    off_main = preds != main[None]  # (M, N)
    var_i = off_main.mean(axis=0)  # (N,)
    # P(pred = y | pred != main): on a biased sample, a model that leaves the main prediction may hit y
    hit_y = ((preds == y[None]) & off_main).sum(axis=0)
    off = off_main.sum(axis=0)
    c_i = np.divide(hit_y, off, out=np.zeros(len(y)), where=off > 0)
    variance_unbiased = float((var_i * ~biased).mean())
    variance_biased = float((var_i * biased).mean())
    net_variance = variance_unbiased - float((c_i * var_i * biased).mean())
    return {
        "expected_loss": float((preds != y[None]).mean()),
        "bias": float(biased.mean()),
        "variance": float(var_i.mean()),
        "variance_unbiased": variance_unbiased,
        "variance_biased": variance_biased,
        "net_variance": net_variance,
    }
