"""The emotion-geometry check: do the concept vectors' main axes mean valence and arousal?

Human ratings place emotions on two main axes, valence (unpleasant .. pleasant) and arousal
(calm .. activated). A published study of emotion vectors in a language model found the first
principal component of its 171 emotion vectors correlating with human valence at r = 0.81 and the
second with arousal at r = 0.66. We compute the same figures for a readout, per layer, against
the valence/arousal the corpus manifest gives each concept, plus how well PC1 alone separates
the concepts of positive clusters from those of negative ones (AUC; a cluster's polarity is its
``polarity`` in the manifest).

A principal component has no sign, so correlations are reported with PC1/PC2 oriented to make
them positive, and the AUC is oriented to be at least 0.5 (0.5 is chance).

Whether valence is the vectors' *main* axis and whether it is *in* them at all are different
questions, so a second figure asks the latter: a ridge regression from the unit vectors to
valence (and to arousal), cross-validated over concepts (10 folds), and the correlation of its
held-out predictions with the ratings.
"""

from __future__ import annotations

import torch

#: The reference figures of the published study, shown beside ours.
PAPER = {"pc1_valence_r": 0.81, "pc2_arousal_r": 0.66}


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = (a.norm() * b.norm()).item()
    return float((a @ b).item() / den) if den > 0 else 0.0


def auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """P(a positive's score > a negative's score), ties counted half."""
    if len(positive) == 0 or len(negative) == 0:
        return float("nan")
    diff = positive.double()[:, None] - negative.double()[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def principal_scores(vectors: torch.Tensor, k: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [n, k], explained variance ratio [k]) of the unit-normalised, centred rows."""
    x = vectors.double()
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    x = x - x.mean(0)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    return (x @ vh[:k].T).float(), (s[:k] ** 2 / (s**2).sum()).float()


def decodable_r(vectors: torch.Tensor, target: torch.Tensor, folds: int = 10) -> float | None:
    """Correlation of cross-validated ridge predictions of ``target`` from the unit rows."""
    import numpy as np
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold, cross_val_predict

    if len(target) < 2 * folds:
        return None
    x = vectors.double()
    x = (x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)).numpy()
    cv = KFold(folds, shuffle=True, random_state=0)
    pred = cross_val_predict(RidgeCV(alphas=np.logspace(-3, 3, 13)), x, target.double().numpy(), cv=cv)
    return pearson(torch.from_numpy(pred), target)


def geometry(
    vectors: torch.Tensor, valence: list[float | None], arousal: list[float | None], polarity: list[str | None],
) -> dict:
    """PC1 vs valence, PC2 vs arousal, PC1's positive/negative-cluster AUC for one layer.

    ``valence`` / ``arousal`` per concept (None where unknown: left out of the correlations);
    ``polarity`` per concept: its cluster's "positive" / "negative" (or None).
    """
    scores, ratio = principal_scores(vectors)
    known = [i for i, (v, a) in enumerate(zip(valence, arousal)) if v is not None and a is not None]
    idx = torch.tensor(known, dtype=torch.long)
    val = torch.tensor([valence[i] for i in known])
    aro = torch.tensor([arousal[i] for i in known])
    r = {
        "pc1_valence_r": pearson(scores[idx, 0], val),
        "pc2_arousal_r": pearson(scores[idx, 1], aro),
        "pc1_arousal_r": pearson(scores[idx, 0], aro),
        "pc2_valence_r": pearson(scores[idx, 1], val),
    }
    pos = torch.tensor([i for i, p in enumerate(polarity) if p == "positive"], dtype=torch.long)
    neg = torch.tensor([i for i, p in enumerate(polarity) if p == "negative"], dtype=torch.long)
    a = auc(scores[pos, 0], scores[neg, 0])
    sign1 = 1.0 if r["pc1_valence_r"] >= 0 else -1.0
    sign2 = 1.0 if r["pc2_arousal_r"] >= 0 else -1.0
    return {
        "n_concepts": len(polarity),
        "n_rated": len(known),
        "explained_variance": [float(x) for x in ratio],
        "pc1_valence_r": abs(r["pc1_valence_r"]),
        "pc2_arousal_r": abs(r["pc2_arousal_r"]),
        "pc1_arousal_r": sign1 * r["pc1_arousal_r"],
        "pc2_valence_r": sign2 * r["pc2_valence_r"],
        "pc1_polarity_auc": max(a, 1 - a) if a == a else None,
        "decodable_valence_r": decodable_r(vectors[idx], val),
        "decodable_arousal_r": decodable_r(vectors[idx], aro),
        "n_positive": int(len(pos)),
        "n_negative": int(len(neg)),
        # Oriented so that PC1 grows with valence and PC2 with arousal: the scatter plot's axes.
        "map": [[sign1 * float(p1), sign2 * float(p2)] for p1, p2 in scores.tolist()],
        "paper": dict(PAPER),
    }
