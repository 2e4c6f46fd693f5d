"""The method registry and what every method shares: concept sets, parameters, normalisation."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from amygdala import AmygdalaError
from amygdala.activations import Activations
from amygdala.corpus import Corpus
from amygdala.methods.aggregators import linear, logistic, logistic_l1, mean, pca, pca_diff
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
    #: Per concept, its contrastive pairs' (positive rows, negative rows), aligned, where the
    #: corpus has pairs (``Corpus.from_pairs``); None elsewhere: the pair-based methods cycle then.
    pairs: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None


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
    pairs = None
    if corpus.pairs:
        def aligned(items):
            return tuple(torch.tensor(acts.rows(list(side)), dtype=torch.long) for side in zip(*items))
        pairs = [aligned(corpus.pairs[c]) if c in corpus.pairs else None for c in corpus.concepts]
    return ConceptSets(list(corpus.concepts), pos, neg, torch.tensor(neutral, dtype=torch.long), pairs)


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
    """A layer fit that runs a pooled method once per concept on its rows: a concept's own
    contrastive pairs as given where it has them (``pairs``), else its positive and negative sets."""

    def fit(pooled, positives, negatives, layer, pairs=None, **params):
        rows = [(p, n) if pairs is None or pairs[i] is None else pairs[i]
                for i, (p, n) in enumerate(zip(positives, negatives))]
        return torch.stack([fn(pooled[p], pooled[n], **params) for p, n in rows]), {}

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
    #: Pair-based (per_concept): takes a concept's own pairs (``ConceptSets.pairs``) as given.
    pairwise: bool = False
    #: Only for real contrastive pairs (``Corpus.from_pairs``): ``pca_diff`` centres the pair
    #: differences, which on a folder corpus's cycled pseudo-pairs removes the concept's own shift.
    needs_pairs: bool = False
    #: Fewest concepts the method can tell apart (denoised subtracts the mean over concepts).
    min_concepts: int = 1


_LOGISTIC = {"C": float, "max_iter": int}

METHODS: dict[str, Method] = {
    "diffmean": Method(diffmean_layer),
    "mean": Method(per_concept(mean), pairwise=True),
    "pca": Method(per_concept(pca), pairwise=True),
    "pca_diff": Method(per_concept(pca_diff), pairwise=True, needs_pairs=True),
    "logistic": Method(per_concept(logistic), _LOGISTIC, pairwise=True),
    "logistic_l1": Method(per_concept(logistic_l1), _LOGISTIC, pairwise=True),
    "linear": Method(per_concept(linear), pairwise=True),
    "subspace": Method(subspace, {"eigen_k": int}, needs_tokens=True),
    "denoised": Method(denoised, {"variance": float}, needs_neutral=True, maxima={"variance": 1.0}, min_concepts=2),
}


def check_corpus_fits(method: str, corpus: Corpus) -> None:
    """Raise (before any model loads) when ``method`` cannot work on ``corpus``'s shape: too few
    concepts, or no neutral texts for a method that needs them."""
    spec = METHODS[method]
    if len(corpus.concepts) < spec.min_concepts:
        raise AmygdalaError(
            f"--method {method} needs at least {spec.min_concepts} concepts (it removes what concepts share; with "
            f"{len(corpus.concepts)} nothing is left); use diffmean, pca_diff or mean for one concept")
    unpaired = [c for c in corpus.concepts if c not in corpus.pairs]
    if spec.needs_pairs and unpaired:
        raise AmygdalaError(
            f"--method {method} needs contrastive pairs for every concept ({', '.join(unpaired[:5])} has none): "
            "build --pairs FILE.jsonl or Corpus.from_pairs; on a corpus folder use pca or diffmean")
    if spec.needs_neutral and len({t.text for t in corpus.neutral_texts()}) < 2:
        raise AmygdalaError(
            f"--method {method} needs at least 2 neutral texts (a corpus's neutral/ folder, paired baselines, "
            "direct/_*.txt, or from_pairs/from_texts neutral=[...]); add some or use another method")


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
    if spec.pairwise and sets.pairs is not None:
        params["pairs"] = sets.pairs
    if spec.needs_pairs and (sets.pairs is None or any(p is None for p in sets.pairs)):
        raise AmygdalaError(f"--method {method} needs contrastive pairs for every concept (Corpus.from_pairs)")
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
