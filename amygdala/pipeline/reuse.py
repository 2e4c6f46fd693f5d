"""A readout's corpus again: the texts it was built from, for the reports that re-run them.

Why in the pipeline: the quality report, the validity evaluation and the CLI all reduce a corpus
to a readout's concepts before the one corpus forward; each report would otherwise carry a copy.
"""

from __future__ import annotations

import logging
from pathlib import Path

from amygdala import AmygdalaError
from amygdala.corpus import Corpus, bundled_corpus
from amygdala.models import load_model
from amygdala.pipeline.build import matching_model, neutral_statistics
from amygdala.readout import Readout

log = logging.getLogger("amygdala.pipeline")


def corpus_for(readout: Readout, corpus: Corpus) -> Corpus:
    """``corpus`` reduced to the readout's concepts (a readout built with --concepts); warns
    when its texts are not the ones the readout was built from."""
    missing = [c for c in readout.concepts if c not in corpus.concept_cluster]
    if missing:
        raise AmygdalaError(
            f"{corpus.root}: no concept {', '.join(missing[:5])} of the readout in this corpus's manifest; "
            "pass the corpus the readout was built from"
        )
    if list(corpus.concepts) != list(readout.concepts):
        corpus = corpus.subset(list(readout.concepts))
    built = (readout.meta.get("corpus") or {}).get("sha256")
    if built and built != corpus.sha256():
        log.warning("the corpus differs from the one this readout was built from: metrics describe these texts")
    return corpus


def readout_corpus_root(readout: Readout, corpus: str | Path | None = None) -> Path:
    """The corpus folder whose neutral texts measure a readout's statistics: ``corpus`` when given,
    else the one the readout was built from when it still exists, else the bundled corpus."""
    if corpus is not None:
        return Path(corpus)
    built = (readout.meta.get("corpus") or {}).get("path")
    return Path(built) if built and Path(built).is_dir() else bundled_corpus()


def concept_statistics(
    readout: Readout, concept: str, corpus: Corpus, model: str | None = "default", device: str | None = None,
    progress: bool = True, dtype: str | None = None,
) -> tuple[dict[int, float], dict[int, float]]:
    """One concept's neutral-text z-score statistics, measured per token over ``corpus``'s neutral
    texts as :func:`~amygdala.pipeline.build` measures them: for a concept that did not come from
    a build (an imported vector), so it reads on the built concepts' scale.

    Args:
        readout: the readout holding ``concept``'s vectors.
        concept: the concept to measure.
        corpus: the corpus whose neutral texts are read.
        model: model folder or ``"default"``; checked against the readout before it loads.
        device: torch device, ``None`` for cuda when available.
        progress: show a progress bar.

    Returns:
        ``(mean, std)``: per layer of the readout, the concept's projection mean and std.
    """
    info = matching_model(readout, model)
    i = readout.concept_index(concept)
    loaded, tokenizer, _ = load_model(info.path, device, dtype)
    rows = {l: readout.vectors[l][i : i + 1] for l in readout.layers}
    mean, std = neutral_statistics(corpus, loaded, tokenizer, rows, chat_template=bool(readout.meta.get("chat_template")),
                                   progress=progress)
    return {l: float(mean[l][0]) for l in mean}, {l: float(std[l][0]) for l in std}
