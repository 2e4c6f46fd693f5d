"""Neutral texts that read as emotional under the corpus's own vectors.

The neutral set anchors the readout's z-scores and the directions ``denoised`` removes, so a
"neutral" text that carries a feeling skews both. A neutral text is flagged for a concept when
its score for that concept (the mean z over its tokens, averaged over the readout's layers)
reaches the median score of that concept's own positive texts: it reads as emotional as a
typical story of that concept. The mean z over tokens is the projection of the mean-pooled row,
so one mean-pooled forward gives every text's score.
"""

from __future__ import annotations

import torch

from amygdala.activations import Activations
from amygdala.corpus import Corpus
from amygdala.corpus.loader import NEUTRAL
from amygdala.models import load_model
from amygdala.pipeline import collect_corpus, corpus_for, matching_model
from amygdala.readout import Readout


def check_neutral(readout: Readout, corpus: Corpus, model: str | None = "default", device: str | None = None,
                  progress: bool = True, dtype: str | None = None) -> list[dict]:
    """The mean-pooled forward over ``corpus`` (reduced to the readout's concepts) with the model
    the readout was built for, then :func:`emotional_neutral_texts`: what ``amygdala corpus check
    --readout`` reports.

    Args:
        readout: the readout whose vectors score the texts.
        corpus: the corpus whose neutral texts are checked.
        model: model folder or ``"default"``; checked against the readout before it loads.
        device: torch device, ``None`` for cuda when available.
        progress: show a progress bar.

    Returns:
        :func:`emotional_neutral_texts`'s rows, largest margin first.
    """
    corpus = corpus_for(readout, corpus)
    info = matching_model(readout, model)
    loaded, tokenizer, _ = load_model(info.path, device, dtype)
    acts, _ = collect_corpus(corpus, loaded, tokenizer, readout.layers, pooling="mean", neutral=False,
                             chat_template=bool(readout.meta.get("chat_template")), progress=progress)
    return emotional_neutral_texts(readout, corpus, acts)


def emotional_neutral_texts(readout: Readout, corpus: Corpus, acts: Activations) -> list[dict]:
    """Every neutral text's most emotional concept, sorted by margin over that concept's median
    positive score (largest first); ``flagged`` when the margin is positive."""
    if str(acts.pooling) != "mean":
        raise ValueError("the neutral check reads mean-pooled rows (collect(..., pooling='mean'))")
    z = 0
    for l in readout.layers:
        proj = acts.pooled[l] @ readout.vectors[l].float().T
        z = z + ((proj - readout.mean[l]) / readout.std[l].clamp_min(1e-6) if readout.has_stats else proj)
    z = z / len(readout.layers)
    median = torch.stack([
        z[torch.tensor(acts.rows([t.text for t in corpus.positives(c)])), i].median()
        for i, c in enumerate(readout.concepts)
    ])
    out = []
    for t in corpus.texts:
        if t.kind != NEUTRAL:
            continue
        margin = z[acts.row[t.text]] - median
        i = int(margin.argmax())
        out.append({"where": t.where(corpus.root), "concept": readout.concepts[i], "score": float(z[acts.row[t.text], i]),
                    "median_positive": float(median[i]), "margin": float(margin[i]), "flagged": bool(margin[i] > 0)})
    return sorted(out, key=lambda r: -r["margin"])
