"""Pooling x method on the default model, from one forward: held-out accuracy, emotion geometry
and (with --steer) steering judged by VADER. Writes its tables into docs/validity.md.

    ./dev bench validity [--layers 14,19,21] [--methods diffmean,denoised,logistic] [--steer] [--write]

One forward over the corpus collects the mean-pooled rows and, from each text's per-token
activations in the same pass, the other poolings' rows: every pooling is measured on the same
activations. Held-out accuracy refits per fold from those rows (amygdala.validity.heldout).
logistic refits are slow (one scikit-learn classifier per concept per fold per layer, about a
second each here), so it runs at mean pooling only, at the layer where diffmean did best, on
--logistic-folds folds; the table says so on its rows.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch

from amygdala.activations import Activations, Pooling, collect
from amygdala.corpus import bundled_corpus, load_corpus
from amygdala.methods import concept_sets, fit
from amygdala.models import load_model, parse_layers
from amygdala.validity.geometry import PAPER, geometry
from amygdala.validity.heldout import held_out

DOC = Path(__file__).resolve().parents[1] / "docs" / "validity.md"


class PoolingRows:
    """Rows of extra poolings, computed from the per-token activations the forward hands out."""

    def __init__(self, n_texts: int, layers: list[int], hidden: int, poolings: list[Pooling]):
        self.poolings = poolings
        self.rows = {str(p): {l: torch.zeros(n_texts, hidden) for l in layers} for p in poolings}

    def __call__(self, row: int, layer: int, matrix: torch.Tensor, start: int) -> None:
        end = start + matrix.shape[0]
        for p in self.poolings:
            a, b = p.span(start, end)
            self.rows[str(p)][layer][row] = matrix[a - start : b - start].float().mean(0).cpu()


def activations_for(acts: Activations, pooled: dict[int, torch.Tensor], pooling: Pooling) -> Activations:
    return Activations(acts.texts, acts.layers, pooled, acts.n_tokens, acts.seconds, acts.forwards, pooling=pooling)


def replace_block(doc: Path, name: str, body: str) -> None:
    """Put ``body`` between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` in ``doc``."""
    text = doc.read_text()
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


def publish(doc: Path, name: str, body: str, write: bool) -> None:
    """Print a bench's table and, with ``--write``, put it in ``doc``'s ``bench:NAME`` block:
    every bench that writes its figures into docs/ ends the same way."""
    print(body, flush=True)
    if write:
        replace_block(doc, name, body)
        print(f"wrote {doc}")


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="14,19,21")
    ap.add_argument("--poolings", default="last,mean,mean_from=50")
    ap.add_argument("--methods", default="diffmean,denoised,logistic")
    ap.add_argument("--logistic-folds", type=int, default=3)
    ap.add_argument("--corpus", type=Path, default=None, help="corpus folder (default: the bundled one)")
    ap.add_argument("--steer", action="store_true",
                    help="also steering efficacy (VADER): mean pooling, diffmean and denoised, at diffmean's best layer")
    ap.add_argument("--write", action="store_true", help=f"write the tables into {DOC}")
    ap.add_argument("--per-token", action="store_true",
                    help="only the per-token view on held-out stories (amygdala.validity.pertoken), old vs new "
                         "construction, at the build's default layers 0.5,0.66 unless --layers is given")
    ap.add_argument("--max-folds", type=int, default=None, help="--per-token: the first folds only")
    ap.add_argument("--save-pooled", type=Path, default=None,
                    help="--per-token: also save the pooled rows (texts, layers, rows) for bench/steer_negative.py")
    args = ap.parse_args()

    corpus = load_corpus(args.corpus or bundled_corpus())
    model, tok, info = load_model("default", "cpu")
    if args.per_token:
        per_token_main(args, corpus, model, tok, info)
        return
    layers = parse_layers(args.layers, info.num_layers)
    poolings = [Pooling.parse(p) for p in args.poolings.split(",")]
    extra = [p for p in poolings if str(p) != "mean"]
    texts = list(dict.fromkeys(corpus.text_list()))
    side = PoolingRows(len(texts), layers, info.hidden_size, extra)
    t0 = time.perf_counter()
    acts = collect(model, tok, texts, layers, pooling="mean", on_tokens=side)
    forward = time.perf_counter() - t0
    by_pooling = {"mean": acts} | {str(p): activations_for(acts, side.rows[str(p)], p) for p in extra}

    lines = [f"Default model {info.name}, {len(corpus.concepts)} concepts, {len(acts.texts)} texts "
             f"({sum(acts.n_tokens)} content tokens), layers {layers}; one forward {forward:.0f} s "
             f"(torch threads {torch.get_num_threads()}).", "",
             "| pooling | method | layer | concept top-1 | top-5 | cluster top-1 | abs r PC1~valence | abs r PC2~arousal | PC1 +/- AUC |",
             "|---|---|---|---|---|---|---|---|---|"]
    best = None
    methods = [m.strip() for m in args.methods.split(",")]
    slow = [m for m in methods if m.startswith("logistic")]
    for pname, a in by_pooling.items():
        sets = concept_sets(corpus, a)
        for method in [m for m in methods if m not in slow] + (slow if pname == "mean" else []):
            t1 = time.perf_counter()
            folds = args.logistic_folds if method in slow else None
            at = [best[3]] if method in slow and best is not None else layers
            part = activations_for(a, {l: a.pooled[l] for l in at}, a.pooling) if method in slow else a
            part.layers = list(at)
            results = held_out(corpus, part, method, max_folds=folds)
            if method == "diffmean":
                r0 = results["all"]
            vectors = fit(method, part, sets).vectors
            for l in at:
                g = geometry(vectors[l], corpus.valence(), corpus.arousal(), corpus.concept_polarity())
                r = results[l]
                note = f" ({folds} folds)" if folds else ""
                lines.append(f"| {pname} | {method}{note} | {l} | {pct(r.top1)} | {pct(r.top5)} | {pct(r.cluster_top1)} | "
                             f"{g['pc1_valence_r']:.2f} | {g['pc2_arousal_r']:.2f} | {g['pc1_polarity_auc']:.2f} |")
                if method == "diffmean" and (best is None or r.top1 > best[0]):
                    best = (r.top1, pname, method, l)
            print(f"  {pname} {method}: {time.perf_counter() - t1:.0f} s", flush=True)
    lines += ["", f"Chance: concept top-1 {pct(r0.chance_top1)}, top-5 {pct(r0.chance_top5)}, "
              f"cluster top-1 {pct(r0.chance_cluster_top1)}; held-out texts: {r0.n}. "
              f"The published study's figures: r {PAPER['pc1_valence_r']} (PC1~valence), {PAPER['pc2_arousal_r']} (PC2~arousal)."]
    publish(DOC, "validity", "\n".join(lines), args.write)  # written before the (slower) steering check
    if args.steer:
        publish(DOC, "steering", "\n".join(steering_lines(model, tok, corpus, by_pooling["mean"], [best[3]])), args.write)


def per_token_main(args, corpus, model, tok, info) -> None:
    """The per-token figures (old vs new construction, both statistics) into the per-token block."""
    from amygdala.validity.pertoken import markdown, per_token, story_tokens_for, table

    layers = parse_layers(args.layers if args.layers != "14,19,21" else "0.5,0.66", info.num_layers)
    texts = list(dict.fromkeys(corpus.text_list()))
    tokens = story_tokens_for(corpus, texts, layers, args.max_folds)
    t0 = time.perf_counter()
    acts = collect(model, tok, texts, layers, pooling="mean", on_tokens=tokens.add)
    forward = time.perf_counter() - t0
    if args.save_pooled:
        torch.save({"texts": acts.texts, "layers": acts.layers, "pooled": acts.pooled, "n_tokens": acts.n_tokens},
                   args.save_pooled)
    t1 = time.perf_counter()
    pt = per_token(corpus, acts, tokens, "diffmean", max_folds=args.max_folds)
    folds = time.perf_counter() - t1
    print(table(pt), flush=True)
    body = "\n".join([
        f"Default model {info.name}, {len(corpus.concepts)} concepts, diffmean, mean pooling, layers {layers} "
        f"(z averaged over them, as the page does); {pt['stories']} held-out stories, {pt['tokens']} tokens "
        f"(first position left out); one forward {forward:.0f} s, every fold's refit and statistics {folds:.0f} s.", "",
        markdown(pt), "",
        "Smoothed: a causal moving average of the z-scores over the last N tokens before the argmax. "
        f"Valence track (the page's colour on a readout with tracks, as every build since issue 23 writes): "
        f"{pt['valence_direction']['source']}. Valence-colour AUC of a variant: the colour a readout without tracks "
        "gets (valence-weighted mean of z with centred weights). Both averaged over the story, positive- vs "
        "negative-valence stories.",
    ])
    if args.write:
        replace_block(DOC, "per-token", body)
        print(f"wrote {DOC}")


def steering_lines(model, tok, corpus, acts, layers) -> list[str]:
    """Steering efficacy of mean-pooled diffmean and denoised vectors at ``layers`` (one at a time)."""
    from amygdala.validity.steering import SteeringConfig, steering_efficacy
    from amygdala.readout import Readout

    out = ["| method | layer | strength (x residual norm) | concept | toward | mean VADER shift | moved as intended | perplexity |",
           "|---|---|---|---|---|---|---|---|"]
    valence = dict(zip(corpus.concepts, corpus.valence()))
    sets = concept_sets(corpus, acts)
    for method in ("diffmean", "denoised"):
        vectors = fit(method, acts, sets).vectors
        for l in layers:
            readout = Readout(list(corpus.concepts), [l], {l: vectors[l]})
            s = steering_efficacy(model, tok, readout, valence, SteeringConfig())
            c = s["chosen"]
            for name, r in c["concepts"].items():
                out.append(f"| {method} | {l} | {c['fraction']}{'' if c['fluent'] else ' (not fluent)'} | {name} | "
                           f"{r['direction']} | {r['mean_shift']:+.2f} | {100 * r['moved_share']:.0f}% | {r['perplexity']:.1f} |")
            print(f"  steering {method} L{l}: moved {c['mean_moved_share']:.0%}", flush=True)
    out.append(f"Unsteered: mean VADER compound {s['unsteered']['mean_compound']:+.2f}, perplexity "
               f"{s['unsteered']['perplexity']:.1f}; {len(s['prompts'])} prompts, greedy, 40 new tokens.")
    return out


if __name__ == "__main__":
    main()
