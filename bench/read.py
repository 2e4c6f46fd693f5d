"""Texts/s of `read --file` (scores and the table written) against the same model's plain batched forwards.

    ./dev bench read [--readout /tmp/full207/out] [--texts 200] [--batch-size 16] [--write]

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readout", type=Path, default=Path("/tmp/full207/out"))
    ap.add_argument("--texts", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--trials", type=int, default=2, help="interleaved runs of each; the fastest counts")
    ap.add_argument("--write", action="store_true", help="put the table into docs/read.md")
    args = ap.parse_args()
    readout = Readout.load(args.readout)
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
