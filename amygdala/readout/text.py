"""Teacher-forced readout of a given text: per token, the top concepts per layer."""

from __future__ import annotations

import torch

from amygdala.readout.format import Readout
from amygdala.readout.runtime import attach


def top_concepts(row: torch.Tensor, concepts: list[str], k: int) -> list[tuple[str, float]]:
    """The ``k`` highest-scoring concepts of one [n_concepts] row, best first."""
    vals, idx = row.topk(min(k, len(concepts)))
    return [(concepts[i], float(v)) for v, i in zip(vals, idx)]


def read_text(model, tokenizer, readout: Readout, text: str, top: int = 3) -> list[dict]:
    """Per-token top concepts per layer (z-scores when the readout has statistics).

    Special tokens are left out. Position 0 is flagged ``attention_sink``: its residual norm is
    an outlier at every layer, so its scores are not comparable with the others'.
    """
    enc = tokenizer(text, return_tensors="pt").to(next(model.parameters()).device)
    with torch.inference_mode(), attach(model, readout) as session:
        model(**enc)
    scores = session.zscores() if readout.has_stats else session.scores()
    special = set(tokenizer.all_special_ids)
    rows = []
    for pos, tid in enumerate(enc["input_ids"][0].tolist()):
        if tid in special:
            continue
        rows.append({
            "position": pos,
            "token": tokenizer.decode([tid]),
            "attention_sink": pos == 0,
            "layers": {str(l): top_concepts(scores[0, pos, j], readout.concepts, top) for j, l in enumerate(readout.layers)},
        })
    return rows
