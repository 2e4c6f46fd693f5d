"""How a readout's concept vectors and their statistics are made from what a build saw.

No model: the pipeline (build), the validity eval (per-fold refits) and the tests all use the same
three pieces.

- `remove_shared`: diffmean's negatives for a concept are "every other text", most of them neutral
  prose, so every concept vector carries one shared "emotional story vs neutral text" direction (on
  the default model the 12 demo vectors have mean pairwise cosine 0.72 and the first uncentred
  singular vector holds 75% of their energy). Read per token, any emotional token then lifts every
  concept together and the concepts with the smallest std win everywhere. Subtracting the mean of the
  concept vectors (the grand mean of Anthropic's recipe and of vllm-lens's tracker) leaves what tells
  one feeling from another; the removed mean is kept as its own direction, "emotionality".
- `TokenMoments`: count, sum and sum of outer products of token activations, so that the mean and std
  of ANY direction over those tokens follow in closed form (mean = v.mu, var = v^T S v / n - (v.mu)^2)
  without keeping the tokens, and an eval fold can take held-out stories' tokens out by subtraction
  instead of running the model again.
- `valence_direction`: the valence track, a logistic regression of positive- against negative-valence
  concepts' pooled texts. The difference of the two means (what this track was first) reads held-out
  stories' valence at AUC 0.70 on the default model: the largest variance among emotional texts is not
  valence, and a mean difference follows it. The regression, on features standardised over the same
  rows, weighs directions by how well they separate the two signs: AUC 0.86 (docs/validity.md).
"""

from __future__ import annotations

import torch

# Below this norm the shared direction is numerically zero (concept vectors that already cancel);
# returning a normalised noise vector would make a meaningless emotionality track.
_TINY_NORM = 1e-12

#: The valence regression's inverse L2 strength, on standardised features. Chosen by held-out AUC of
#: the story's valence over the default model's folds (0.84 at 1e-3, 0.851 at 3e-3, 0.856 at 1e-2,
#: 0.855 at 3e-2, 0.831 at 1): a plateau, so the choice is not fitted to one fold's noise.
VALENCE_C = 0.01


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    norms = x.norm(dim=-1, keepdim=True)
    return x / norms.clamp_min(_TINY_NORM)


def remove_shared(vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (concept vectors minus their mean, renormalised to unit rows; the mean as a unit vector).

    `vectors` is [n_concepts, hidden] for one layer. Rows are unit-normalised before the mean is taken
    so that a concept with a larger raw norm does not dominate the shared direction. The second value
    is the "emotionality" direction: what all concepts have in common (see the module docstring).
    Needs at least two concepts: with one, removing the mean leaves nothing.
    """
    if vectors.dim() != 2:
        raise ValueError(f"remove_shared: vectors must be [n_concepts, hidden], got shape {tuple(vectors.shape)}")
    if vectors.shape[0] < 2:
        raise ValueError("remove_shared: needs at least 2 concept vectors (with one, removing their mean leaves nothing)")
    work = _unit_rows(vectors.to(torch.float64))
    shared = work.mean(dim=0)
    if float(shared.norm()) < _TINY_NORM:
        raise ValueError("remove_shared: the concept vectors' mean is zero; there is no shared direction to remove")
    centred = _unit_rows(work - shared)
    return centred.to(vectors.dtype), (shared / shared.norm()).to(vectors.dtype)


class TokenMoments:
    """First and second moments of token activations for one layer, in float64.

    `count` tokens, `total` = sum of x [h], `outer` = sum of x x^T [h, h]. Float64 because the variance
    is a difference of two large terms (v^T S v / n and (v.mu)^2) and float32 loses it on activations
    with a large mean (the attention-sink-like offsets of small models).
    """

    def __init__(self, hidden: int):
        if hidden <= 0:
            raise ValueError(f"TokenMoments: hidden must be positive, got {hidden}")
        self.hidden = int(hidden)
        self.count = 0
        self.total = torch.zeros(self.hidden, dtype=torch.float64)
        self.outer = torch.zeros(self.hidden, self.hidden, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> TokenMoments:
        """Accumulate the tokens `x` [tokens, hidden] (a 1-D x is one token). Returns self."""
        if x.dim() == 1:
            x = x.unsqueeze(0)
        if x.dim() != 2 or x.shape[1] != self.hidden:
            raise ValueError(f"TokenMoments.add: expected [tokens, {self.hidden}], got shape {tuple(x.shape)}")
        x = x.detach().to(device="cpu", dtype=torch.float64)
        self.count += int(x.shape[0])
        self.total += x.sum(dim=0)
        self.outer += x.T @ x
        return self

    def _check_same(self, other: TokenMoments, what: str) -> None:
        if not isinstance(other, TokenMoments) or other.hidden != self.hidden:
            raise ValueError(f"TokenMoments.{what}: needs TokenMoments of the same hidden size {self.hidden}")

    def merge(self, other: TokenMoments) -> TokenMoments:
        """Add another accumulator's tokens into this one. Returns self."""
        self._check_same(other, "merge")
        self.count += other.count
        self.total += other.total
        self.outer += other.outer
        return self

    def subtract(self, other: TokenMoments) -> TokenMoments:
        """Take out tokens that were added before (e.g. a held-out fold's stories). Returns a new one.

        A new object, not in place: the full accumulator is reused for every fold.
        """
        self._check_same(other, "subtract")
        if other.count > self.count:
            raise ValueError(f"TokenMoments.subtract: removing {other.count} tokens from {self.count}")
        out = self.copy()
        out.count -= other.count
        out.total -= other.total
        out.outer -= other.outer
        return out

    def copy(self) -> TokenMoments:
        out = TokenMoments(self.hidden)
        out.count = self.count
        out.total = self.total.clone()
        out.outer = self.outer.clone()
        return out

    def mean_std(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and (population) std of each direction's projection over the accumulated tokens.

        `vectors` is [n, hidden] (a 1-D vector is one direction); returns (mean[n], std[n]) in float64.
        Closed form: mean = v.mu, var = v^T S v / count - (v.mu)^2, clamped at 0 against rounding.
        """
        if self.count == 0:
            raise ValueError("TokenMoments.mean_std: no tokens accumulated")
        v = vectors.detach().to(device="cpu", dtype=torch.float64)
        if v.dim() == 1:
            v = v.unsqueeze(0)
        if v.dim() != 2 or v.shape[1] != self.hidden:
            raise ValueError(f"TokenMoments.mean_std: expected [n, {self.hidden}], got shape {tuple(v.shape)}")
        mu = self.total / self.count
        mean = v @ mu
        second = ((v @ self.outer) * v).sum(dim=1) / self.count
        var = (second - mean * mean).clamp_min(0.0)
        return mean, var.sqrt()


def valence_direction(pooled: torch.Tensor, up: list[int], down: list[int], C: float = VALENCE_C) -> torch.Tensor:
    """The unit valence direction at one layer: positive-valence texts' rows ``up`` against
    negative-valence ones' ``down`` (row indices into ``pooled`` [n_texts, hidden]).

    An L2 logistic regression on the rows standardised per feature (so its penalty does not
    favour the few high-variance features of a residual stream), classes weighted equally (the
    corpus has more negative concepts than positive ones); the coefficients are mapped back to the
    raw activations and normalised, so the direction reads raw activations like every other.
    """
    if not up or not down:
        raise ValueError("valence_direction: needs rows of both signs")
    from sklearn.linear_model import LogisticRegression  # only a build and the eval fit one; loading a readout does not

    x = pooled[list(up) + list(down)].to(torch.float64)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
    labels = [1] * len(up) + [0] * len(down)
    model = LogisticRegression(C=C, class_weight="balanced", max_iter=2000).fit(((x - mean) / std).numpy(), labels)
    w = torch.from_numpy(model.coef_[0]) / std
    return (w / w.norm().clamp_min(_TINY_NORM)).to(pooled.dtype)
