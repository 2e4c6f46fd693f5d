"""Corpus depth: held-out accuracy and geometry before and after a corpus change, and a learning
curve, on the default model, same method and pooling. Writes its tables into docs/validity.md.

    ./dev bench loso [--before REV] [--curve 3,5,8] [--layers 14,19,21] [--method diffmean] [--pooling mean] [--write]

``--before REV`` evaluates the corpus as it was at git revision REV (its manifest may predate the
valence/arousal fields: those are taken from today's manifest, same concept names). The learning
curve sub-samples each concept's scene texts (stories and paired framings, a fixed random choice)
to 3, 5, 8 and all, from the same forward, and evaluates each as a corpus of its own.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import tarfile
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from amygdala.activations import collect
from amygdala.corpus import bundled_corpus, load_corpus
from amygdala.corpus.loader import PAIRED, STORY
from amygdala.methods import concept_sets, fit
from amygdala.models import load_model, parse_layers
from amygdala.validity.geometry import geometry
from amygdala.validity.heldout import held_out

ROOT = Path(__file__).resolve().parents[1]


def corpus_at(rev: str, into: Path) -> Path:
    """The bundled corpus as it was at ``rev`` (it lived in corpus/ before it moved into the package)."""
    for path in ("amygdala/corpus/bundled", "corpus"):
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, path], capture_output=True)
        if archive.returncode == 0:
            tar = into / "corpus.tar"
            tar.write_bytes(archive.stdout)
            with tarfile.open(tar) as t:
                t.extractall(into, filter="data")
            return into / path
    raise SystemExit(f"no corpus at {rev}")


def evaluate(corpus, acts, method, layers) -> dict:
    results = held_out(corpus, acts, method)
    vectors = fit(method, acts, concept_sets(corpus, acts)).vectors
    geo = {l: geometry(vectors[l], corpus.valence(), corpus.arousal(), corpus.concept_polarity()) for l in layers}
    return {"held": results, "geo": geo}


def subsample(corpus, k: int, seed: int = 0):
    """Each concept's scene texts cut to ``k`` (a fixed random choice); other texts kept."""
    rng = random.Random(seed)
    keep = set()
    for c in corpus.concepts:
        scene = [t for t in corpus.positives(c) if t.kind in (STORY, PAIRED)]
        keep |= {id(t) for t in (rng.sample(scene, k) if len(scene) > k else scene)}
    return replace(corpus, texts=[t for t in corpus.texts if t.kind not in (STORY, PAIRED) or id(t) in keep])


def row(label: str, ev: dict, layers, extra: str = "") -> str:
    best = max(layers, key=lambda l: ev["held"][l].top1)
    r, g = ev["held"][best], ev["geo"][best]
    a = ev["held"]["all"]
    return (f"| {label} | {r.n} | {best} | {100 * r.top1:.1f}% | {100 * r.top5:.1f}% | {100 * r.cluster_top1:.1f}% | "
            f"{100 * a.top1:.1f}% | {g['pc1_valence_r']:.2f} | {g['pc2_arousal_r']:.2f} | {g['pc1_polarity_auc']:.2f} | "
            f"{g['decodable_valence_r']:.2f} / {g['decodable_arousal_r']:.2f} |{extra}")


HEAD = ("| corpus | held-out texts | best layer | concept top-1 | top-5 | cluster top-1 | top-1, all layers | "
        "abs r PC1~valence | abs r PC2~arousal | PC1 +/- AUC | decodable valence / arousal r |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default=None, help="git revision whose corpus is the 'before'")
    ap.add_argument("--curve", default="3,5,8", help="positives per concept for the learning curve ('' for none)")
    ap.add_argument("--layers", default="14,19,21")
    ap.add_argument("--method", default="diffmean")
    ap.add_argument("--pooling", default="mean")
    ap.add_argument("--write", action="store_true", help="write the tables into docs/validity.md")
    args = ap.parse_args()
    model, tok, info = load_model("default", "cpu")
    layers = parse_layers(args.layers, info.num_layers)
    now = load_corpus(bundled_corpus())
    lines = [f"Default model {info.name}, method {args.method}, pooling {args.pooling}, layers {layers}; "
             "figures at the best layer by concept top-1, and top-1 with all layers' z-scores summed.", "", HEAD,
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    corpora = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.before:
            old = load_corpus(corpus_at(args.before, Path(tmp)))
            affect = {c: now.affect.get(c) for c in old.concepts}
            corpora.append((f"before ({args.before[:10]})", replace(old, affect=affect, polarity=now.polarity)))
        corpora.append(("now", now))
        forwards = {}
        for label, corpus in corpora:
            t0 = time.perf_counter()
            acts = collect(model, tok, corpus.text_list(), layers, pooling=args.pooling)
            forwards[label] = (time.perf_counter() - t0, len(acts.texts), sum(acts.n_tokens))
            ev = evaluate(corpus, acts, args.method, layers)
            lines.append(row(label, ev, layers))
            print(lines[-1], flush=True)
            if label == "now" and args.curve:
                for k in [int(x) for x in args.curve.split(",")]:
                    sub = subsample(corpus, k)
                    lines.append(row(f"now, {k} scene texts per concept", evaluate(sub, acts, args.method, layers), layers))
                    print(lines[-1], flush=True)
    lines.append("")
    for label, (secs, n, toks) in forwards.items():
        lines.append(f"Forward of the whole corpus, {label}: {n} texts, {toks} content tokens, {secs:.0f} s.")
    from validity import DOC, publish  # bench/validity.py, beside this file

    publish(DOC, "loso", "\n".join(lines), args.write)


if __name__ == "__main__":
    main()
