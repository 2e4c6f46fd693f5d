"""Turning activations into one unit vector per (layer, concept), sign toward the positives.

Every method sees the same inputs: the pooled activations of the unique texts at one layer and,
per concept, the rows of its positives and negatives. ``METHODS`` maps ``--method`` names to them.
"""

from amygdala.methods.base import METHODS, ConceptSets, compute_vectors, concept_sets, unit

__all__ = ["METHODS", "ConceptSets", "compute_vectors", "concept_sets", "unit"]
