"""Leave-one-story-out accuracy of the bundled corpus on the default model (issue 3's evidence).

    ./dev bench loso [--layers 0.6,0.66,0.72] [--method diffmean]

One forward per unique text, then per fold a refit from the same activations
(amygdala.quality.heldout). Chance levels are printed beside the figures.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

from amygdala.corpus import bundled_corpus
from amygdala.activations import collect
from amygdala.corpus import load_corpus
from amygdala.models import load_model, parse_layers
from amygdala.quality.heldout import leave_one_story_out

CORPUS = bundled_corpus()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="0.6,0.66,0.72")
    ap.add_argument("--method", default="diffmean")
    ap.add_argument("--no-direct", action="store_true", help="leave out the direct descriptions")
    args = ap.parse_args()
    corpus = load_corpus(CORPUS, include_direct=not args.no_direct)
    model, tok, info = load_model("default", "cpu")
    layers = parse_layers(args.layers, info.num_layers)
    t0 = time.perf_counter()
    acts = collect(model, tok, corpus.text_list(), layers)
    t1 = time.perf_counter()
    result = leave_one_story_out(corpus, acts, args.method)
    t2 = time.perf_counter()
    n_clusters = len(set(corpus.concept_cluster.values()))
    sizes = Counter(corpus.concept_cluster.values())
    cluster_chance = sum((k / len(corpus.concepts)) ** 2 for k in sizes.values())
    print(f"default model, {len(corpus.concepts)} concepts in {n_clusters} clusters, layers {layers}, "
          f"method {args.method}; forwards {t1 - t0:.0f} s, folds {t2 - t1:.1f} s")
    print(result.summary())
    print(f"chance: top-1 {1 / len(corpus.concepts):.1%}, top-5 {5 / len(corpus.concepts):.1%}, "
          f"cluster top-1 {cluster_chance:.1%}")


if __name__ == "__main__":
    main()
