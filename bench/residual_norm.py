"""The default model's residual norm after each block: the scale a steering strength is measured in.

    ./dev bench residual_norm [--layers 0.5,0.66] [--texts 40]

`--steer calm=S` adds S times a unit vector to the block output, so what S does depends on the
norm of the residual stream it is added to: 4 is noise on a stream whose norm is in the
hundreds. This prints the median (and quartiles) of the per-token residual norm at the given
layers over the bundled corpus's neutral texts (the first position left out: the attention sink's
norm is an outlier), and the strengths that are 2%, 5% and 10% of it.
"""

from __future__ import annotations

import argparse

import torch

from amygdala.corpus import bundled_corpus, load_corpus
from amygdala.models import find_layers, load_model
from amygdala.models.layers import block_output, parse_layers


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--layers", default="0.5,0.66", help="the build's and the demo's default")
    ap.add_argument("--texts", type=int, default=40)
    args = ap.parse_args()
    model, tok, info = load_model(args.model, "cpu")
    layers = parse_layers(args.layers, info.num_layers)
    texts = [t.text for t in load_corpus(bundled_corpus()).neutral_texts()][: args.texts]
    norms: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    blocks = find_layers(model)
    hooks = [blocks[l].register_forward_hook(lambda _m, _a, out, l=l: norms[l].append(block_output(out)[0, 1:].norm(dim=-1)))
             for l in layers]
    with torch.no_grad():
        for text in texts:
            model(**tok(text, return_tensors="pt"))
    for h in hooks:
        h.remove()
    print(f"{info.name}, {len(texts)} neutral texts of the bundled corpus, per-token residual norm after the block:")
    for l in layers:
        v = torch.cat(norms[l]).float()
        q1, med, q3 = (float(v.quantile(q)) for q in (0.25, 0.5, 0.75))
        print(f"  layer {l}: median {med:.1f} (quartiles {q1:.1f}-{q3:.1f}); 2% = {0.02 * med:.1f}, 5% = {0.05 * med:.1f}, 10% = {0.1 * med:.1f}")


if __name__ == "__main__":
    main()
