"""Cost of the quality report beyond the forward passes, measured in one run.

    ./dev bench quality [--concepts 200] [--layers 4] [--real]

Synthetic part (always): activations of the default model's shape (hidden 576, 9 heads, 1536
MLP neurons) for ``--concepts`` concepts x ``--layers`` layers, 4 positive texts per concept plus
neutral texts, 14 clusters; times the metrics (quality.json) and the HTML with its plots. The
issue's budget is one minute on CPU for 200 concepts x 4 layers.

``--real``: the default model on the bundled corpus. Times ``build`` without the report (the
baseline forward), ``build`` with the extra captures the report reads (same forward: the ratio
is the captures' overhead) and the report itself, and prints the triage table.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from amygdala.corpus import bundled_corpus
from amygdala.methods import ConceptSets
from amygdala.quality.config import QualityConfig
from amygdala.quality.html import render
from amygdala.quality.report import QualityInputs, compute, triage_table

CORPUS = bundled_corpus()
HIDDEN, HEADS, NEURONS = 576, 9, 1536


def synthetic_inputs(n_concepts: int, n_layers: int, per_concept: int = 4, neutral: int = 30) -> QualityInputs:
    """Random activations with some structure (each concept a direction plus per-text noise,
    clusters sharing a component) so every metric and plot has real work to do."""
    g = torch.Generator().manual_seed(0)
    n_texts = n_concepts * per_concept + neutral
    owner = torch.arange(n_concepts).repeat_interleave(per_concept)
    clusters = [f"cluster_{i % 14}" for i in range(n_concepts)]
    layers = list(range(10, 10 + 3 * n_layers, 3))
    positives = [torch.arange(c * per_concept, (c + 1) * per_concept) for c in range(n_concepts)]
    everything = torch.arange(n_texts)
    negatives = [everything[~torch.isin(everything, p)] for p in positives]
    centre = torch.randn(14, HIDDEN, generator=g)
    pooled, vectors, heads, neurons, down = {}, {}, {}, {}, {}
    for l in layers:
        concept_dir = torch.randn(n_concepts, HIDDEN, generator=g) + centre[torch.arange(n_concepts) % 14]
        x = torch.randn(n_texts, HIDDEN, generator=g)
        x[: n_concepts * per_concept] += 2 * concept_dir[owner]
        pooled[l] = x
        vectors[l] = torch.stack([x[p].mean(0) - x[n].mean(0) for p, n in zip(positives, negatives)])
        heads[l] = torch.randn(n_texts, HIDDEN, generator=g)
        neurons[l] = torch.randn(n_texts, NEURONS, generator=g)
        down[l] = torch.randn(HIDDEN, NEURONS, generator=g)
    concepts = [f"concept_{i}" for i in range(n_concepts)]
    return QualityInputs(
        concepts=concepts, clusters=clusters, layers=layers, vectors=vectors, pooled=pooled,
        sets=ConceptSets(concepts, positives, negatives), text_names=[f"stories/x.txt:{i}" for i in range(n_texts)],
        heads=heads, n_heads=HEADS, neurons=neurons, down=down,
        eigvals={l: torch.rand(n_concepts, 20, generator=g).sort(dim=1, descending=True).values for l in layers},
    )


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bench_synthetic(n_concepts: int, n_layers: int) -> None:
    cfg = QualityConfig()
    inputs = synthetic_inputs(n_concepts, n_layers)
    report, t_metrics = timed(lambda: compute(inputs, cfg))
    page, t_html = timed(lambda: render(report, cfg))
    total = t_metrics + t_html
    print(f"synthetic: {n_concepts} concepts x {n_layers} layers, hidden {HIDDEN}, {HEADS} heads, {NEURONS} neurons, "
          f"{len(inputs.text_names)} texts, torch threads {torch.get_num_threads()}")
    print(f"  metrics (quality.json)   {t_metrics:6.1f} s")
    print(f"  report.html with plots   {t_html:6.1f} s  ({len(page) / 1e6:.1f} MB)")
    print(f"  total                    {total:6.1f} s  = {total / 60:.2f} of the 60 s budget")


def bench_real(layers: str) -> None:
    from amygdala.corpus import load_corpus
    from amygdala.pipeline import BuildConfig, build
    from amygdala.models import load_model
    from amygdala.quality.run import from_build, write

    corpus = load_corpus(CORPUS)
    loaded = load_model("default", "cpu")
    cfg = QualityConfig()
    build(corpus.subset(corpus.concepts[:4]), BuildConfig(layers=layers, progress=False), loaded=loaded)  # warm-up
    _, t_plain = timed(lambda: build(corpus, BuildConfig(layers=layers, progress=False), loaded=loaded))
    result, t_sites = timed(lambda: build(corpus, BuildConfig(layers=layers, progress=False, quality_sites=True), loaded=loaded))
    report, t_metrics = timed(lambda: from_build(result, corpus, cfg))
    with tempfile.TemporaryDirectory() as tmp:
        _, t_write = timed(lambda: write(report, cfg, tmp))
    print(f"real: default model, {len(corpus.concepts)} concepts, layers {result.readout.layers}, "
          f"{len(result.activations.texts)} texts")
    print(f"  build (baseline forward)          {t_plain:6.1f} s")
    print(f"  build with the report's captures  {t_sites:6.1f} s  ratio {t_sites / t_plain:.2f}")
    print(f"  metrics                           {t_metrics:6.1f} s  ratio {t_metrics / t_plain:.2f}")
    print(f"  quality.json + report.html        {t_write:6.1f} s  ratio {t_write / t_plain:.2f}")
    print(triage_table(report))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concepts", type=int, default=200)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--real", action="store_true", help="also run the default model on the bundled corpus")
    ap.add_argument("--real-layers", default="0.33,0.5,0.66,0.83", help="layers of the --real run")
    args = ap.parse_args()
    bench_synthetic(args.concepts, args.layers)
    if args.real:
        bench_real(args.real_layers)


if __name__ == "__main__":
    main()
