"""Teacher-forced readout of a given text: per token, the concept scores per layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from amygdala.readout.format import Readout
from amygdala.readout.runtime import attach


@dataclass
class TextScores:
    """Every token of a text with its scores: ``scores[i]`` is ``[n_layers, n_concepts]`` for
    ``tokens[i]`` (the block output at that token's own position), z-scored when ``zscore``."""

    tokens: list[str]
    positions: list[int]
    scores: torch.Tensor  # [n_tokens, n_layers, n_concepts]
    zscore: bool


def top_concepts(row: torch.Tensor, concepts: list[str], k: int) -> list[tuple[str, float]]:
    """The ``k`` highest-scoring concepts of one [n_concepts] row, best first."""
    vals, idx = row.topk(min(k, len(concepts)))
    return [(concepts[i], float(v)) for v, i in zip(vals, idx)]


def score_text(model, tokenizer, readout: Readout, text: str) -> TextScores:
    """One forward over ``text``; every non-special token with its full score matrix
    (z-scores when the readout has statistics)."""
    enc = tokenizer(text, return_tensors="pt").to(next(model.parameters()).device)
    with torch.inference_mode(), attach(model, readout) as session:
        model(**enc)
    scores = (session.zscores() if readout.has_stats else session.scores())[0].float().cpu()
    special = set(tokenizer.all_special_ids)
    ids = enc["input_ids"][0].tolist()
    keep = [pos for pos, tid in enumerate(ids) if tid not in special]
    return TextScores(
        tokens=[tokenizer.decode([ids[pos]]) for pos in keep],
        positions=keep,
        scores=scores[keep],
        zscore=readout.has_stats,
    )


def read_text(model, tokenizer, readout: Readout, text: str, top: int = 3) -> list[dict]:
    """Per-token top concepts per layer (z-scores when the readout has statistics).

    Special tokens are left out. Position 0 is flagged ``attention_sink``: its residual norm is
    an outlier at every layer, so its scores are not comparable with the others'.
    """
    return token_rows(score_text(model, tokenizer, readout, text), readout, top)


def token_rows(scored: TextScores, readout: Readout, top: int = 3) -> list[dict]:
    """:func:`read_text`'s rows from an already scored text."""
    return [
        {
            "position": pos,
            "token": token,
            "attention_sink": pos == 0,
            "layers": {str(l): top_concepts(scored.scores[i, j], readout.concepts, top) for j, l in enumerate(readout.layers)},
        }
        for i, (pos, token) in enumerate(zip(scored.positions, scored.tokens))
    ]
