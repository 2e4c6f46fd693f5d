"""Leave-one-story-out accuracy: do the vectors recognise a story they were not trained on?

Fold k holds out the k-th scene text (story or paired framing) of every concept at once and
removes it from every positive and negative set; vectors are refit on the rest from the same
pooled activations (no forward runs again), and each held-out text is scored against every
concept. A text is held out exactly once, so a corpus with 3-5 texts per concept needs only 3-5
refits per method instead of one per text.

Scores are standardised per concept and layer by the projections of the fold's training texts
(removing each concept's offset, which otherwise decides the argmax) and averaged over layers.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from amygdala.activations import Activations
from amygdala.corpus import Corpus
from amygdala.corpus.loader import PAIRED, STORY
from amygdala.methods import ConceptSets, compute_vectors


@dataclass
class HeldOutResult:
    """Accuracy over held-out texts; ``ranks[concept]`` lists each held-out text's rank (0 = top)."""

    n: int
    top1: float
    top5: float
    cluster_top1: float
    confused: list[tuple[str, str, int]]
    ranks: dict[str, list[int]] = field(default_factory=dict)

    def summary(self) -> str:
        pairs = ", ".join(f"{a}->{b} ({n})" for a, b, n in self.confused)
        return (f"{self.n} held-out texts: top-1 {self.top1:.1%}, top-5 {self.top5:.1%}, "
                f"cluster top-1 {self.cluster_top1:.1%}; most confused: {pairs}")


def folds(corpus: Corpus) -> list[dict[str, str]]:
    """Fold k: {concept: text} of each concept's k-th scene text, for concepts with > 1 of them."""
    scene = {c: [t.text for t in corpus.positives(c) if t.kind in (STORY, PAIRED)] for c in corpus.concepts}
    depth = max((len(v) for v in scene.values()), default=0)
    return [
        {c: texts[k] for c, texts in scene.items() if len(texts) > 1 and k < len(texts)}
        for k in range(depth)
    ]


def leave_one_story_out(
    corpus: Corpus, acts: Activations, method: str = "diffmean", top_confused: int = 5, **params
) -> HeldOutResult:
    """Held-out accuracy of ``method`` on ``corpus`` from already collected pooled activations."""
    concepts = corpus.concepts
    index = {c: i for i, c in enumerate(concepts)}
    clusters = [corpus.concept_cluster[c] for c in concepts]
    pos_all = [set(acts.rows([t.text for t in corpus.positives(c)])) for c in concepts]
    every = set(range(len(acts.texts)))
    neutral = torch.tensor(sorted(set(acts.rows([t.text for t in corpus.neutral_texts()]))), dtype=torch.long)
    ranks: dict[str, list[int]] = {c: [] for c in concepts}
    confused: Counter[tuple[str, str]] = Counter()
    hit1 = hit5 = cluster_hit = n = 0
    for fold in folds(corpus):
        held = {acts.row[t]: c for c, t in fold.items()}
        train_rows = every - set(held)
        sets = ConceptSets(
            list(concepts),
            [torch.tensor(sorted(p - set(held))) for p in pos_all],
            [torch.tensor(sorted(train_rows - p)) for p in pos_all],
            neutral,
        )
        vectors = compute_vectors(method, acts, sets, **params)
        train_idx = torch.tensor(sorted(train_rows))
        held_idx = torch.tensor(list(held))
        z = 0
        for layer, v in vectors.items():
            x = acts.pooled[layer]
            ref = x[train_idx] @ v.T
            z = z + ((x[held_idx] @ v.T) - ref.mean(0)) / ref.std(0).clamp_min(1e-6)
        for row, scores in zip(held, z):
            true = index[held[row]]
            rank = int((scores > scores[true]).sum())
            pred = int(scores.argmax())
            ranks[held[row]].append(rank)
            n += 1
            hit1 += rank == 0
            hit5 += rank < 5
            cluster_hit += clusters[pred] == clusters[true]
            if pred != true:
                confused[(held[row], concepts[pred])] += 1
    if n == 0:
        raise ValueError("no concept has two or more scene texts: nothing to hold out")
    return HeldOutResult(
        n=n,
        top1=hit1 / n,
        top5=hit5 / n,
        cluster_top1=cluster_hit / n,
        confused=[(a, b, k) for (a, b), k in confused.most_common(top_confused)],
        ranks={c: r for c, r in ranks.items() if r},
    )
