"""Pair-based methods: the steering-vectors library's aggregators, and linear regression.

steering-vectors (0.12.2) defines its aggregators on *pairs*: ``pos_acts[i]`` and ``neg_acts[i]``
are two versions of one prompt. That library pins transformers<5, so it cannot be a dependency
beside vLLM; these are re-implementations, proven equal to it by tests/test_parity_steering_vectors.py.

Our corpus has no natural pairs: a concept has a few positives and hundreds of negatives. So the
pairs are formed here (:func:`pairs`): there are ``max(n_pos, n_neg)`` of them, and pair ``i``
is ``(pos[i mod n_pos], neg[i mod n_neg])``, rows in corpus order. Every negative is used exactly
once and the positives are cycled through, so each positive appears ``n_neg / n_pos`` times
(the counts differ by at most one).

Why each exists:
- ``mean``: the mean pair difference. Equal to diffmean up to the cycling's weights; kept so a
  result can be compared with published steering-vectors numbers.
- ``pca``: the top *uncentred* principal component of the pair differences. It keeps the
  direction the differences agree on and drops their magnitudes; centring would remove exactly
  the shared shift we want (the library mirrors the differences instead, so neither centres).
- ``pca_diff``: repeng's ``ControlVector.train`` (0.4, its default ``pca_diff``): the top
  *centred* principal component of the pair differences (scikit-learn's PCA centres), signed so
  that in most pairs the positive projects above its negative. Centring drops the mean shift and
  keeps the axis the pairs vary along; tests/test_corpus_pairs.py checks it against repeng's
  algorithm on the same pairs.
- ``logistic`` / ``logistic_l1``: a discriminative direction: it uses what separates positives
  from negatives, not what they merely have in common, so a feature a fraction of the negatives
  share (a scene, a narrator) pulls it less than it pulls a mean. L1 makes it sparse, which
  asks whether a concept lives in a few residual dimensions.
- ``linear``: least squares onto +1/-1 labels, the closed-form cousin of logistic; with more
  pairs than dimensions it whitens by the difference covariance (like LDA).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LinearRegression, LogisticRegression


def pairs(pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pos_acts, neg_acts)`` of equal length: pair i is (pos[i mod n_pos], neg[i mod n_neg])."""
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("pair-based methods need at least one positive and one negative")
    n = max(len(pos), len(neg))
    i = torch.arange(n)
    return pos[i % len(pos)], neg[i % len(neg)]


def mean(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """steering-vectors' ``mean_aggregator``: the mean pair difference."""
    p, n = pairs(pos, neg)
    return (p - n).mean(0)


def pca(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """steering-vectors' ``pca_aggregator``: top uncentred right singular vector of the differences.

    The library takes the SVD of the differences stacked with their negatives, whose top left
    singular vector (of the transpose) is this one; the sign makes the mean projection positive.
    """
    p, n = pairs(pos, neg)
    deltas = (p - n).double()
    # Top eigenvector of the smaller Gram matrix (float64): the same vector as the SVD's, for
    # a fraction of the cost when there are hundreds of pairs.
    if deltas.shape[0] >= deltas.shape[1]:
        vec = torch.linalg.eigh(deltas.T @ deltas).eigenvectors[:, -1]
    else:
        u = torch.linalg.eigh(deltas @ deltas.T).eigenvectors[:, -1]
        vec = deltas.T @ u
        vec = vec / vec.norm()
    sign = torch.sign((deltas @ vec).mean())
    return (sign * vec).to(pos.dtype)


def pca_diff(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """repeng's ``pca_diff``: first principal component of the centred pair differences, signed by
    the pairs' majority vote (more pairs with positive above negative than below)."""
    p, n = pairs(pos, neg)
    deltas = (p - n).double()
    if len(deltas) == 1:  # one pair: no variance to analyse; its difference is the only direction
        return deltas[0].to(pos.dtype)
    centred = deltas - deltas.mean(0)
    if centred.shape[0] >= centred.shape[1]:
        vec = torch.linalg.eigh(centred.T @ centred).eigenvectors[:, -1]
    else:
        vec = centred.T @ torch.linalg.eigh(centred @ centred.T).eigenvectors[:, -1]
        vec = vec / vec.norm().clamp_min(1e-30)
    votes = deltas @ vec
    if int((votes < 0).sum()) > int((votes > 0).sum()):
        vec = -vec
    return vec.to(pos.dtype)


def _regression_direction(pos: torch.Tensor, neg: torch.Tensor, model) -> torch.Tensor:
    """The library's ``_get_normalized_regression_coef``: fit on pair-centred rows, labels +-1.

    Each pair is centred on its own mean, so the rows are +-(p - n)/2: the fit sees only what
    differs within a pair, and no intercept is needed.
    """
    p, n = pairs(pos, neg)
    centre = (p + n) / 2
    x = torch.cat([p - centre, n - centre]).float().numpy()
    y = np.concatenate([np.ones(len(p), np.float32), -np.ones(len(n), np.float32)])
    coef = torch.from_numpy(np.asarray(model.fit(x, y).coef_, dtype=np.float64).reshape(-1))
    return coef.to(pos.dtype)


def _l1() -> dict[str, Any]:
    """L1 penalty keywords: scikit-learn >= 1.8 deprecates ``penalty`` for ``l1_ratio``."""
    if LogisticRegression().get_params()["penalty"] == "deprecated":
        return {"l1_ratio": 1.0}
    return {"penalty": "l1"}


def logistic(pos: torch.Tensor, neg: torch.Tensor, C: float = 1.0, max_iter: int = 1000) -> torch.Tensor:
    """steering-vectors' ``logistic_aggregator``: L2 logistic regression (lbfgs), no intercept."""
    model = LogisticRegression(fit_intercept=False, C=C, max_iter=max_iter)
    return _regression_direction(pos, neg, model)


def logistic_l1(pos: torch.Tensor, neg: torch.Tensor, C: float = 1.0, max_iter: int = 1000) -> torch.Tensor:
    """``logistic_aggregator`` with an L1 penalty (liblinear): a sparse direction.

    liblinear visits coordinates in a random order: it is seeded so a fit is reproducible.
    """
    model = LogisticRegression(
        fit_intercept=False, C=C, max_iter=max_iter, solver="liblinear", random_state=0, **_l1()
    )
    return _regression_direction(pos, neg, model)


def linear(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Least squares onto +1/-1 labels (minimum-norm when there are fewer pairs than dimensions)."""
    return _regression_direction(pos, neg, LinearRegression(fit_intercept=False))
