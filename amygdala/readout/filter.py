"""A readout you can filter: some concepts (by name or cluster), some layers, the top k, a summary.

Why one module: the server's ``"readout": {"concepts": ..., "top_k": ...}`` and ``amygdala read
--concepts``/``generate --concepts`` must select the same thing, so both turn a readout's rows
``[n_layers, n_concepts]`` into the selected slice here and nowhere else. Selection happens after
the scores are computed (one matmul over every concept either way): a filter changes what a
client receives, not what the model does.

Names are checked against the readout with the nearest valid names in the error, as a ``steer``
concept is; every error is a :class:`amygdala.fields.FieldError` whose path is the request field
(``readout.concepts``) or, from the CLI, the flag.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from amygdala.fields import FieldError, is_int, short
from amygdala.readout.format import Readout, ReadoutError
from amygdala.readout.text import TextScores, token_rows


@dataclass(frozen=True)
class ReadoutFilter:
    """What to keep of a readout's rows: positions into ``readout.concepts`` and ``readout.layers``
    (in the readout's order), and per token the ``top_k`` highest of those concepts; ``summary``
    asks for the mean and max per kept concept over a response instead of per-token rows."""

    concepts: tuple[int, ...]
    layers: tuple[int, ...]
    names: tuple[str, ...]
    layer_ids: tuple[int, ...]
    top_k: int | None = None
    summary: bool = False

    @classmethod
    def everything(cls, readout: Readout) -> ReadoutFilter:
        return cls(tuple(range(len(readout.concepts))), tuple(range(len(readout.layers))),
                   tuple(readout.concepts), tuple(readout.layers))

    @classmethod
    def build(cls, readout: Readout, *, concepts: Sequence[str] | None = None, clusters: Sequence[str] | None = None,
              layers: Sequence[int] | None = None, top_k: int | None = None, summary: bool = False,
              where: dict[str, str] | None = None) -> ReadoutFilter:
        """The filter of these options; ``where`` renames the fields in errors (the CLI's flags).

        ``concepts`` and ``clusters`` add up (a concept named and in a named cluster is kept once);
        neither: every concept. ``layers`` are the model's layer numbers, each one of the readout's.
        """
        name = {"concepts": "concepts", "clusters": "clusters", "layers": "layers", "top_k": "top_k", **(where or {})}
        keep: set[int] = set()
        for concept in concepts or ():
            try:
                keep.add(readout.concept_index(concept))
            except ReadoutError as e:
                raise FieldError(name["concepts"], str(e)) from None
        if clusters:
            keep |= _cluster_members(readout, clusters, name["clusters"])
        picked = tuple(sorted(keep)) if (concepts or clusters) else tuple(range(len(readout.concepts)))
        if layers:
            missing = [l for l in layers if l not in readout.layers]
            if missing:
                raise FieldError(name["layers"], f"layer {short(missing[0])} is not one of the readout's layers {readout.layers}")
            rows = tuple(sorted({readout.layers.index(l) for l in layers}))
        else:
            rows = tuple(range(len(readout.layers)))
        if top_k is not None and not (is_int(top_k) and 1 <= top_k <= len(picked)):
            raise FieldError(name["top_k"], f"must be an integer from 1 to {len(picked)} (the concepts selected), got {short(top_k)}")
        return cls(picked, rows, tuple(readout.concepts[i] for i in picked), tuple(readout.layers[j] for j in rows),
                   top_k, summary)

    def slice(self, row: np.ndarray) -> np.ndarray:
        """``[n_layers, n_concepts]`` (or ``[tokens, n_layers, n_concepts]``) to the kept layers and concepts."""
        return row[..., list(self.layers), :][..., list(self.concepts)]

    def layer_slice(self, row: np.ndarray) -> np.ndarray:
        """Only the kept layers of a ``[n_layers, ...]`` row (the tracks: every track is kept)."""
        return row[list(self.layers)]

    def top(self, row: np.ndarray) -> list[list[list[Any]]]:
        """Per kept layer the ``top_k`` kept concepts of a row as ``[name, value]``, highest first
        (ties: the readout's order)."""
        part = self.slice(row)
        k = self.top_k or len(self.concepts)
        order = np.argsort(-part, axis=-1, kind="stable")[..., :k]
        return [[[self.names[i], float(part[j, i])] for i in order[j]] for j in range(part.shape[0])]

    def summarize(self, rows: Sequence[np.ndarray | None]) -> dict:
        """Mean and max per kept layer and concept over the rows that came (``[n_layers][n_concepts]``
        each, in :attr:`names` order), and how many tokens they cover."""
        got = [self.slice(r) for r in rows if r is not None]
        if not got:
            return {"tokens": 0, "mean": None, "max": None}
        stack = np.stack(got)
        return {"tokens": len(got), "mean": stack.mean(0).tolist(), "max": stack.max(0).tolist()}

    def apply(self, scored: TextScores) -> TextScores:
        """A scored text reduced to the kept layers and concepts (the tracks: the kept layers). It
        keeps no readout: the readout's manifest no longer describes its columns."""
        return replace(scored, scores=scored.scores[:, list(self.layers)][:, :, list(self.concepts)],
                       tracks=None if scored.tracks is None else scored.tracks[:, list(self.layers)], readout=None)

    def summary_of(self, scored: TextScores) -> dict:
        """:meth:`summarize` over a scored text's tokens, the attention sink (position 0, whose
        score is not comparable) left out: what ``read --summary`` prints, shaped as the server's
        ``readout_summary``."""
        rows = [None if pos == 0 else scored.scores[i].numpy() for i, pos in enumerate(scored.positions)]
        return self.summarize(rows)

    def describe(self) -> dict:
        """What a filtered response holds, so a client reads its values without the manifest."""
        out: dict = {"concepts": list(self.names), "layers": list(self.layer_ids)}
        if self.top_k is not None:
            out["top_k"] = self.top_k
        if self.summary:
            out["summary"] = True
        return out


@dataclass(frozen=True)
class _Kept:
    """The names :func:`amygdala.readout.token_rows` reads off a readout, for the kept slice."""

    concepts: list[str]
    layers: list[int]


def text_rows(scored: TextScores, readout: Readout, filt: ReadoutFilter | None, top: int = 3) -> list[dict]:
    """``token_rows`` of a scored text (``amygdala read``/``generate``), of the filter's slice
    when there is one: the top ``top`` of the kept concepts at each kept layer."""
    if filt is None:
        return token_rows(scored, readout, top)
    return token_rows(filt.apply(scored), _Kept(list(filt.names), list(filt.layer_ids)), top)  # type: ignore[arg-type]


def _cluster_members(readout: Readout, clusters: Sequence[str], field: str) -> set[int]:
    info = readout.concept_info("clusters")
    if info is None:
        raise FieldError(field, "this readout records no clusters per concept; select concepts by name")
    known = sorted({c for c in info if isinstance(c, str)})  # a file's null entries name no cluster
    members: set[int] = set()
    for cluster in clusters:
        if cluster not in known:
            near = difflib.get_close_matches(str(cluster), known, n=3, cutoff=0.0)
            raise FieldError(field, f"unknown cluster {short(cluster)}; nearest: {', '.join(near)}")
        members |= {i for i, c in enumerate(info) if c == cluster}
    return members
