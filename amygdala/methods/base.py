"""The method registry and what every method shares: concept sets, normalisation."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from amygdala.activations import Activations
from amygdala.corpus import Corpus
from amygdala.methods.diffmean import diffmean


@dataclass(frozen=True)
class ConceptSets:
    """Per concept (manifest order): row indices of its positive and negative texts."""

    concepts: list[str]
    positives: list[torch.Tensor]
    negatives: list[torch.Tensor]


def concept_sets(corpus: Corpus, acts: Activations) -> ConceptSets:
    """Rows of each concept's positives and negatives in ``acts``.

    A text that is a positive is never also a negative of the same concept, even when the same
    words appear in another file.
    """
    pos, neg = [], []
    for c in corpus.concepts:
        p = sorted(set(acts.rows([t.text for t in corpus.positives(c)])))
        n = sorted(set(acts.rows([t.text for t in corpus.negatives(c)])) - set(p))
        pos.append(torch.tensor(p, dtype=torch.long))
        neg.append(torch.tensor(n, dtype=torch.long))
    return ConceptSets(list(corpus.concepts), pos, neg)


def unit(v: torch.Tensor, what: str = "vector") -> torch.Tensor:
    """Rows scaled to unit norm; a zero row warns (its concept is indistinguishable) and stays 0."""
    norms = v.norm(dim=-1, keepdim=True)
    if (norms == 0).any():
        warnings.warn(f"a {what} is all zeros: positives and negatives are indistinguishable", stacklevel=2)
    return v / norms.clamp_min(1e-12)


#: A pooled method: (pooled [n_texts, hidden], positives, negatives, params) -> [hidden].
PooledMethod = Callable[..., torch.Tensor]

METHODS: dict[str, PooledMethod] = {"diffmean": diffmean}


def compute_vectors(
    method: str, acts: Activations, sets: ConceptSets, **params
) -> dict[int, torch.Tensor]:
    """``{layer: [n_concepts, hidden]}`` unit vectors by ``method``."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    fn = METHODS[method]
    out = {}
    for layer in acts.layers:
        x = acts.pooled[layer]
        rows = [fn(x[p], x[n], **params) for p, n in zip(sets.positives, sets.negatives)]
        out[layer] = unit(torch.stack(rows), f"{method} vector")
    return out
