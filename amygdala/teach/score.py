"""Concept scores of generated text and of given text, from the served readout or a local one.

A continuation's score for a set of targets (``{"calm": 1, "anxious": -1}``) is the weighted
sum over targets of the concept's readout (z-score when the readout has neutral-text
statistics), averaged over the readout's layers and the continuation's tokens. Each row is the
reading at the position that sampled the token (see docs/serve.md), so the score describes the
state the model was in while it wrote the continuation.

Given text (notes nobody tagged) is scored two ways: by the server, reading the position after
the text's last token (one generated token; the served readout covers generated tokens only,
so this is last-token pooling), or locally with a transformers model and a readout file,
averaged over every token of the text (mean pooling). Both give one number per concept.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from amygdala.teach.client import Server


def concept_means(rows: Sequence[Sequence[Sequence[float]]], concepts: Sequence[str], names: Sequence[str]) -> dict[str, float]:
    """Per named concept: the mean over tokens and layers of its column in ``rows`` ([token][layer][concept])."""
    if not rows:
        return {n: float("nan") for n in names}
    out = {}
    for name in names:
        j = concepts.index(name)
        vals = [layer[j] for row in rows for layer in row]
        out[name] = sum(vals) / len(vals)
    return out


def weighted(means: Mapping[str, float], targets: Mapping[str, float]) -> float:
    return sum(w * means[c] for c, w in targets.items())


def served_text_scores(server: Server, encoder, texts: Sequence[str], concepts: Sequence[str]) -> list[dict[str, float]]:
    """Per text: the served readout of ``concepts`` after its last token (last-token pooling)."""
    names = server.manifest()["concepts"]
    out = []
    for text in texts:
        ids = list(encoder.tokenizer(text)["input_ids"])
        gen = server.generate(ids, 1, temperature=0.0)[0]
        out.append(concept_means(gen.rows[:1], names, concepts))
    return out


def local_text_scores(readout_dir, model: str, texts: Sequence[str], concepts: Sequence[str]) -> list[dict[str, float]]:
    """Per text: a local readout of ``concepts`` averaged over the text's tokens (mean pooling)."""
    import torch

    from amygdala.models import load_model
    from amygdala.readout import Readout, attach

    readout = Readout.load(readout_dir)
    for c in concepts:
        readout.concept_index(c)  # an unknown concept fails before the model loads
    loaded, tokenizer, _ = load_model(model, None)
    device = next(loaded.parameters()).device
    out = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"].to(device)
        with torch.inference_mode(), attach(loaded, readout) as session:
            loaded(ids)
        scores = session.zscores() if readout.has_stats else session.scores()  # [1, positions, layers, concepts]
        rows = scores[0, 1:] if scores.shape[1] > 1 else scores[0]  # position 0 is an attention sink
        out.append({c: float(rows[:, :, readout.concept_index(c)].mean()) for c in concepts})
    return out
