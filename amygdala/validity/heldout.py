"""Held-out accuracy: do the vectors recognise a text they were not built from?

Fold k holds out the k-th scene text (story or paired framing) of every concept at once and
removes it from every positive and negative set; vectors are refit on the rest from the same
pooled activations (no forward runs again), and each held-out text is scored against every
concept. Every scene text is held out exactly once, so a corpus with ten texts per concept
needs ten refits per method instead of one per text.

Scores are standardised per concept and layer by the projections of the fold's training texts
(removing each concept's offset, which otherwise decides the argmax). Each layer is scored on
its own, and ``"all"`` averages the standardised scores over the layers.
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
    """Accuracy over held-out texts, with the chance level of each figure; ``ranks[concept]``
    lists each held-out text's rank (0 = top)."""

    n: int
    top1: float
    top5: float
    cluster_top1: float
    chance_top1: float
    chance_top5: float
    chance_cluster_top1: float
    confused: list[tuple[str, str, int]]
    ranks: dict[str, list[int]] = field(default_factory=dict)

    def summary(self) -> str:
        pairs = ", ".join(f"{a}->{b} ({n})" for a, b, n in self.confused)
        return (f"{self.n} held-out texts: top-1 {self.top1:.1%} (chance {self.chance_top1:.1%}), "
                f"top-5 {self.top5:.1%} ({self.chance_top5:.1%}), cluster top-1 {self.cluster_top1:.1%} "
                f"({self.chance_cluster_top1:.1%}); most confused: {pairs}")

    def to_json(self) -> dict:
        return {"n": self.n, "concept_top1": self.top1, "concept_top5": self.top5, "cluster_top1": self.cluster_top1,
                "chance": {"concept_top1": self.chance_top1, "concept_top5": self.chance_top5,
                           "cluster_top1": self.chance_cluster_top1},
                "confused": [[a, b, k] for a, b, k in self.confused]}


def folds(corpus: Corpus, limit: int | None = None) -> list[dict[str, str]]:
    """Fold k: {concept: text} of each concept's k-th scene text, for concepts with > 1 of them.
    ``limit`` keeps the first folds only (for methods whose refit is slow)."""
    scene = {c: [t.text for t in corpus.positives(c) if t.kind in (STORY, PAIRED)] for c in corpus.concepts}
    depth = max((len(v) for v in scene.values()), default=0)
    out = [
        {c: texts[k] for c, texts in scene.items() if len(texts) > 1 and k < len(texts)}
        for k in range(depth)
    ]
    return out[:limit] if limit is not None else out


class _Tally:
    """Hits and confusions of one scoring (a layer, or all layers together)."""

    def __init__(self, concepts: list[str], clusters: list[str]):
        self.concepts, self.clusters = concepts, clusters
        self.size = Counter(clusters)
        self.ranks: dict[str, list[int]] = {c: [] for c in concepts}
        self.confused: Counter[tuple[str, str]] = Counter()
        self.n = self.hit1 = self.hit5 = self.cluster_hit = 0
        self.cluster_chance = 0.0

    def add(self, true: int, scores: torch.Tensor) -> None:
        rank = int((scores > scores[true]).sum())
        pred = int(scores.argmax())
        self.ranks[self.concepts[true]].append(rank)
        self.n += 1
        self.hit1 += rank == 0
        self.hit5 += rank < 5
        self.cluster_hit += self.clusters[pred] == self.clusters[true]
        self.cluster_chance += self.size[self.clusters[true]] / len(self.concepts)
        if pred != true:
            self.confused[(self.concepts[true], self.concepts[pred])] += 1

    def result(self, top_confused: int) -> HeldOutResult:
        if self.n == 0:
            raise ValueError("no concept has two or more scene texts: nothing to hold out")
        c = len(self.concepts)
        return HeldOutResult(
            n=self.n, top1=self.hit1 / self.n, top5=self.hit5 / self.n, cluster_top1=self.cluster_hit / self.n,
            chance_top1=1 / c, chance_top5=min(5, c) / c, chance_cluster_top1=self.cluster_chance / self.n,
            confused=[(a, b, k) for (a, b), k in self.confused.most_common(top_confused)],
            ranks={k: r for k, r in self.ranks.items() if r},
        )


def held_out(
    corpus: Corpus, acts: Activations, method: str = "diffmean", *, top_confused: int = 5,
    max_folds: int | None = None, **params,
) -> dict[int | str, HeldOutResult]:
    """Held-out accuracy of ``method`` per layer of ``acts`` and over all layers (key ``"all"``),
    from already collected pooled activations."""
    concepts = list(corpus.concepts)
    index = {c: i for i, c in enumerate(concepts)}
    clusters = corpus.cluster_of()
    pos_all = [set(acts.rows([t.text for t in corpus.positives(c)])) for c in concepts]
    neutral = torch.tensor(sorted(set(acts.rows([t.text for t in corpus.neutral_texts()]))), dtype=torch.long)
    every = set(acts.rows(corpus.text_list()))  # acts may hold more texts than this corpus
    tallies: dict[int | str, _Tally] = {l: _Tally(concepts, clusters) for l in acts.layers}
    tallies["all"] = _Tally(concepts, clusters)
    for fold in folds(corpus, max_folds):
        held = {acts.row[t]: c for c, t in fold.items()}
        train_rows = every - set(held)
        sets = ConceptSets(
            concepts,
            [torch.tensor(sorted(p - set(held))) for p in pos_all],
            [torch.tensor(sorted(train_rows - p)) for p in pos_all],
            neutral,
        )
        vectors = compute_vectors(method, acts, sets, **params)
        train_idx = torch.tensor(sorted(train_rows))
        held_idx = torch.tensor(list(held))
        total = 0
        for layer, v in vectors.items():
            x = acts.pooled[layer]
            ref = x[train_idx] @ v.T
            z = ((x[held_idx] @ v.T) - ref.mean(0)) / ref.std(0).clamp_min(1e-6)
            total = total + z
            for row, scores in zip(held, z):
                tallies[layer].add(index[held[row]], scores)
        for row, scores in zip(held, total):
            tallies["all"].add(index[held[row]], scores)
    return {k: t.result(top_confused) for k, t in tallies.items()}


def leave_one_story_out(
    corpus: Corpus, acts: Activations, method: str = "diffmean", top_confused: int = 5, **params
) -> HeldOutResult:
    """Held-out accuracy over all layers together (see :func:`held_out`)."""
    return held_out(corpus, acts, method, top_confused=top_confused, **params)["all"]
