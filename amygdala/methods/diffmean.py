"""Diff-of-means: mean of the positives minus mean of the negatives.

The baseline every other method is measured against. It is unbiased and cheap, and it latches
onto whatever the positives share (stories all set in one scene teach the scene): the corpus,
not the method, has to hold setting fixed. With one negative set per concept it is also what
steering-vectors calls ``mean``.

All concepts are fitted at once, as two matrix products with 0/1 membership matrices: gathering
each concept's thousands of negative rows one concept at a time costs a copy of most of the
activations per concept, which dominated held-out evaluation (a refit per fold).
"""

from __future__ import annotations

import torch


def diffmean(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """[hidden] direction from the negatives' mean to the positives' mean (not normalised)."""
    return pos.mean(0) - neg.mean(0)


def membership(rows: list[torch.Tensor], n: int) -> torch.Tensor:
    """[len(rows), n] with 1 / len(rows[i]) at row i's members: multiplied by the activations,
    each concept's mean row."""
    m = torch.zeros(len(rows), n)
    for i, r in enumerate(rows):
        if len(r):
            m[i, r] = 1.0 / len(r)
    return m


def concept_means(pooled: torch.Tensor, rows: list[torch.Tensor]) -> torch.Tensor:
    """[n_concepts, hidden]: the mean of each concept's ``rows`` of ``pooled``."""
    return membership(rows, pooled.shape[0]).to(pooled) @ pooled


def diffmean_layer(pooled, positives, negatives, layer):
    """Every concept's diff-of-means at one layer (see :func:`diffmean`)."""
    return concept_means(pooled, positives) - concept_means(pooled, negatives), {}
