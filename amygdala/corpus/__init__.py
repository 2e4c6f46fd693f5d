"""The concept corpus: reading, validating and linting a corpus folder (layout in corpus/README.md)."""

from amygdala.corpus.loader import Corpus, CorpusError, Text, load_corpus
from amygdala.corpus.check import Problem, check_corpus

__all__ = ["Corpus", "CorpusError", "Text", "load_corpus", "Problem", "check_corpus"]
