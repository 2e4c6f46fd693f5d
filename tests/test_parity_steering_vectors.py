"""Parity with the steering-vectors library's aggregators (the test oracle; pinned 0.12.2,
installed --no-deps because it pins transformers<5 but runs with 5.x).

Each method pairs its inputs itself (amygdala.methods.aggregators.pairs); the library is given
the same pairs. Inputs carry a large common offset, so a method that centred the data (as
scikit-learn's PCA does) would disagree with the library.
"""

import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import LinearRegression
from steering_vectors import aggregators as sv

from amygdala.methods.aggregators import _l1, _regression_direction, linear, logistic, logistic_l1, mean, pairs, pca

# The library builds a tensor from a list of arrays (its own code, not ours).
pytestmark = pytest.mark.filterwarnings("ignore:Creating a tensor from a list of numpy.ndarrays")


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def activations(seed: int, n_pos: int, n_neg: int, hidden: int = 48):
    """Positives shifted along one direction, plus a shared offset and anisotropic noise."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.2, 2.0, hidden)
    offset = 5 * torch.randn(hidden, generator=g)
    shift = torch.randn(hidden, generator=g)
    pos = offset + shift + torch.randn(n_pos, hidden, generator=g) * scales
    neg = offset + torch.randn(n_neg, hidden, generator=g) * scales
    return pos, neg


CASES = [(0, 4, 60), (1, 30, 30), (2, 50, 7)]  # few positives (the corpus's case), equal, few negatives


@pytest.mark.parametrize("seed, n_pos, n_neg", CASES)
@pytest.mark.parametrize(
    "ours, theirs",
    [
        (mean, sv.mean_aggregator()),
        (pca, sv.pca_aggregator()),
        (logistic, sv.logistic_aggregator({"max_iter": 1000})),
        (lambda p, n: logistic(p, n, C=0.05), sv.logistic_aggregator({"C": 0.05, "max_iter": 1000})),
        (logistic_l1, sv.logistic_aggregator({"solver": "liblinear", "max_iter": 1000, "random_state": 0, **_l1()})),
        (lambda p, n: logistic_l1(p, n, C=0.2),
         sv.logistic_aggregator({"C": 0.2, "solver": "liblinear", "max_iter": 1000, "random_state": 0, **_l1()})),
        # The library has no linear aggregator; its regression helper takes any sklearn model.
        (linear, lambda p, n: sv._get_normalized_regression_coef(p, n, LinearRegression(fit_intercept=False))),
    ],
    ids=["mean", "pca", "logistic", "logistic_C", "logistic_l1", "logistic_l1_C", "linear"],
)
def test_matches_steering_vectors(seed, n_pos, n_neg, ours, theirs):
    pos, neg = activations(seed, n_pos, n_neg)
    p, n = pairs(pos, neg)
    assert cosine(ours(pos, neg), theirs(p, n)) > 0.999


def test_l1_is_sparse_and_differs_from_l2():
    pos, neg = activations(0, 30, 30)
    l1, l2 = logistic_l1(pos, neg, C=0.2), logistic(pos, neg, C=0.2)
    assert (l1 == 0).sum() > 10 and (l2 == 0).sum() == 0
    assert cosine(l1, l2) < 0.99


def test_pca_does_not_centre():
    """Centring removes the shared shift of the differences, which is the concept."""
    pos, neg = activations(1, 30, 30)
    p, n = pairs(pos, neg)
    centred = torch.from_numpy(PCA(1).fit((p - n).numpy()).components_[0])
    assert cosine(pca(pos, neg), sv.pca_aggregator()(p, n)) > 0.999
    assert abs(cosine(pca(pos, neg), centred)) < 0.9


def test_regression_rows_are_pair_centred():
    """The library centres each pair on its own mean; a regression on raw rows is different."""
    pos, neg = activations(2, 30, 30)
    raw = torch.from_numpy(
        LinearRegression(fit_intercept=False)
        .fit(torch.cat([pos, neg]).numpy(), torch.cat([torch.ones(30), -torch.ones(30)]).numpy())
        .coef_
    )
    ours = _regression_direction(pos, neg, LinearRegression(fit_intercept=False))
    assert cosine(ours, linear(pos, neg)) > 0.9999 and abs(cosine(ours, raw)) < 0.9
