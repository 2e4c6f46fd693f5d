"""``amygdala corpus check``: the rules that keep a corpus honest.

Each rule exists because the original system was bitten by its absence: concepts whose stories
shared one scene learned the scene, stories that named their feeling taught the word, and
near-copies counted twice. Every problem is one line: where, what is wrong, what to do.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from amygdala.corpus.loader import (
    BASELINE,
    PAIRED,
    STORY,
    Corpus,
    CorpusError,
    Text,
    load_corpus,
)

SUFFIXES = ("ingly", "fully", "ously", "iness", "ness", "ment", "ful", "ous", "ing", "ied", "ed", "ly", "y")
INFLECTIONS = "(s|es|d|ed|ly|ness|ment|ing|er|est|ity)?"
#: Parts of multi-word concept names too generic to forbid on their own (the full phrase still is).
GENERIC_PARTS = {
    "at", "on", "in", "out", "with", "self", "onto", "something", "staying", "filling", "space",
    "worn", "edge", "flow", "mono", "no", "aware", "sexual", "defensive", "anticipatory",
    "exuberant", "devotional", "yearning",
}


@dataclass(frozen=True)
class Problem:
    """One lint finding. ``str()`` gives the one-line form the CLI prints."""

    where: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}; {self.fix}"


def concept_word_pattern(concept: str) -> re.Pattern[str]:
    """Regex matching the concept's own word(s) and their obvious forms.

    Whole phrase for multi-word names ("at ease", "worn-out"); for each distinctive part, the
    stem as a word prefix when it is long enough to be specific (terrif- catches terrifying),
    else the word with common inflections (calm, calmly, calmness) and y->i forms (happiness).
    """
    parts = concept.split("_")
    alts = [r"[\s_-]+".join(map(re.escape, parts))] if len(parts) > 1 else []
    for word in parts:
        if len(parts) > 1 and (word in GENERIC_PARTS or len(word) < 4):
            continue
        stem = word
        for suffix in SUFFIXES:
            if word.endswith(suffix) and len(word) - len(suffix) >= 3:
                stem = word[: -len(suffix)]
                break
        if len(stem) >= 5:
            alts.append(re.escape(stem) + r"\w*")
        else:
            alts.append(re.escape(word) + INFLECTIONS)
            if word.endswith("y"):
                alts.append(re.escape(word[:-1]) + "i(ness|ly|er|est|ed)")
            if word.endswith("e") or word.endswith("ed"):
                base = word[:-1] if word.endswith("e") else word[:-1]
                alts.append(re.escape(base) + INFLECTIONS)
    return re.compile(r"\b(" + "|".join(alts) + r")\b", re.IGNORECASE)


def _shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z0-9']+", text.lower())
    return {tuple(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}


def _near_duplicates(texts: list[Text], threshold: float) -> list[tuple[Text, Text, float]]:
    """Pairs whose 5-word-shingle Jaccard similarity reaches ``threshold``.

    Counts shared shingles through an inverted index, so only pairs that share any shingle are
    compared. Two framings of one paired scenario are expected to share their setup and are
    exempt; identical texts never are.
    """
    shingles = [_shingles(t.text) for t in texts]
    index: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for i, sh in enumerate(shingles):
        for s in sh:
            index[s].append(i)
    shared: dict[tuple[int, int], int] = defaultdict(int)
    for ids in index.values():
        if len(ids) > 50:  # a stock phrase, not evidence of copying
            continue
        for a in range(len(ids)):
            for b in range(a + 1, len(ids)):
                shared[ids[a], ids[b]] += 1
    found = []
    for (i, j), n in shared.items():
        jac = n / len(shingles[i] | shingles[j])
        same_scenario = (
            texts[i].kind in (PAIRED, BASELINE)
            and texts[j].kind in (PAIRED, BASELINE)
            and texts[i].path.parent == texts[j].path.parent
            and texts[i].text != texts[j].text
        )
        if jac >= threshold and not same_scenario:
            found.append((texts[i], texts[j], jac))
    return found


def _text_problems(corpus: Corpus, root: Path) -> list[Problem]:
    """Per text: its length, its setting tag, and whether it names its own concept."""
    lint, problems = corpus.lint, []
    for t in corpus.texts:
        words = len(t.text.split())
        lo, hi = (  # direct descriptions are a line or three; stories and the neutral set are paragraphs
            (lint.direct_min_words, lint.direct_max_words)
            if t.setting == "direct"
            else (lint.min_words, lint.max_words)
        )
        if not lo <= words <= hi:
            problems.append(Problem(t.where(root), f"{words} words, outside {lo}-{hi}", "shorten or extend the text"))
        if t.kind == STORY and not t.setting:
            problems.append(Problem(
                t.where(root), "story has no setting tag",
                "start the paragraph with a line '# setting: <place and time>'",
            ))
        if t.kind in (STORY, PAIRED) and t.concept:
            hit = concept_word_pattern(t.concept).search(t.text)
            if hit:
                problems.append(Problem(
                    t.where(root), f"names its own concept ({hit.group(0)!r} in a {t.concept} text)",
                    "show the feeling without the word",
                ))
    return problems


def _duplicate_problems(corpus: Corpus, root: Path) -> list[Problem]:
    """Exact duplicates, then near-duplicates among the distinct texts."""
    problems, seen = [], {}
    for t in corpus.texts:
        key = " ".join(t.text.lower().split())
        if key in seen:
            problems.append(Problem(t.where(root), f"exact duplicate of {seen[key].where(root)}", "delete one of them"))
        else:
            seen[key] = t
    for a, b, jac in _near_duplicates(list(seen.values()), corpus.lint.near_duplicate_jaccard):
        problems.append(Problem(
            b.where(root), f"near-duplicate of {a.where(root)} (shingle Jaccard {jac:.2f})",
            "rewrite one of them as a new situation",
        ))
    return problems


def _coverage_problems(corpus: Corpus) -> list[Problem]:
    """Per concept: enough scene texts (stories and paired framings) in enough settings."""
    lint, problems = corpus.lint, []
    trouble = set(lint.trouble_concepts)
    for concept in corpus.concepts:
        scene = [t for t in corpus.positives(concept) if t.kind in (STORY, PAIRED)]
        settings = {t.setting.lower() for t in scene if t.setting}
        need_pos, need_set = (
            (lint.trouble_min_positives, lint.trouble_min_settings)
            if concept in trouble
            else (lint.min_positives, lint.min_settings)
        )
        label = "trouble concept " if concept in trouble else ""
        if len(scene) < need_pos:
            problems.append(Problem(
                f"stories/{concept}.txt", f"{label}{concept} has {len(scene)} story/paired texts, needs {need_pos}",
                "write more stories in new settings",
            ))
        if len(settings) < need_set:
            problems.append(Problem(
                f"stories/{concept}.txt", f"{label}{concept} has {len(settings)} setting(s), needs {need_set}",
                "a concept whose texts share one scene learns the scene: add texts in other settings",
            ))
        counts = Counter(t.setting.lower() for t in scene if t.setting)
        if counts and scene:
            top, n = counts.most_common(1)[0]
            if n / len(scene) > lint.max_setting_share:
                problems.append(Problem(
                    f"stories/{concept}.txt", f"setting {top!r} carries {n} of {concept}'s {len(scene)} story/paired texts "
                    f"(more than {lint.max_setting_share:.0%})", "move some of them to other settings",
                ))
    return problems


def check_corpus(root: str | Path) -> tuple[list[Problem], list[str], Corpus | None]:
    """Lint a corpus folder. Returns (problems, warnings, corpus or None when unreadable)."""
    root = Path(root)
    load_problems: list[CorpusError] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            corpus = load_corpus(root, problems=load_problems)
        except CorpusError as e:
            return [Problem(*_split(str(e)))], [str(w.message) for w in caught], None
    warned = [str(w.message) for w in caught]
    problems = [Problem(*_split(str(e))) for e in load_problems]
    # Scenario folders need a baseline: it is the shared negative that makes the pair a pair.
    for scenario in corpus.paired_dirs:
        if not (scenario / "baseline.txt").is_file():
            problems.append(Problem(
                str(scenario.relative_to(root)), "scenario has no baseline.txt",
                "write the scenario told with no particular feeling",
            ))
    problems += _text_problems(corpus, root)
    problems += _duplicate_problems(corpus, root)
    problems += _coverage_problems(corpus)
    if corpus.lint.require_affect:
        problems += [
            Problem("manifest.toml", f"[concepts.{c}] has no valence/arousal",
                    "add valence = <-1..1> and arousal = <0..1> (and affect_source) to the entry")
            for c in corpus.concepts if corpus.affect.get(c) is None
        ]
    return problems, warned, corpus


def summary(corpus: Corpus) -> list[str]:
    """Counts per cluster: concepts, texts, settings; then totals."""
    rows = ["cluster                       concepts  texts  settings"]
    by_cluster: dict[str, list[str]] = defaultdict(list)
    for c in corpus.concepts:
        by_cluster[corpus.concept_cluster[c]].append(c)
    for cluster, concepts in by_cluster.items():
        texts = sum(len(corpus.positives(c)) for c in concepts)
        settings = len({s for c in concepts for s in corpus.settings(c)})
        rows.append(f"{cluster:<30}{len(concepts):>8}{texts:>7}{settings:>10}")
    kinds = defaultdict(int)
    for t in corpus.texts:
        kinds[t.kind] += 1
    rows.append(
        f"total: {len(corpus.concepts)} concepts, {len(corpus.texts)} texts "
        f"({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}), "
        f"{len(corpus.paired_dirs)} paired scenarios"
    )
    return rows


def _split(message: str) -> tuple[str, str, str]:
    """Turn a CorpusError message 'where: what; fix' into Problem fields."""
    where, _, rest = message.partition(": ")
    what, _, fix = rest.partition("; ")
    return where, what, fix or "fix the file"
