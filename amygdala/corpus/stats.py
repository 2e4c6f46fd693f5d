"""``amygdala corpus stats``: what the corpus holds per concept and cluster, and which concepts'
texts overlap most (the first place to look when two concepts' vectors come out alike)."""

from __future__ import annotations

import re
from collections import Counter, defaultdict

from amygdala.corpus.loader import DIRECT, PAIRED, STORY, Corpus

#: Words too common to say anything about a concept's texts.
STOPWORDS = set("""a an the and or but if then so of to in on at by for with from into onto over under up down out off
as is are was were be been being am i you he she it we they me him her us them my your his its our their this that these
those there here what which who whom whose when where why how not no nor all any each every some one two three had has
have having do does did doing would could should will can may might must shall just only also very too than s t don
didn""".split())


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z']+", text.lower()) if w not in STOPWORDS and len(w) > 2}


def concept_stats(corpus: Corpus, nearest: int = 5) -> list[dict]:
    """Per concept (manifest order): counts by kind, settings, mean words, and the ``nearest``
    concepts whose texts share the most vocabulary with its own (Jaccard of word sets)."""
    vocab = {c: set() for c in corpus.concepts}
    rows = []
    for c in corpus.concepts:
        texts = corpus.positives(c)
        for t in texts:
            vocab[c] |= _words(t.text)
        kinds = Counter(t.kind for t in texts)
        rows.append({
            "concept": c, "cluster": corpus.concept_cluster[c],
            "stories": kinds[STORY], "paired": kinds[PAIRED], "direct": kinds[DIRECT], "positives": len(texts),
            "settings": len({t.setting.lower() for t in texts if t.setting and t.kind in (STORY, PAIRED)}),
            "mean_words": round(sum(len(t.text.split()) for t in texts) / max(1, len(texts)), 1),
        })
    for row in rows:
        mine = vocab[row["concept"]]
        overlap = [
            (len(mine & vocab[o]) / max(1, len(mine | vocab[o])), o) for o in corpus.concepts if o != row["concept"]
        ]
        row["nearest_by_text"] = [[o, round(j, 3)] for j, o in sorted(overlap, reverse=True)[:nearest]]
    return rows


def cluster_stats(corpus: Corpus, rows: list[dict]) -> list[dict]:
    by: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by[r["cluster"]].append(r)
    return [
        {"cluster": name, "concepts": len(rs), "positives": sum(r["positives"] for r in rs),
         "stories": sum(r["stories"] for r in rs), "paired": sum(r["paired"] for r in rs),
         "min_positives": min(r["positives"] for r in rs), "settings": sum(r["settings"] for r in rs)}
        for name, rs in by.items()
    ]


def table(rows: list[dict], clusters: list[dict]) -> str:
    head = f"{'concept':<22}{'cluster':<26}{'story':>6}{'paired':>7}{'direct':>7}{'pos':>5}{'sett':>5}{'words':>7}  nearest by text"
    lines = [head]
    for r in rows:
        near = ", ".join(f"{o} {j:.2f}" for o, j in r["nearest_by_text"])
        lines.append(f"{r['concept']:<22}{r['cluster']:<26}{r['stories']:>6}{r['paired']:>7}{r['direct']:>7}"
                     f"{r['positives']:>5}{r['settings']:>5}{r['mean_words']:>7}  {near}")
    lines.append("")
    lines.append(f"{'cluster':<26}{'concepts':>9}{'positives':>10}{'fewest':>8}{'stories':>9}{'paired':>8}")
    for c in clusters:
        lines.append(f"{c['cluster']:<26}{c['concepts']:>9}{c['positives']:>10}{c['min_positives']:>8}{c['stories']:>9}{c['paired']:>8}")
    return "\n".join(lines)
