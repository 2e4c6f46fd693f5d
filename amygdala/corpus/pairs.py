"""Corpora without a folder: your own contrastive pairs, or texts per concept.

Why: repeng's and steering-vectors' workflow is a few dozen ``(positive, negative)`` pairs for
one concept, not a manifest and a folder of stories. :func:`from_pairs` makes such a corpus:
each pair's positive is a positive of its concept, its negative a negative of that concept only
(kind ``negative``), and the pair-based methods (``mean``, ``pca``, ``pca_diff``, ``logistic``,
``linear``) pair them as given. :func:`read_pairs_jsonl` reads ``build --pairs FILE.jsonl``.
:func:`from_texts` is the other common shape: texts per concept, and neutral texts that are
every concept's negatives (and the z-scores' reference).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from amygdala.corpus.loader import NAME_RE, NEGATIVE, NEUTRAL, PAIRED, STORY, Corpus, CorpusError, Text


def _check_name(name, where: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise CorpusError(f"{where}: concept name {name!r} is not lower_snake_case (e.g. honest, very_calm); rename it")
    return name


def _check_text(value, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise CorpusError(f"{where}: expected a non-empty string, got {type(value).__name__} {str(value)[:40]!r}")
    return value


def _neutral(neutral: Iterable[str], path: Path) -> list[Text]:
    return [Text(_check_text(t, f"neutral[{i}]"), path, i + 1, NEUTRAL, None, "neutral")
            for i, t in enumerate(neutral)]


def _corpus(root: Path | None, concepts: list[str], texts: list[Text], pairs: dict) -> Corpus:
    """One cluster per concept named after it: nothing says which concepts belong together."""
    return Corpus(root=root, concepts=concepts, concept_cluster={c: c for c in concepts},
                  descriptions={c: "" for c in concepts}, clusters={c: "" for c in concepts},
                  texts=texts, pairs=pairs, affect={c: None for c in concepts})


def from_pairs(
    pairs: Mapping[str, Sequence[tuple[str, str]]], *, neutral: Iterable[str] = (), source: str | Path | None = None,
    lines: Mapping[str, Sequence[int]] | None = None,
) -> Corpus:
    """A corpus from ``{concept: [(positive, negative), ...]}`` (and optional neutral texts).

    ``source`` (a file) and ``lines`` (per concept, each pair's line in it) say where each text
    came from, for messages; without them a text is ``<pairs:concept>:<index>``.
    """
    if not isinstance(pairs, Mapping) or not pairs:
        raise CorpusError("from_pairs: give {concept: [(positive, negative), ...]} with at least one concept")
    root = Path(source) if source is not None else None
    texts: list[Text] = []
    kept: dict[str, list[tuple[str, str]]] = {}
    for concept, items in pairs.items():
        _check_name(concept, str(root or "from_pairs"))
        path = root or Path(f"<pairs:{concept}>")
        if isinstance(items, (str, bytes)) or not items:
            raise CorpusError(f"{path}: concept {concept!r} has no pairs; give a list of (positive, negative)")
        kept[concept] = []
        for i, item in enumerate(items):
            line = lines[concept][i] if lines else i + 1
            where = f"{path}:{line}"
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise CorpusError(f"{where}: a pair is (positive, negative), got {str(item)[:60]!r}")
            pos, neg = _check_text(item[0], f"{where}: positive"), _check_text(item[1], f"{where}: negative")
            if pos == neg:
                raise CorpusError(f"{where}: positive and negative are the same text; a pair must differ")
            texts.append(Text(pos, path, line, PAIRED, concept, None))
            texts.append(Text(neg, path, line, NEGATIVE, None, None, negative_of=concept))
            kept[concept].append((pos, neg))
    texts += _neutral(neutral, root or Path("<neutral>"))
    return _corpus(root, list(kept), texts, kept)


def from_texts(texts: Mapping[str, Sequence[str]], *, neutral: Iterable[str] = ()) -> Corpus:
    """A corpus from ``{concept: [texts]}``: a concept's negatives are the other concepts' texts
    and the neutral texts, as in a corpus folder."""
    if not isinstance(texts, Mapping) or not texts:
        raise CorpusError("from_texts: give {concept: [texts]} with at least one concept")
    out: list[Text] = []
    for concept, items in texts.items():
        _check_name(concept, "from_texts")
        if isinstance(items, (str, bytes)) or not items:
            raise CorpusError(f"from_texts: concept {concept!r} has no texts; give a list of strings")
        out += [Text(_check_text(t, f"from_texts[{concept!r}][{i}]"), Path(f"<texts:{concept}>"), i + 1, STORY, concept, None)
                for i, t in enumerate(items)]
    neutral_texts = _neutral(neutral, Path("<neutral>"))
    if len(texts) == 1 and not neutral_texts:
        raise CorpusError(f"from_texts: one concept ({next(iter(texts))}) and no neutral texts leaves it no negatives; "
                          "pass neutral=[...] or use from_pairs")
    return _corpus(None, list(texts), out + neutral_texts, {})


def stem_concept(path: Path) -> str:
    """The default concept of a pairs file: its stem in lower_snake_case (``Honest-Pairs`` -> ``honest_pairs``)."""
    return re.sub(r"[^a-z0-9]+", "_", path.stem.lower()).strip("_")


def read_pairs_jsonl(path: str | Path) -> Corpus:
    """``build --pairs FILE.jsonl``: one ``{"positive": ..., "negative": ..., "concept": ...}`` per line.

    ``concept`` is optional (default: the file's stem); other fields are ignored; blank lines are
    skipped. A bad line is a one-line error naming ``file:line`` and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"--pairs {path}: no such file")
    default = stem_concept(path)
    pairs: dict[str, list[tuple[str, str]]] = {}
    lines: dict[str, list[int]] = {}
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not UTF-8 (offset {e.start}); re-save the file as UTF-8") from None
    for no, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path}:{no}: not JSON ({e.msg} at column {e.colno}); one object per line") from None
        if not isinstance(item, dict):
            raise CorpusError(f"{path}:{no}: expected an object {{\"positive\": ..., \"negative\": ...}}, got {type(item).__name__}")
        for name in ("positive", "negative"):
            if name not in item:
                raise CorpusError(f"{path}:{no}: field {name!r} missing; each line needs \"positive\" and \"negative\"")
            _check_text(item[name], f"{path}:{no}: field {name!r}")
        concept = item.get("concept", default)
        if "concept" not in item and not NAME_RE.match(concept):
            raise CorpusError(f"{path}:{no}: the file name gives no usable concept name ({concept!r}); "
                              "add a \"concept\" field in lower_snake_case")
        _check_name(concept, f"{path}:{no}: field 'concept'")
        pairs.setdefault(concept, []).append((item["positive"], item["negative"]))
        lines.setdefault(concept, []).append(no)
    if not pairs:
        raise CorpusError(f"{path}: no pairs; write one {{\"positive\": ..., \"negative\": ...}} object per line")
    return from_pairs(pairs, source=path, lines=lines)
