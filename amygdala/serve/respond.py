"""Putting score rows into vLLM's responses: ``choices[i].readout``.

Non-streaming: ``readout`` is ``[n_tokens][n_layers][n_concepts]``, one matrix per generated
token of the choice. Streaming: each chunk's ``readout`` is the ``[n_layers][n_concepts]`` matrix
of the token the chunk carries. vLLM merges steps into one chunk when the client reads slower
than the model generates (or ``stream_interval`` > 1); such a chunk's ``readout`` is its last
token's matrix and ``readout_tokens`` lists all of them, so no token's scores are lost.

With ``readout_prompt``, each choice (its first chunk, when streaming) also carries
``prompt_tokens`` and ``prompt_readout``, one matrix per prompt token (null for the first).

A readout with tracks (``emotionality``, ``valence``: files built since issue 23) adds the same
per token for them beside every ``readout``: ``tracks`` (``[n_layers][n_tracks]`` per token, in the
manifest's ``tracks`` order; a list of them non-streaming), ``tracks_tokens`` beside
``readout_tokens`` and ``prompt_tracks`` beside ``prompt_readout``. Raw projections with
``"readout": true``, z over neutral text with ``"zscore"`` (the tracks' statistics are always
neutral: "how emotional is this token compared with plain prose"). Older files: no track fields.

A filtered readout (``"readout": {"concepts": ..., "top_k": ...}``, amygdala.readout.filter)
keeps only its slice of each row here, after the worker's full matmul: the choice (its first chunk,
when streaming) carries ``readout_select``, what the values are; ``top_k`` turns each token's
matrix into ``[name, value]`` pairs per layer; ``summary`` replaces the per-token rows with one
``readout_summary`` (mean and max) in the chunk that ends the choice. No filter: as above, unchanged.

To know how many tokens a streamed chunk carries, the route asks vLLM for ``token_ids`` in the
chunks (``return_token_ids``) and strips them again here when the client did not ask for them.
Streamed completions with ``echo`` can't do that (vLLM then drops the echoed text), so there a
chunk takes every row its choice has accumulated: vLLM builds a prompt's chunk from one engine
step without yielding to the event loop, so these are exactly the chunk's tokens.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import numpy as np

from amygdala.readout import Readout
from amygdala.readout.filter import ReadoutFilter
from amygdala.serve.proxy import Exchange, Row

try:  # vLLM depends on msgspec; its JSON is ~10x faster than json's for chunks of floats
    import msgspec

    _decode, _encode = msgspec.json.Decoder().decode, msgspec.json.Encoder().encode
except ImportError:  # pragma: no cover
    _decode, _encode = json.loads, lambda obj: json.dumps(obj, separators=(",", ":")).encode()


class Formatter:
    """Rows to JSON lists, raw or z-scored with the readout's default statistics (the file's
    ``statistics.default``: emotional text for new builds, neutral for older files), the same
    set ``amygdala read`` uses and the manifest's ``mean``/``std`` carry.

    A worker row is ``[n_layers, n_concepts + n_tracks]`` (amygdala.serve.hooks reads the tracks in
    the same matmul): :meth:`row` gives the concept part, :meth:`tracks` the track part."""

    def __init__(self, readout: Readout):
        self.n_concepts = len(readout.concepts)
        self.has_tracks = bool(readout.track_names)
        self.mean = self.std = None
        if readout.has_stats:
            mean, std = readout.stats_for(None)
            self.mean = np.stack([mean[l].numpy() for l in readout.layers])
            self.std = np.maximum(np.stack([std[l].numpy() for l in readout.layers]), 1e-6)
        if self.has_tracks:  # Readout.track_zscore's statistics: neutral text, std floored alike
            self.track_mean = np.stack([readout.track_mean[l].numpy() for l in readout.layers])
            self.track_std = np.maximum(np.stack([readout.track_std[l].numpy() for l in readout.layers]), 1e-6)

    def values(self, row: Row | None, mode: str) -> Row | None:
        """The row's concept part ``[n_layers, n_concepts]``, z-scored with ``zscore``."""
        if row is None:
            return None
        row = row[:, : self.n_concepts]
        return (row - self.mean) / self.std if mode == "zscore" else row

    def row(self, row: Row | None, mode: str, filt: ReadoutFilter | None = None) -> list | None:
        """A token's ``readout``: the whole matrix, or the filter's slice (its top k as
        ``[name, value]`` pairs per layer with ``top_k``)."""
        values = self.values(row, mode)
        if values is None:
            return None
        if filt is None:
            return values.tolist()
        return filt.top(values) if filt.top_k is not None else filt.slice(values).tolist()

    def tracks(self, row: Row | None, mode: str, filt: ReadoutFilter | None = None) -> list | None:
        """The row's tracks ``[n_layers][n_tracks]`` (z over neutral text with ``zscore``; a
        filter keeps its layers and every track)."""
        if row is None or not self.has_tracks:
            return None
        part = row[:, self.n_concepts :]
        if mode == "zscore":
            part = (part - self.track_mean) / self.track_std
        return (part if filt is None else filt.layer_slice(part)).tolist()


def _choice_key(index: int, n: int, chat: bool) -> tuple[int, int]:
    """(prompt, choice) of a response choice: completions number them prompt * n + choice."""
    return (0, index) if chat else divmod(index, n)


def rewrite_body(body: bytes, exchange: Exchange, fmt: Formatter, chat: bool) -> bytes:
    """A non-streaming response body with ``readout`` in every choice."""
    return _encode(rewrite_json(_decode(body), exchange, fmt, chat))


def rewrite_json(payload: dict, exchange: Exchange, fmt: Formatter, chat: bool) -> dict:
    mode, filt = exchange.spec.readout, exchange.spec.filter
    for choice in payload.get("choices") or []:
        prompt, idx = _choice_key(choice.get("index", 0), exchange.n, chat)
        rows = exchange.claim(prompt, idx)
        if filt is not None:
            choice["readout_select"] = filt.describe()
        if filt is not None and filt.summary:
            choice["readout_summary"] = filt.summarize([fmt.values(r, mode) for r in rows])
        else:
            choice["readout"] = [fmt.row(r, mode, filt) for r in rows]
        if fmt.has_tracks:
            choice["tracks"] = [fmt.tracks(r, mode, filt) for r in rows]
        _add_prompt(choice, exchange, fmt, prompt, idx)
    return payload


def _add_prompt(choice: dict, exchange: Exchange, fmt: Formatter, prompt: int, idx: int) -> None:
    """``prompt_tokens`` and ``prompt_readout`` (aligned; the first token's row is null) once per choice."""
    if prompt not in exchange.prompt_rows or (prompt, idx) in exchange.prompt_sent:
        return
    exchange.prompt_sent.add((prompt, idx))
    choice["prompt_tokens"] = exchange.prompt_tokens[prompt]
    rows, mode, filt = exchange.prompt_rows[prompt], exchange.spec.readout, exchange.spec.filter
    choice["prompt_readout"] = [fmt.row(r, mode, filt) for r in rows]
    if fmt.has_tracks:
        choice["prompt_tracks"] = [fmt.tracks(r, mode, filt) for r in rows]


def _rewrite_chunk(payload: dict, exchange: Exchange, fmt: Formatter, chat: bool, forced_ids: bool) -> dict:
    mode, filt = exchange.spec.readout, exchange.spec.filter
    summary = filt is not None and filt.summary
    for choice in payload.get("choices") or []:
        prompt, idx = _choice_key(choice.get("index", 0), exchange.n, chat)
        ids = choice.get("token_ids")
        if ids is not None:
            count = len(ids)
        else:  # chat: a chunk without tokens; completions: echo, everything accumulated so far
            count = 0 if chat else None
        rows = exchange.claim(prompt, idx, count)
        _add_prompt(choice, exchange, fmt, prompt, idx)
        if forced_ids:  # as vLLM would have sent them: present, null
            for key in ("token_ids", "prompt_token_ids"):
                if key in choice:
                    choice[key] = None
        if filt is not None and (prompt, idx) not in exchange.described:  # once, in the choice's first chunk
            exchange.described.add((prompt, idx))
            choice["readout_select"] = filt.describe()
        if rows and not summary:
            choice["readout"] = fmt.row(rows[-1], mode, filt)
            if len(rows) > 1:
                choice["readout_tokens"] = [fmt.row(r, mode, filt) for r in rows]
        if rows and fmt.has_tracks:
            choice["tracks"] = fmt.tracks(rows[-1], mode, filt)
            if len(rows) > 1:
                choice["tracks_tokens"] = [fmt.tracks(r, mode, filt) for r in rows]
        if summary:  # every token's row waits for the chunk that ends the choice
            kept = exchange.summary_rows[(prompt, idx)]
            kept.extend(fmt.values(r, mode) for r in rows)
            if choice.get("finish_reason") is not None:
                choice["readout_summary"] = filt.summarize(kept)
    if forced_ids and "prompt_token_ids" in payload:
        payload["prompt_token_ids"] = None
    return payload


async def rewrite_stream(
    body: AsyncIterator, exchange: Exchange, fmt: Formatter, chat: bool, forced_ids: bool
) -> AsyncIterator[str]:
    """vLLM's SSE events with ``readout`` added to every choice that carries tokens.

    Closes ``body`` when done or abandoned (a client that hangs up), so vLLM aborts the request
    at once rather than whenever the garbage collector gets to it.
    """
    try:
        async for event in _rewrite_events(body, exchange, fmt, chat, forced_ids):
            yield event
    finally:
        close = getattr(body, "aclose", None)
        if close is not None:
            await close()


async def _rewrite_events(body, exchange, fmt, chat, forced_ids) -> AsyncIterator[str]:
    async for item in body:
        text = item.decode() if isinstance(item, (bytes, bytearray, memoryview)) else item
        out = []
        for event in text.split("\n\n"):
            if event.startswith("data: ") and not event.startswith("data: [DONE]"):
                try:
                    payload = _decode(event[len("data: "):])
                except (ValueError, RecursionError):  # json's and msgspec's decode errors both are ValueError
                    out.append(event)
                    continue
                if isinstance(payload, dict) and "choices" in payload:
                    payload = _rewrite_chunk(payload, exchange, fmt, chat, forced_ids)
                event = "data: " + _encode(payload).decode()
            out.append(event)
        yield "\n\n".join(out)
