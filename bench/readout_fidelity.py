"""The demo sentence's per-token readout before and after the fidelity construction (issue 23).

One forward over the bundled corpus (the demo's 12 concepts, default model, the build's default
layers and pooling); from the same fitted vectors and the same per-token moments, two readouts:
"before" (as built, z over neutral text: what `amygdala demo` wrote until now) and "after" (the
mean-removed vectors, z over emotional text, the emotionality and valence tracks). Prints per
token the top concept (z averaged over the layers) of each, unsmoothed and smoothed, and writes
the table as markdown to stdout for docs/validity.md.

    flock /tmp/amygdala-heavy.lock env PYTHONPATH=$PWD python bench/readout_fidelity.py
"""

from __future__ import annotations

import collections

import torch

from amygdala.corpus import bundled_corpus, load_corpus
from amygdala.methods import concept_sets, fit
from amygdala.models import load_model
from amygdala.pipeline import BuildConfig, collect_corpus, plan
from amygdala.pipeline.build import construct
from amygdala.pipeline.demo import DEMO_CONCEPTS, DEMO_SENTENCE
from amygdala.readout import DEFAULT_SMOOTH, Readout, score_text


def readouts():
    corpus = load_corpus(bundled_corpus()).subset(DEMO_CONCEPTS)
    config = BuildConfig(progress=False)
    p = plan(corpus, config)
    model, tok, info = load_model(p.model_path, None)
    acts, stats = collect_corpus(corpus, model, tok, p.layers, pooling=p.pooling, progress=False)
    sets = concept_sets(corpus, acts)
    fitted = fit(config.method, acts, sets, **p.params).vectors
    out = {}
    for name, construction, against in (("before", "as_built", "neutral"), ("after", "mean_removed", "emotional")):
        vectors, tracks, names = construct(fitted, construction, acts, sets, corpus.valence())
        mean, std = stats.statistics(vectors)
        emo = stats.statistics(vectors, "emotional")
        tmean, tstd = stats.statistics(tracks)
        out[name] = Readout(list(corpus.concepts), p.layers, vectors, mean, std,
                            meta={"construction": construction, "statistics": {"default": against}},
                            emotional_mean=emo[0], emotional_std=emo[1], track_names=names,
                            track_vectors=tracks, track_mean=tmean, track_std=tstd)
        cos = torch.nn.functional.normalize(vectors[p.layers[0]], dim=1)
        off = (cos @ cos.T)[~torch.eye(len(corpus.concepts), dtype=torch.bool)].mean()
        print(f"{name}: mean pairwise cosine of the concept vectors at layer {p.layers[0]}: {off:.2f}")
    return model, tok, out, corpus


def main() -> None:
    model, tok, out, corpus = readouts()
    scored = {(n, s): score_text(model, tok, r, DEMO_SENTENCE, smooth=s) for n, r in out.items() for s in (1, DEFAULT_SMOOTH)}
    tokens, positions = scored["after", 1].tokens, scored["after", 1].positions
    valence = corpus.valence()
    print(f"\n| token | before: top (z) | after: top (z) | after, smoothed {DEFAULT_SMOOTH}: top | emotionality z | valence z |")
    print("|---|---|---|---|---|---|")
    tops = collections.defaultdict(list)
    for i, (pos, t) in enumerate(zip(positions, tokens)):
        if pos == 0:
            print(f"| {t!r} | (attention sink, left out) | | | | |")
            continue
        cells = []
        for key in (("before", 1), ("after", 1), ("after", DEFAULT_SMOOTH)):
            z = scored[key].scores[i].mean(0)
            c = int(z.argmax())
            tops[key].append(c)
            cells.append(f"{corpus.concepts[c]} ({z[c]:+.1f})" if key[1] == 1 else corpus.concepts[c])
        tr = scored["after", 1].tracks[i].mean(0)
        print(f"| {t!r} | {cells[0]} | {cells[1]} | {cells[2]} | {tr[0]:+.1f} | {tr[1]:+.1f} |")
    n = len(tops["before", 1])
    for key, idx in tops.items():
        counts = collections.Counter(corpus.concepts[c] for c in idx)
        neg = sum(1 for c in idx if (valence[c] or 0) < 0)
        print(f"\n{key}: {len(counts)} distinct top concepts over {n} tokens; most frequent {counts.most_common(3)}; "
              f"negative-valence top on {neg}/{n}")
    val = [float(scored["after", 1].tracks[i, :, 1].mean()) for i, p in enumerate(positions) if p > 0]
    print(f"valence track: negative on {sum(v < 0 for v in val)}/{len(val)} tokens")


if __name__ == "__main__":
    main()
