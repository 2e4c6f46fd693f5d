"""A readout's corpus again: the texts it was built from, for the reports that re-run them.

Why in the pipeline: the quality report, the validity evaluation and the CLI all reduce a corpus
to a readout's concepts before the one corpus forward; each report would otherwise carry a copy.
"""

from __future__ import annotations

import logging

from amygdala import AmygdalaError
from amygdala.corpus import Corpus
from amygdala.readout import Readout

log = logging.getLogger("amygdala.pipeline")


def corpus_for(readout: Readout, corpus: Corpus) -> Corpus:
    """``corpus`` reduced to the readout's concepts (a readout built with --concepts); warns
    when its texts are not the ones the readout was built from."""
    missing = [c for c in readout.concepts if c not in corpus.concept_cluster]
    if missing:
        raise AmygdalaError(
            f"{corpus.root}: no concept {', '.join(missing[:5])} of the readout in this corpus's manifest; "
            "pass the corpus the readout was built from (--corpus)"
        )
    if list(corpus.concepts) != list(readout.concepts):
        corpus = corpus.subset(list(readout.concepts))
    built = (readout.meta.get("corpus") or {}).get("sha256")
    if built and built != corpus.sha256():
        log.warning("the corpus differs from the one this readout was built from: metrics describe these texts")
    return corpus
