"""Diff-of-means: mean of the positives minus mean of the negatives.

The baseline every other method is measured against. It is unbiased and cheap, and it latches
onto whatever the positives share (stories all set in one scene teach the scene): the corpus, not the method, has to hold setting
fixed. With one negative set per concept it is also what steering-vectors calls ``mean``.
"""

from __future__ import annotations

import torch


def diffmean(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """[hidden] direction from the negatives' mean to the positives' mean (not normalised)."""
    return pos.mean(0) - neg.mean(0)
