"""Build cost against two floors measured in the same run: the whole model, and the honest one.

    ./dev bench extract [--layers 0.5,0.66] [--concepts 40] [--methods diffmean,denoised,...] [--write]

Floors (same texts, same length-sorted batches, no hooks):
- full: the whole model, output layer included (a 49k-word vocabulary on the default model);
- cut: the same model with its decoder cut after the deepest hooked layer and no output layer,
  which is the least any extraction must compute. ``amygdala build`` should stay within 1.10x of it.
``build`` is timed end to end with a preloaded model (the forward with pooling and the neutral
statistics, then the fit) for each pooling; every other method reuses those activations, so
its figure is the build's forward plus its own fit.
"""

from __future__ import annotations

import argparse
import time

import torch

from amygdala.activations import encode
from amygdala.corpus import bundled_corpus, load_corpus
from amygdala.methods import METHODS, concept_sets, fit
from amygdala.models import find_layers, load_model, parse_layers
from amygdala.pipeline import BuildConfig, build


def batches(tok, texts: list[str], batch_size: int):
    encoded = sorted((encode(tok, t).ids for t in texts), key=len, reverse=True)
    for b in range(0, len(encoded), batch_size):
        batch = encoded[b : b + batch_size]
        width = max(map(len, batch))
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, e in enumerate(batch):
            ids[j, : len(e)] = torch.tensor(e)
            mask[j, : len(e)] = 1
        yield ids, mask


def full_floor(model, tok, texts, batch_size) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for ids, mask in batches(tok, texts, batch_size):
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    return time.perf_counter() - t0


def cut_floor(model, tok, texts, batch_size, deepest: int) -> float:
    """The decoder up to ``deepest`` only (layers after it removed for the run), no output layer."""
    blocks = find_layers(model)
    holder = model.model
    kept = holder.layers
    holder.layers = torch.nn.ModuleList(list(blocks[: deepest + 1]))
    try:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for ids, mask in batches(tok, texts, batch_size):
                holder(input_ids=ids, attention_mask=mask, use_cache=False)
        return time.perf_counter() - t0
    finally:
        holder.layers = kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="0.5,0.66")
    ap.add_argument("--concepts", type=int, default=0, help="first N concepts only (0: all)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--poolings", default="mean,last")
    ap.add_argument("--methods", default="diffmean,denoised,mean,pca,linear,logistic")
    args = ap.parse_args()

    corpus = load_corpus(bundled_corpus())
    if args.concepts:
        corpus = corpus.subset(corpus.concepts[: args.concepts])
    loaded = load_model("default", "cpu")
    model, tok, info = loaded
    layers = parse_layers(args.layers, info.num_layers)
    texts = list(dict.fromkeys(corpus.text_list()))
    n_tokens = sum(len(encode(tok, t).ids) for t in texts)
    full_floor(model, tok, texts[:8], args.batch_size)  # warm-up

    full = full_floor(model, tok, texts, args.batch_size)
    cut = cut_floor(model, tok, texts, args.batch_size, max(layers))
    rows = [("floor: whole model with output layer", full), (f"floor: cut after layer {max(layers)}, no output layer", cut)]
    result = None
    for pooling in args.poolings.split(","):
        t0 = time.perf_counter()
        result = build(corpus, BuildConfig(layers=args.layers, pooling=pooling, batch_size=args.batch_size, progress=False),
                       loaded=loaded)
        rows.append((f"amygdala build --pooling {pooling} (diffmean)", time.perf_counter() - t0))
    # The last build's activations serve every method: its forward time + the method's own fit.
    acts = result.activations
    forward = rows[-1][1]
    sets = concept_sets(corpus, acts)
    t0 = time.perf_counter()
    fit("diffmean", acts, sets)
    base_fit = time.perf_counter() - t0
    for method in [m for m in args.methods.split(",") if m in METHODS and not METHODS[m].needs_tokens]:
        t0 = time.perf_counter()
        fit(method, acts, sets)
        rows.append((f"  --method {method} ({acts.pooling} pooling)", forward - base_fit + time.perf_counter() - t0))

    print(f"default model {info.name}, {len(corpus.concepts)} concepts, {len(texts)} unique texts, {n_tokens} tokens, "
          f"layers {layers}, torch threads {torch.get_num_threads()}")
    print(f"{'':<52} {'s':>7} {'tok/s':>7} {'x full':>7} {'x cut':>7}")
    for name, secs in rows:
        print(f"{name:<52} {secs:7.1f} {n_tokens / secs:7.0f} {secs / full:7.2f} {secs / cut:7.2f}")


if __name__ == "__main__":
    main()
