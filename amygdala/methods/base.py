"""The method registry and what every method shares: concept sets, parameters, normalisation."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from amygdala import AmygdalaError
from amygdala.activations import Activations
from amygdala.corpus import Corpus
from amygdala.methods.aggregators import linear, logistic, logistic_l1, mean, pca
from amygdala.methods.denoised import denoised
from amygdala.methods.diffmean import diffmean_layer
from amygdala.methods.subspace import TokenSubspaces, subspace


@dataclass(frozen=True)
class ConceptSets:
    """Per concept (manifest order): row indices of its positive and negative texts; and the rows
    of the neutral texts (no concept's positives), which ``denoised`` removes directions of."""

    concepts: list[str]
    positives: list[torch.Tensor]
    negatives: list[torch.Tensor]
    neutral: torch.Tensor | None = None


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
    neutral = sorted(set(acts.rows([t.text for t in corpus.neutral_texts()])))
    return ConceptSets(list(corpus.concepts), pos, neg, torch.tensor(neutral, dtype=torch.long))


def unit(v: torch.Tensor, what: str = "vector") -> torch.Tensor:
    """Rows scaled to unit norm; a zero row warns (its concept is indistinguishable) and stays 0."""
    norms = v.norm(dim=-1, keepdim=True)
    if (norms == 0).any():
        warnings.warn(f"a {what} is all zeros: positives and negatives are indistinguishable", stacklevel=2)
    return v / norms.clamp_min(1e-12)


#: A pooled method: (positives' rows [n_pos, hidden], negatives' rows [n_neg, hidden], **params) -> [hidden].
PooledMethod = Callable[..., torch.Tensor]

#: One layer of a method: (pooled [n_texts, hidden], positives, negatives, layer, **params)
#: -> (directions [n_concepts, hidden], extras {name: [n_concepts, ...]}), directions not normalised.
LayerFit = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


def per_concept(fn: PooledMethod) -> LayerFit:
    """A layer fit that runs a pooled method once per concept on its rows."""

    def fit(pooled, positives, negatives, layer, **params):
        return torch.stack([fn(pooled[p], pooled[n], **params) for p, n in zip(positives, negatives)]), {}

    return fit


@dataclass(frozen=True)
class Method:
    """A ``--method``: how it fits a layer, the parameters a user may set, what input it needs.

    Every parameter is a positive number of the declared type (``--method-param NAME=VALUE``),
    at most its ``maxima`` entry where it has one.
    ``needs_tokens`` methods read per-token bases (:class:`TokenSubspaces`) as well as pooled rows;
    ``needs_neutral`` methods read the neutral texts' rows.
    """

    fit: LayerFit
    params: dict[str, type] = field(default_factory=dict)
    needs_tokens: bool = False
    needs_neutral: bool = False
    maxima: dict[str, float] = field(default_factory=dict)


_LOGISTIC = {"C": float, "max_iter": int}

METHODS: dict[str, Method] = {
    "diffmean": Method(diffmean_layer),
    "mean": Method(per_concept(mean)),
    "pca": Method(per_concept(pca)),
    "logistic": Method(per_concept(logistic), _LOGISTIC),
    "logistic_l1": Method(per_concept(logistic_l1), _LOGISTIC),
    "linear": Method(per_concept(linear)),
    "subspace": Method(subspace, {"eigen_k": int}, needs_tokens=True),
    "denoised": Method(denoised, {"variance": float}, needs_neutral=True, maxima={"variance": 1.0}),
}


def check_params(method: str, params: dict) -> dict:
    """``params`` converted to the method's declared types; AmygdalaError naming a bad one.

    Values may be strings (from the command line). Runs before any model loads.
    """
    if method not in METHODS:
        raise AmygdalaError(f"method {method!r}; choose one of {', '.join(METHODS)}", param="method")
    known = METHODS[method].params
    out = {}
    for name, value in params.items():
        if name not in known:
            accepted = ", ".join(known) or "none"
            raise AmygdalaError(f"method_params {name}: {method} does not take it (accepts: {accepted})", param="method_params")
        kind = known[name]
        try:
            converted = kind(value)
            if kind is int and converted != float(value):
                raise ValueError
        except (TypeError, ValueError):
            converted = None
        if converted is None or converted <= 0:
            raise AmygdalaError(f"method {method}: parameter {name}={value!r} must be a positive {kind.__name__}",
                                param="method")
        top = METHODS[method].maxima.get(name)
        if top is not None and converted > top:
            raise AmygdalaError(f"method {method}: parameter {name}={value!r} must be at most {top:g}", param="method")
        out[name] = converted
    return out


@dataclass
class Fit:
    """What a method produced: ``vectors[layer]`` [n_concepts, hidden] unit rows, and extras
    (per name, per layer) such as ``subspace_eigenvalues`` for the quality report."""

    vectors: dict[int, torch.Tensor]
    extras: dict[str, dict[int, torch.Tensor]]


def fit(
    method: str, acts: Activations, sets: ConceptSets, *, tokens: TokenSubspaces | None = None, **params
) -> Fit:
    """Fit ``method`` at every layer of ``acts``. ``tokens`` is passed to methods that need it."""
    params = check_params(method, params)  # also the one check of the method's name
    spec = METHODS[method]
    if spec.needs_tokens:
        params["tokens"] = tokens
    if spec.needs_neutral:
        params["neutral"] = sets.neutral
    vectors: dict[int, torch.Tensor] = {}
    extras: dict[str, dict[int, torch.Tensor]] = {}
    for layer in acts.layers:
        raw, more = spec.fit(acts.pooled[layer], sets.positives, sets.negatives, layer, **params)
        vectors[layer] = unit(raw.float(), f"{method} vector")
        for name, value in more.items():
            extras.setdefault(name, {})[layer] = value
    return Fit(vectors, extras)


def compute_vectors(
    method: str, acts: Activations, sets: ConceptSets, **params
) -> dict[int, torch.Tensor]:
    """``{layer: [n_concepts, hidden]}`` unit vectors by ``method`` (see :func:`fit`)."""
    return fit(method, acts, sets, **params).vectors
