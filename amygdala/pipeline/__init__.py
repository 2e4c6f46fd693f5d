"""The vector pipeline: corpus -> one forward per unique text -> method -> readout file.

Both ``amygdala build`` and the quality and validity reports run their forward through here, so
a corpus is resolved, checked, collected and fitted one way only.
"""

from amygdala.pipeline.build import (
    BuildConfig, BuildResult, build, collect_corpus, matching_model, neutral_statistics, plan,
)
from amygdala.pipeline.reuse import concept_statistics, corpus_for, readout_corpus_root

__all__ = ["concept_statistics", "corpus_for", "readout_corpus_root", "BuildConfig", "BuildResult", "build", "collect_corpus", "matching_model", "neutral_statistics", "plan"]
