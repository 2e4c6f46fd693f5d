"""Denoised means: each concept's mean minus the mean of all concepts, with the directions that
neutral text varies along projected out.

Why: a diff-of-means vector carries, besides the feeling, everything its positives share with
*any* story (narrative voice, a person in a scene, paragraph length); those parts are shared by
all concepts, so they crowd every readout toward the same few concepts and hide the valence
axis. Subtracting the grand mean of the concept means removes what all concepts share;
projecting out the top principal components of emotionally flat text removes the directions
that vary most when nothing is felt. The recipe follows a published study of emotion vectors
in language models (concept means over story tokens, grand mean subtracted, neutral components
explaining 50% of the neutral variance projected out).
"""

from __future__ import annotations

import torch

from amygdala import AmygdalaError
from amygdala.methods.diffmean import concept_means

#: The extra a fit reports: how many neutral components were removed at each layer.
COMPONENTS_REMOVED = "denoised_components_removed"


def neutral_components(x: torch.Tensor, variance: float) -> torch.Tensor:
    """[k, hidden] top principal directions of the rows ``x`` that explain ``variance`` of it."""
    centred = x - x.mean(0)
    _, s, vh = torch.linalg.svd(centred.double(), full_matrices=False)
    share = (s**2).cumsum(0) / (s**2).sum().clamp_min(1e-30)
    k = int((share < variance).sum()) + 1
    return vh[: min(k, vh.shape[0])].float()


def denoised(pooled, positives, negatives, layer, *, neutral: torch.Tensor, variance: float = 0.5):
    """Per concept: mean(positives) - mean over concepts of their means, neutral PCs removed."""
    if variance > 1:
        raise AmygdalaError(f"method denoised: variance={variance} is a share of the neutral variance, in (0, 1]",
                            param="method")
    if neutral is None or len(neutral) < 2:
        raise AmygdalaError(
            "--method denoised needs neutral texts (the corpus's neutral/ folder, paired baselines or "
            "direct/_*.txt) to find the directions to remove; add some or use another method")
    means = concept_means(pooled, positives)
    directions = means - means.mean(0)
    basis = neutral_components(pooled[neutral], variance)
    directions = directions - (directions @ basis.T) @ basis
    return directions, {COMPONENTS_REMOVED: torch.full((len(positives),), basis.shape[0])}
