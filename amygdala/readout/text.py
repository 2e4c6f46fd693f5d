"""Teacher-forced readout of a given text: per token, the concept scores per layer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from amygdala.readout.format import Readout
from amygdala.readout.runtime import attach

#: ``read --smooth``'s default and the live page's (the server's manifest carries it as ``smooth``):
#: a causal moving average over the last N tokens. Eight, from the per-token eval (docs/validity.md,
#: mean-removed vectors, emotional statistics, 2264 held-out stories): token cluster top-1 17.0%
#: unsmoothed, 20.0% over 4 tokens, 21.8% over 8.
DEFAULT_SMOOTH = 8


@dataclass
class TextScores:
    """Every token of a text with its scores: ``scores[i]`` is ``[n_layers, n_concepts]`` for
    ``tokens[i]`` (the block output at that token's own position), z-scored when ``zscore``."""

    tokens: list[str]
    positions: list[int]
    scores: torch.Tensor  # [n_tokens, n_layers, n_concepts]
    zscore: bool
    #: Which statistics the z-scores use (``neutral`` / ``emotional``), ``None`` for raw scores.
    against: str | None = None
    #: The readout's track names and per token their z-scores over neutral text [n_tokens, n_layers, n_tracks].
    track_names: list[str] | None = None
    tracks: torch.Tensor | None = None
    smooth: int = 1
    #: The text and the readout that scored it, where known (:func:`score_text` sets both): what
    #: the Jupyter view needs to draw the page (the manifest names the concepts and layers).
    text: str | None = None
    readout: Readout | None = field(default=None, repr=False, compare=False)

    def _repr_html_(self) -> str | None:
        """In Jupyter, the same page ``amygdala read --html`` writes (the live page's offline
        snapshot: tokens coloured by valence, the per-layer panel, the statistics switch), in a
        sandboxed frame. ``None`` (the plain repr) for scores without their readout and text."""
        if self.readout is None or self.text is None:
            return None
        from amygdala.view import conversation_of_text, notebook_html

        model = self.readout.meta.get("model")
        name = str(model.get("name") or "") if isinstance(model, dict) else ""
        return notebook_html(conversation_of_text(self.readout, self, text=self.text, model=name))


def smooth_causal(x: torch.Tensor, n: int, skip: torch.Tensor | None = None) -> torch.Tensor:
    """A causal moving average over the last ``n`` rows of ``x`` [tokens, ...]: row i is the mean of
    rows max(0, i-n+1)..i. Rows where ``skip`` [tokens] is true (the attention sink) enter no
    window and are kept as they are, so the sink's outlier never leaks into its neighbours."""
    if n < 1:
        raise ValueError(f"smoothing window must be at least 1 token, got {n}")
    if n == 1 or x.shape[0] == 0:
        return x.clone()
    keep = torch.ones(x.shape[0], dtype=torch.bool) if skip is None else ~skip
    out = x.clone()
    flat = x[keep]
    csum = torch.cat([torch.zeros_like(flat[:1]), flat.cumsum(0)])
    idx = torch.arange(flat.shape[0])
    lo = (idx - n + 1).clamp_min(0)
    counts = (idx - lo + 1).to(flat.dtype).reshape(-1, *([1] * (flat.dim() - 1)))
    out[keep] = (csum[idx + 1] - csum[lo]) / counts
    return out


def top_concepts(row: torch.Tensor, concepts: list[str], k: int) -> list[tuple[str, float]]:
    """The ``k`` highest-scoring concepts of one [n_concepts] row, best first."""
    vals, idx = row.topk(min(k, len(concepts)))
    return [(concepts[i], float(v)) for v, i in zip(vals, idx)]


def score_text(model, tokenizer, readout: Readout, text: str, against: str | None = None, smooth: int = 1) -> TextScores:
    """One forward over ``text``; every non-special token with its full score matrix
    (z-scores with the statistics ``against`` when the readout has statistics, default the
    file's), the tracks' z-scores where the file has tracks, each smoothed causally over the last
    ``smooth`` tokens. Position 0 (the attention sink) is in no smoothing window."""
    if readout.has_stats:
        readout.stats_for(against)  # an unknown or missing set fails before the forward
    enc = tokenizer(text, return_tensors="pt").to(next(model.parameters()).device)
    with torch.inference_mode(), attach(model, readout) as session:
        model(**enc)
    scores = (session.zscores(against) if readout.has_stats else session.scores())[0].float().cpu()
    tracks = session.track_zscores()
    special = set(tokenizer.all_special_ids)
    ids = enc["input_ids"][0].tolist()
    keep = [pos for pos, tid in enumerate(ids) if tid not in special]
    sink = torch.tensor([pos == 0 for pos in keep], dtype=torch.bool)
    tracks = None if tracks is None else smooth_causal(tracks[0].float().cpu()[keep], smooth, sink)
    return TextScores(
        tokens=[tokenizer.decode([ids[pos]]) for pos in keep],
        positions=keep,
        scores=smooth_causal(scores[keep], smooth, sink),
        zscore=readout.has_stats,
        against=(against or readout.default_statistics) if readout.has_stats else None,
        track_names=list(readout.track_names) or None,
        tracks=tracks,
        smooth=smooth,
        text=text,
        readout=readout,
    )


def read_text(model, tokenizer, readout: Readout, text: str, top: int = 3) -> list[dict]:
    """Per-token top concepts per layer (z-scores when the readout has statistics).

    Special tokens are left out. Position 0 is flagged ``attention_sink``: its residual norm is
    an outlier at every layer, so its scores are not comparable with the others'.
    """
    return token_rows(score_text(model, tokenizer, readout, text), readout, top)


def token_rows(scored: TextScores, readout: Readout, top: int = 3) -> list[dict]:
    """:func:`read_text`'s rows from an already scored text; each row carries the tracks
    (``emotionality``, ``valence``: z over neutral text, averaged over the layers) where the file has them."""
    rows = []
    for i, (pos, token) in enumerate(zip(scored.positions, scored.tokens)):
        row = {
            "position": pos,
            "token": token,
            "attention_sink": pos == 0,
            "layers": {str(l): top_concepts(scored.scores[i, j], readout.concepts, top) for j, l in enumerate(readout.layers)},
        }
        if scored.tracks is not None:
            row["tracks"] = {name: round(float(scored.tracks[i, :, k].mean()), 3) for k, name in enumerate(scored.track_names)}
        rows.append(row)
    return rows
