"""Every extraction method side by side on the default model and the bundled corpus, in one run.

    ./dev bench methods [--layers 0.6,0.66,0.72] [--methods diffmean,subspace] [--concepts N]

One forward per unique text collects the pooled activations and, in the same pass, each text's
token rowspace for ``subspace``; every method then works from those same activations. Per
method: the time of a full fit (every concept and layer) and its ratio to diffmean's, measured
in this run, and leave-one-story-out accuracy (amygdala.validity.heldout: fold k holds out the
k-th scene text of every concept and refits, so the fold time is that many more fits).
Chance levels are printed beside the accuracies.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

import torch

from amygdala.corpus import bundled_corpus
from amygdala.activations import collect
from amygdala.corpus import load_corpus
from amygdala.methods import METHODS, TokenSubspaces, concept_sets, fit
from amygdala.models import load_model, parse_layers
from amygdala.validity.heldout import leave_one_story_out

CORPUS = bundled_corpus()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="0.6,0.66,0.72", help="as bench/loso.py, so diffmean's row matches it")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all)")
    ap.add_argument("--concepts", type=int, default=0, help="first N concepts only (0: all)")
    ap.add_argument("--no-direct", action="store_true", help="leave out the direct descriptions")
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if "diffmean" not in methods:
        methods.insert(0, "diffmean")  # the baseline the time ratios are taken against

    corpus = load_corpus(CORPUS, include_direct=not args.no_direct)
    if args.concepts:
        corpus = corpus.subset(corpus.concepts[: args.concepts])
    model, tok, info = load_model("default", "cpu")
    layers = parse_layers(args.layers, info.num_layers)
    tokens = TokenSubspaces(layers, info.hidden_size) if "subspace" in methods else None
    t0 = time.perf_counter()
    acts = collect(model, tok, corpus.text_list(), layers, on_tokens=tokens.add if tokens else None)
    forward = time.perf_counter() - t0
    sets = concept_sets(corpus, acts)

    rows = []
    for method in methods:
        t0 = time.perf_counter()
        fit(method, acts, sets, tokens=tokens)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = leave_one_story_out(corpus, acts, method, tokens=tokens)
        rows.append((method, fit_s, time.perf_counter() - t0, result))
        print(f"  {method}: fit {fit_s:.1f} s, {result.summary()}", flush=True)

    n_tokens = sum(acts.n_tokens)
    sizes = Counter(corpus.concept_cluster.values())
    cluster_chance = sum((k / len(corpus.concepts)) ** 2 for k in sizes.values())
    print(f"\ndefault model {info.name}, {len(corpus.concepts)} concepts, {len(acts.texts)} texts "
          f"({n_tokens} tokens), layers {layers}; forward{' + token bases' if tokens else ''} {forward:.0f} s; "
          f"torch threads {torch.get_num_threads()}")
    base = rows[0][1]
    print(f"{'method':<12} {'fit s':>7} {'x diffmean':>10} {'LOSO s':>7} {'top-1':>6} {'top-5':>6} {'cluster':>7}  most confused")
    for method, fit_s, loso_s, r in rows:
        pairs = ", ".join(f"{a}->{b} ({n})" for a, b, n in r.confused[:3])
        print(f"{method:<12} {fit_s:7.2f} {fit_s / base:10.1f} {loso_s:7.1f} {r.top1:6.1%} {r.top5:6.1%} "
              f"{r.cluster_top1:7.1%}  {pairs}")
    print(f"chance: top-1 {1 / len(corpus.concepts):.1%}, top-5 {5 / len(corpus.concepts):.1%}, "
          f"cluster top-1 {cluster_chance:.1%}; held-out texts per method: {rows[0][3].n}")


if __name__ == "__main__":
    main()
