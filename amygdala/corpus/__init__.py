"""The concept corpus: reading, validating and linting a corpus folder.

The corpus that ships with amygdala lives inside the package (:func:`bundled_corpus`), so an
installed wheel has it too; its README.md is the writers' style guide.
"""

from pathlib import Path

from amygdala.corpus.loader import Affect, Corpus, CorpusError, Text, load_corpus
from amygdala.corpus.check import Problem, check_corpus
from amygdala.corpus.pairs import from_pairs, from_texts, read_pairs_jsonl


def bundled_corpus() -> Path:
    """The folder of the corpus shipped with amygdala (used when no --corpus is given)."""
    return Path(__file__).resolve().parent / "bundled"


__all__ = ["Affect", "Corpus", "CorpusError", "Text", "load_corpus", "Problem", "check_corpus", "bundled_corpus",
           "from_pairs", "from_texts", "read_pairs_jsonl"]
