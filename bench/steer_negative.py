"""Steering toward negative (and positive) concepts, judged by VADER, with confidence intervals.

    PYTHONPATH=$PWD python bench/steer_negative.py --pooled /tmp/fe/pooled.pt [--write]

The eval's steering check used 10 prompts (about 15 points of standard error). Here: 50 neutral
prompts x 3 sampling seeds, 30 new tokens, batched. Per prompt the VADER compound of the steered
text minus the unsteered one (same prompt, same seed), averaged over the seeds; "moved" is the
share of prompts whose mean shift has the intended sign, with a Wilson 95% interval over the 50
prompts (the prompt is the unit: seeds of one prompt are not independent).

Variants, each at the strongest strength (fraction of the mean residual norm) whose steered
texts' perplexity under the unsteered model stays within 2x the unsteered texts' (matched
perplexity): the diffmean vector at one layer (today), the mean-removed vector
(amygdala.readout.construction.remove_shared), a bipolar contrast (the concept minus an
opposite-valence, low-arousal anchor: terrified minus calm, as repeng trains), and the
mean-removed vector on the band of both readout layers.

The pooled rows come from ``bench/validity.py --per-token --save-pooled`` (the same forward), or
a forward here when no file is given.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from amygdala.activations import Activations, collect
from amygdala.corpus import bundled_corpus, load_corpus
from amygdala.methods import concept_sets, fit
from amygdala.models import load_model, parse_layers
from amygdala.readout import Readout, Steering, attach
from amygdala.readout.construction import remove_shared
from amygdala.validity.steering import _encode_prompts, _perplexity, _texts, _vader, residual_norm, wilson

DOC = Path(__file__).resolve().parents[1] / "docs" / "validity.md"
SUBJECTS = ("your day", "the street outside", "your morning", "a walk in town", "your kitchen", "the last meal you cooked",
            "your weekend plans", "a train journey", "the weather", "your neighbour", "a trip to the shops",
            "your desk", "a bus ride", "the local library", "a rainy afternoon", "your garden", "a phone call",
            "the office", "a cup of tea", "your commute", "a river", "an old building", "the park", "a market",
            "your bicycle")
PROMPTS = tuple(f"{verb} {s}." for s in SUBJECTS for verb in ("Tell me about", "Write two sentences about"))


def generate(model, tok, ids, mask, readout, steering, seed: int, new_tokens: int) -> torch.Tensor:
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    torch.manual_seed(seed)
    with torch.inference_mode(), attach(model, readout, steering=steering, record=False):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=True,
                             temperature=0.8, top_p=0.95, pad_token_id=pad)
    return out[:, ids.shape[1]:]


def run_variant(model, tok, ids, mask, readout, make, sign, fractions, norm, base, seeds, new_tokens, score, max_ratio):
    """The strongest fluent strength's figures for one steering variant (``make(strength)``)."""
    tried = []
    for frac in fractions:
        steer = make(frac * norm)
        shifts, ppls = [], []
        for s in seeds:
            new = generate(model, tok, ids, mask, readout, steer, s, new_tokens)
            shifts.append(score(_texts(tok, new)) - base["scores"][s])
            ppls.append(_perplexity(model, tok, ids, mask, new))
        per_prompt = torch.stack(shifts).mean(0)
        k = int(((per_prompt * sign) > 0).sum())
        ppl = sum(ppls) / len(ppls)
        tried.append({"fraction": frac, "moved": k / len(per_prompt), "ci": wilson(k, len(per_prompt)),
                      "mean_shift": float(per_prompt.mean()), "perplexity": ppl, "fluent": ppl <= max_ratio * base["ppl"]})
        if not tried[-1]["fluent"]:
            break  # stronger only breaks the text further
    fluent = [t for t in tried if t["fluent"]]
    return (fluent[-1] if fluent else tried[0]) | {"tried": tried}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pooled", type=Path, default=None)
    ap.add_argument("--layers", default="0.5,0.66")
    ap.add_argument("--concepts", default="terrified,sad,happy")
    ap.add_argument("--fractions", default="0.1,0.2,0.3")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--new-tokens", type=int, default=30)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()
    corpus = load_corpus(bundled_corpus())
    model, tok, info = load_model("default", "cpu")
    layers = parse_layers(args.layers, info.num_layers)
    if args.pooled:
        saved = torch.load(args.pooled)
        acts = Activations(saved["texts"], saved["layers"], saved["pooled"], saved["n_tokens"], pooling="mean")
    else:
        acts = collect(model, tok, corpus.text_list(), layers, pooling="mean")
    vectors = fit("diffmean", acts, concept_sets(corpus, acts)).vectors
    centred = {l: remove_shared(v)[0] for l, v in vectors.items()}
    concepts = list(corpus.concepts)
    readout = Readout(concepts, list(acts.layers), vectors)
    affect = corpus.affect
    one = [acts.layers[0]]
    prompts = PROMPTS[: args.prompts]
    ids, mask = _encode_prompts(tok, prompts, "cpu")
    vader = _vader()
    score = lambda texts: torch.tensor([vader.polarity_scores(t)["compound"] for t in texts])  # noqa: E731
    seeds = list(range(args.seeds))
    base = {"scores": {}, "ppl": 0.0}
    for s in seeds:
        new = generate(model, tok, ids, mask, readout, None, s, args.new_tokens)
        base["scores"][s] = score(_texts(tok, new))
        base["ppl"] += _perplexity(model, tok, ids, mask, new) / len(seeds)
    norm = residual_norm(model, Readout(concepts, one, {one[0]: vectors[one[0]]}), ids, mask)
    fractions = [float(x) for x in args.fractions.split(",")]
    lines = [f"Default model {info.name}, {len(prompts)} prompts x {len(seeds)} seeds (sampling, temperature 0.8, "
             f"top-p 0.95), {args.new_tokens} new tokens; unsteered mean VADER {float(torch.stack(list(base['scores'].values())).mean()):+.2f}, "
             f"perplexity {base['ppl']:.1f}; strengths {fractions} x mean residual norm {norm:.0f} at layer {one[0]}, "
             "the strongest with perplexity <= 2x unsteered kept.", "",
             "| concept | toward | variant | strength | moved the intended way (95% CI) | mean VADER shift | perplexity |",
             "|---|---|---|---|---|---|---|"]
    for name in args.concepts.split(","):
        i = concepts.index(name)
        sign = 1 if affect[name].valence > 0 else -1
        # Anchor: the opposite-valence concept with the lowest arousal (calm for the negatives).
        anchor = min((a.arousal, c) for c, a in affect.items() if a and a.valence * sign < 0)[1]
        j = concepts.index(anchor)
        variants = {
            f"diffmean, layer {one[0]}": lambda st: Steering.from_vector(vectors[one[0]][i], st, one),
            f"mean removed, layer {one[0]}": lambda st: Steering.from_vector(centred[one[0]][i], st, one),
            f"bipolar {name} - {anchor}, layer {one[0]}":
                lambda st: Steering.from_vector(vectors[one[0]][i] - vectors[one[0]][j], st, one),
            f"mean removed, layers {acts.layers}":
                lambda st: sum((Steering.from_vector(centred[l][i], st, [l]) for l in acts.layers), Steering()),
        }
        for label, make in variants.items():
            r = run_variant(model, tok, ids, mask, readout, make, sign, fractions, norm, base, seeds,
                            args.new_tokens, score, 2.0)
            lo, hi = r["ci"]
            lines.append(f"| {name} | {'positive' if sign > 0 else 'negative'} | {label} | {r['fraction']}"
                         f"{'' if r['fluent'] else ' (not fluent)'} | {100 * r['moved']:.0f}% ({100 * lo:.0f}-{100 * hi:.0f}%) | "
                         f"{r['mean_shift']:+.3f} | {r['perplexity']:.1f} |")
            print(lines[-1], f"[{time.perf_counter() - t0:.0f} s]", flush=True)
    from validity import publish  # bench/validity.py, beside this file

    publish(DOC, "steer-negative", "\n".join(lines), args.write)


if __name__ == "__main__":
    main()
