"""Turning activations into one unit vector per (layer, concept), sign toward the positives.

Every method sees the same inputs: the pooled activations of the unique texts at one layer and,
per concept, the rows of its positives and negatives; ``subspace`` also reads each text's
per-token rowspace (:class:`TokenSubspaces`, filled through ``collect(on_tokens=...)``).
``METHODS`` maps ``--method`` names to them; docs/methods.md says why each exists.
"""

from amygdala.methods.base import (
    METHODS,
    ConceptSets,
    Fit,
    Method,
    check_corpus_fits,
    check_params,
    compute_vectors,
    concept_sets,
    fit,
    unit,
)
from amygdala.methods.subspace import EIGENVALUES_KEPT, TokenSubspaces

__all__ = [
    "EIGENVALUES_KEPT", "METHODS", "ConceptSets", "Fit", "Method", "TokenSubspaces", "check_corpus_fits", "check_params",
    "compute_vectors", "concept_sets", "fit", "unit",
]
