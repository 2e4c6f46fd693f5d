"""Extraction cost against the floor of plain forward passes, measured in one run.

    ./dev bench extract [--layers 0.5,0.66] [--concepts 40]

The floor runs the same unique texts through the whole model (batched the same way, sorted by
length, no hooks). ``amygdala train`` (preloaded model, same texts) should cost no more than
1.15x the floor; with early stop at the deepest hooked layer it usually costs less. A second
line trains at the last layer, where early stop saves nothing, to show the hooks' own overhead.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from amygdala.corpus import bundled_corpus
from amygdala.activations import encode
from amygdala.corpus import load_corpus
from amygdala.pipeline import BuildConfig, build
from amygdala.models import load_model

CORPUS = bundled_corpus()


def plain_forwards(model, tok, texts: list[str], batch_size: int) -> float:
    encoded = sorted((encode(tok, t).ids for t in texts), key=len, reverse=True)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(encoded), batch_size):
            batch = encoded[b : b + batch_size]
            width = max(map(len, batch))
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, e in enumerate(batch):
                ids[j, : len(e)] = torch.tensor(e)
                mask[j, : len(e)] = 1
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="0.5,0.66")
    ap.add_argument("--concepts", type=int, default=0, help="first N concepts only (0: all)")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    corpus = load_corpus(CORPUS)
    if args.concepts:
        corpus = corpus.subset(corpus.concepts[: args.concepts])
    loaded = load_model("default", "cpu")
    model, tok, info = loaded
    texts = corpus.text_list()
    n_tokens = sum(len(encode(tok, t).ids) for t in texts)
    plain_forwards(model, tok, texts[:8], args.batch_size)  # warm-up

    floor = plain_forwards(model, tok, texts, args.batch_size)
    rows = [("plain forward (floor)", floor)]
    for layers in (args.layers, str(info.num_layers - 1)):
        t0 = time.perf_counter()
        build(corpus, BuildConfig(layers=layers, batch_size=args.batch_size, progress=False), loaded=loaded)
        rows.append((f"amygdala train, layers {layers}", time.perf_counter() - t0))

    print(f"default model {info.name}, {len(corpus.concepts)} concepts, {len(texts)} unique texts, "
          f"{n_tokens} tokens, torch threads {torch.get_num_threads()}")
    for name, secs in rows:
        print(f"{name:<36} {secs:7.1f} s  {n_tokens / secs:7.0f} tok/s  ratio {secs / floor:.2f}")


if __name__ == "__main__":
    main()
