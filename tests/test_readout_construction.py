"""The readout construction: removing the concepts' shared direction and closed-form token statistics."""

import pytest
import torch

from amygdala.readout.construction import TokenMoments, remove_shared, valence_direction


def test_remove_shared_centres_and_returns_the_unit_mean():
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(16, generator=g, dtype=torch.float64)
    own = torch.randn(5, 16, generator=g, dtype=torch.float64)
    vectors = 3.0 * shared + own
    centred, direction = remove_shared(vectors)
    unit = vectors / vectors.norm(dim=1, keepdim=True)
    expected_mean = unit.mean(dim=0)
    assert torch.allclose(direction, expected_mean / expected_mean.norm())
    expected = unit - expected_mean
    assert torch.allclose(centred, expected / expected.norm(dim=1, keepdim=True))
    assert torch.allclose(centred.norm(dim=1), torch.ones(5, dtype=torch.float64))
    # What all rows shared is gone: the centred rows' (unnormalised) mean is zero, and the
    # pairwise cosines fall from near 1 to around -1/(n-1).
    before = (unit @ unit.T)[~torch.eye(5, dtype=torch.bool)].mean()
    after = (centred @ centred.T)[~torch.eye(5, dtype=torch.bool)].mean()
    assert before > 0.8 and after < 0.0
    assert centred.dtype == vectors.dtype


def test_remove_shared_refuses_what_it_cannot_centre():
    with pytest.raises(ValueError, match="at least 2"):
        remove_shared(torch.randn(1, 4))
    with pytest.raises(ValueError, match="n_concepts, hidden"):
        remove_shared(torch.randn(4))
    with pytest.raises(ValueError, match="mean is zero"):
        remove_shared(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))


def _direct(x, v):
    proj = x.to(torch.float64) @ v.to(torch.float64).T
    return proj.mean(dim=0), proj.std(dim=0, unbiased=False)


def test_token_moments_match_torch_directly():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 8, generator=g) * 5.0 + 20.0  # a large offset: float64 keeps the variance
    v = torch.randn(3, 8, generator=g)
    m = TokenMoments(8).add(x[:25]).add(x[25:])
    mean, std = m.mean_std(v)
    want_mean, want_std = _direct(x, v)
    assert m.count == 40
    assert torch.allclose(mean, want_mean, atol=1e-9)
    assert torch.allclose(std, want_std, atol=1e-8)
    one_mean, one_std = m.mean_std(v[0])
    assert torch.allclose(one_mean, want_mean[:1]) and torch.allclose(one_std, want_std[:1])


def test_token_moments_merge_and_subtract_equal_recounting():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(30, 6, generator=g), torch.randn(11, 6, generator=g) + 2.0
    v = torch.randn(4, 6, generator=g)
    full = TokenMoments(6).add(a).merge(TokenMoments(6).add(b))
    assert torch.allclose(full.mean_std(v)[1], _direct(torch.cat([a, b]), v)[1], atol=1e-9)
    fold = full.subtract(TokenMoments(6).add(b))
    assert full.count == 41 and fold.count == 30  # subtract leaves the full accumulator whole
    got_mean, got_std = fold.mean_std(v)
    want_mean, want_std = _direct(a, v)
    assert torch.allclose(got_mean, want_mean, atol=1e-9)
    assert torch.allclose(got_std, want_std, atol=1e-9)


def test_token_moments_refuse_mismatches():
    m = TokenMoments(4)
    with pytest.raises(ValueError, match="no tokens"):
        m.mean_std(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"\[tokens, 4\]"):
        m.add(torch.randn(3, 5))
    with pytest.raises(ValueError, match="same hidden size"):
        m.merge(TokenMoments(5))
    m.add(torch.randn(2, 4))
    with pytest.raises(ValueError, match="removing 3 tokens from 2"):
        m.subtract(TokenMoments(4).add(torch.randn(3, 4)))
    with pytest.raises(ValueError, match=r"\[n, 4\]"):
        m.mean_std(torch.randn(2, 3))


def _auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(a positive scores above a negative), counted pair by pair (ties half)."""
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def test_valence_direction_finds_the_separating_axis_where_a_mean_difference_follows_the_variance():
    """Planted: the signs differ by 1 along a quiet axis (noise 0.1) and by 3 along a loud one
    (noise 20). The mean difference points mostly along the loud axis and reads held-out rows
    near chance; the regression finds the quiet axis. Held-out rows come from the same draws."""
    g = torch.Generator().manual_seed(3)
    h, n = 8, 300

    def rows(sign: float) -> torch.Tensor:
        x = 0.1 * torch.randn(n, h, generator=g, dtype=torch.float64)
        x[:, 1] = 20.0 * torch.randn(n, generator=g, dtype=torch.float64)
        x[:, 0] += 0.5 * sign
        x[:, 1] += 1.5 * sign
        return x + 5.0  # an offset every row shares, as a residual stream's mean

    train = torch.cat([rows(1.0), rows(-1.0)])
    test_up, test_down = rows(1.0), rows(-1.0)
    up, down = list(range(n)), list(range(n, 2 * n))
    d = valence_direction(train, up, down)
    assert d.shape == (h,) and d.dtype == torch.float64 and torch.isclose(d.norm(), torch.tensor(1.0, dtype=torch.float64))
    mean_diff = train[:n].mean(0) - train[n:].mean(0)
    assert _auc(test_up @ d, test_down @ d) > 0.99
    assert _auc(test_up @ mean_diff, test_down @ mean_diff) < 0.62  # the loud axis alone: Phi(3 / (20 sqrt 2)) = 0.54
    assert d[0] > 0.9  # the quiet axis, pointing from negative to positive


def test_valence_direction_needs_both_signs():
    with pytest.raises(ValueError, match="both signs"):
        valence_direction(torch.zeros(4, 3), [0, 1], [])
