"""Texts/s of `read --file` (scores and the table written) against the same model's plain batched forwards.

    ./dev bench read [--readout DIR] [--concepts 207] [--texts 200] [--batch-size 16] [--write]

The readout is ``--readout``, else the demo's (cached by ``amygdala demo``; built here when
missing, about 3 minutes). ``--concepts N`` widens it to N concepts by repeating its rows (names
suffixed): what the speed depends on is the readout's shape, concepts x layers, not its values,
so the full corpus's 207 concepts are timed without a 12-minute build.

On the default model, a few hundred bundled corpus texts in file order. The floor is the same
model, the same texts in the same batches (padded the same way), a forward with no hooks and
nothing written: what any reader of these texts must compute. ``read --file`` is timed through
:func:`amygdala.readout.dataset.score_file` with the model preloaded: tokenizing, the forward
with the readout's hooks, the z-scores, the per-text statistics and the fsynced jsonl table.
Both run --trials times (default 2), interleaved, and the faster of each counts, so a busy machine's noise hits both.
Target: read --file at 0.9x the floor or better.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from amygdala.corpus import bundled_corpus, load_corpus
from amygdala.models import load_model
from amygdala.pipeline import matching_model
from amygdala.readout import Readout
from amygdala.readout.dataset import score_file
from validity import publish  # bench/ is on the path when the bench runs

DOC = Path(__file__).resolve().parents[1] / "docs" / "read.md"


def floor(model, tok, texts: list[str], batch_size: int) -> float:
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(texts), batch_size):
            encoded = [tok(t)["input_ids"] for t in texts[b : b + batch_size]]
            width = max(map(len, encoded))
            ids = torch.full((len(encoded), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, e in enumerate(encoded):
                ids[j, : len(e)] = torch.tensor(e)
                mask[j, : len(e)] = 1
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    return time.perf_counter() - t0


def widened(readout: Readout, n: int) -> Readout:
    """``readout`` with ``n`` concepts: its rows (vectors and both statistics sets) repeated in
    turn, names suffixed ``_2``, ``_3``... The tracks are kept; per-concept metadata is dropped."""
    if n <= len(readout.concepts):
        return readout
    rows = [i % len(readout.concepts) for i in range(n)]
    names = [c if k < len(readout.concepts) else f"{c}_{k // len(readout.concepts) + 1}"
             for k, c in enumerate(readout.concepts[i] for i in rows)]

    def rep(per_layer):
        return None if per_layer is None else {l: t[rows] for l, t in per_layer.items()}

    per_concept = {k for k, v in readout.meta.items() if isinstance(v, list) and len(v) == len(readout.concepts)}
    return dataclasses.replace(readout, concepts=names, vectors=rep(readout.vectors), mean=rep(readout.mean),
                               std=rep(readout.std), emotional_mean=rep(readout.emotional_mean),
                               emotional_std=rep(readout.emotional_std),
                               meta={k: v for k, v in readout.meta.items() if k not in per_concept})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readout", type=Path, default=None, help="default: the demo's readout")
    ap.add_argument("--concepts", type=int, default=207, help="widen the readout to this many concepts (its rows repeated)")
    ap.add_argument("--texts", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--trials", type=int, default=2, help="interleaved runs of each; the fastest counts")
    ap.add_argument("--write", action="store_true", help="put the table into docs/read.md")
    args = ap.parse_args()
    if args.readout is None:
        from amygdala.pipeline.demo import demo_readout

        args.readout = Path(tempfile.mkdtemp()) / "demo"
        demo_readout(args.readout)
    readout = widened(Readout.load(args.readout), args.concepts)
    info = matching_model(readout, "default")
    model, tok, _ = load_model(info.path, "cpu", None)
    texts = [t.text for t in load_corpus(bundled_corpus()).texts][: args.texts]
    tokens = sum(len(tok(t)["input_ids"]) for t in texts)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "texts.jsonl"
        src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
        floor(model, tok, texts[: args.batch_size], args.batch_size)  # warm-up: first-call allocations
        base, read = [], []
        for trial in range(args.trials):
            base.append(floor(model, tok, texts, args.batch_size))
            t0 = time.perf_counter()
            score_file(model, tok, readout, src, Path(tmp) / f"out{trial}.jsonl", batch_size=args.batch_size)
            read.append(time.perf_counter() - t0)
    b, r = min(base), min(read)
    body = (f"| {info.name}, {len(readout.concepts)} concepts x {len(readout.layers)} layers, {len(texts)} texts "
            f"({tokens} tokens), batch {args.batch_size}, CPU {torch.get_num_threads()} threads | texts/s | vs floor |\n"
            "|---|---|---|\n"
            f"| forward floor (plain batched forwards) | {len(texts) / b:.1f} | 1.00x |\n"
            f"| `read --file` to jsonl | {len(texts) / r:.1f} | {b / r:.2f}x |")
    publish(DOC, "read", body, args.write)


if __name__ == "__main__":
    main()
