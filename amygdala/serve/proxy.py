"""The API server side of per-token scores: where rows wait, and how they meet their tokens.

vLLM's serving code calls ``engine_client.generate(prompt, sampling_params, request_id)`` once
per prompt of an HTTP request and turns the ``RequestOutput`` objects it yields into response
chunks. :class:`EngineClientProxy` stands in for the engine client of the completion and chat
handlers: for a request that our route marked (a :class:`Exchange` in :data:`CURRENT`), it
gives each prompt a tag, hands the checked spec to the worker in ``extra_args``, and before
passing each ``RequestOutput`` on, waits in :class:`RowStore` for the score rows of the tokens it
carries and files them under (prompt, choice). The route then reads them back in token order
(:meth:`Exchange.claim`) while it rewrites the response.

Worker rows name the engine's internal request id; for ``n > 1`` vLLM's child requests are
``"{index}_{parent id}"``, which is how a row finds its choice.

Under pipeline parallelism each stage sends the scores of the readout layers it owns, as rows
covering some positions of the manifest's layer list; :meth:`RowStore.deliver` merges them, and a
token's row is ready only once every layer's part has arrived (in whatever order the stages
sent them). Without pipeline parallelism one message covers all layers and nothing waits.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import defaultdict
from contextvars import ContextVar
from dataclasses import dataclass, field

import numpy as np

from amygdala.serve.config import WIRE_KEY
from amygdala.serve.spec import FIELDS, RequestSpec

log = logging.getLogger("vllm.amygdala")  # under vLLM's logger: its format and level

#: How long to wait for a token's scores before answering without them. The worker sends them
#: before the token leaves the engine, so a wait this long means a broken worker or channel.
ROW_TIMEOUT_S = 30.0

Row = np.ndarray  # [n_layers, n_concepts] float32


@dataclass
class _Partial:
    """A token's row while some pipeline stages' layers are still missing."""

    row: Row
    missing: set[int]


@dataclass
class _TagRows:
    rows: dict[str, dict[int, Row]] = field(default_factory=dict)  # engine request id -> k -> row
    partial: dict[tuple[str, int], _Partial] = field(default_factory=dict)  # (request id, k) -> parts so far
    event: asyncio.Event = field(default_factory=asyncio.Event)
    broken: bool = False

    def request_id_for(self, choice: int, n: int) -> str | None:
        if n == 1:
            return next(iter(self.rows), None)
        prefix = f"{choice}_"
        return next((rid for rid in self.rows if rid.startswith(prefix)), None)


class RowStore:
    """Score rows per tag (one tag per prompt of an HTTP request), from open to close."""

    def __init__(self, n_layers: int, timeout: float = ROW_TIMEOUT_S):
        self.n_layers = n_layers
        self.timeout = timeout
        self._tags: dict[str, _TagRows] = {}

    def open(self, tag: str) -> None:
        self._tags[tag] = _TagRows()

    def close(self, tag: str) -> None:
        self._tags.pop(tag, None)

    def deliver(self, tag: str, req_id: str, k: int, row: Row, layers: list[int]) -> None:
        """Called for every (part of a) row that arrives: ``row[j]`` is the scores of manifest
        layer ``layers[j]``. Rows of closed or unknown tags are dropped."""
        entry = self._tags.get(tag)
        if entry is None:
            return
        if len(layers) == self.n_layers and list(layers) == list(range(self.n_layers)):
            entry.rows.setdefault(req_id, {})[k] = row  # one stage read every layer
            entry.event.set()
            return
        part = entry.partial.get((req_id, k))
        if part is None:
            part = entry.partial[(req_id, k)] = _Partial(
                np.zeros((self.n_layers, row.shape[-1]), np.float32), set(range(self.n_layers)))
        part.row[list(layers)] = row
        part.missing.difference_update(layers)
        if not part.missing:
            del entry.partial[(req_id, k)]
            entry.rows.setdefault(req_id, {})[k] = part.row
            entry.event.set()

    async def take(self, tag: str, choice: int, n: int, start: int, end: int) -> list[Row | None]:
        """Rows ``start..end-1`` of ``choice``, waiting for them; ``None`` for any that never came."""
        entry = self._tags[tag]

        def attempt(final: bool) -> list[Row | None] | None:
            rid = entry.request_id_for(choice, n)
            got = entry.rows.get(rid, {}) if rid is not None else {}
            if final or all(k in got for k in range(start, end)):
                return [got.pop(k, None) for k in range(start, end)]
            return None

        return await self._until(entry, attempt, f"tokens {start}-{end - 1} of {tag}")

    async def take_prompt(self, tag: str, length: int) -> list[Row | None]:
        """The rows of prompt tokens ``1..length-1`` (``k = 1 - length .. -1``), from whichever
        of the prompt's engine requests computed them: with ``n > 1`` the choices are separate
        requests that may share the prefill through the prefix cache, so each row is taken from
        the first that has it."""
        entry = self._tags[tag]
        ks = range(1 - length, 0)

        def attempt(final: bool) -> list[Row | None] | None:
            found: dict[int, Row] = {}
            for rows in entry.rows.values():
                for k in ks:
                    if k in rows and k not in found:
                        found[k] = rows[k]
            return [found.get(k) for k in ks] if final or len(found) == len(ks) else None

        return await self._until(entry, attempt, f"the {length}-token prompt of {tag}")

    async def _until(self, entry: _TagRows, attempt, what: str) -> list[Row | None]:
        """``attempt(False)`` once it returns rows; after the timeout, ``attempt(True)`` (what came)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (0.0 if entry.broken else self.timeout)
        while True:
            rows = attempt(False)
            if rows is not None:
                return rows
            remaining = deadline - loop.time()
            if remaining <= 0:
                if not entry.broken:
                    log.error("amygdala: no scores arrived for %s; answering without them", what)
                entry.broken = True
                return attempt(True)
            entry.event.clear()
            try:
                await asyncio.wait_for(entry.event.wait(), remaining)
            except asyncio.TimeoutError:
                pass


@dataclass
class Exchange:
    """One HTTP request's readout bookkeeping, shared by the route and the engine-client proxy."""

    spec: RequestSpec
    n: int
    key: str = field(default_factory=lambda: uuid.uuid4().hex)
    prompts: int = 0
    pending: dict[tuple[int, int], list[Row | None]] = field(default_factory=lambda: defaultdict(list))
    #: With ``readout_prompt``, per prompt: one row per prompt token (``None`` for the first,
    #: which no position sampled) and the tokens' texts; and the (prompt, choice) pairs whose
    #: stream has carried them.
    prompt_rows: dict[int, list[Row | None]] = field(default_factory=dict)
    prompt_tokens: dict[int, list[str]] = field(default_factory=dict)
    prompt_sent: set[tuple[int, int]] = field(default_factory=set)
    #: With a ``readout`` filter: the (prompt, choice) pairs whose stream has said what it
    #: holds (``readout_select``), and with ``summary`` every row so far of each choice.
    described: set[tuple[int, int]] = field(default_factory=set)
    summary_rows: dict[tuple[int, int], list[Row | None]] = field(default_factory=lambda: defaultdict(list))

    def next_prompt(self) -> int:
        self.prompts += 1
        return self.prompts - 1

    def claim(self, prompt: int, choice: int, count: int | None = None) -> list[Row | None]:
        """The oldest ``count`` unclaimed rows of a choice, in token order (all of them if None)."""
        rows = self.pending[(prompt, choice)]
        count = len(rows) if count is None else count
        taken, self.pending[(prompt, choice)] = rows[:count], rows[count:]
        return taken


#: The Exchange of the HTTP request being handled; set by the route around the vLLM handler.
CURRENT: ContextVar[Exchange | None] = ContextVar("amygdala_exchange", default=None)


class EngineClientProxy:
    """vLLM's engine client with ``generate`` wrapped; every other attribute passes through."""

    def __init__(self, inner, store: RowStore):
        self._inner = inner
        self._store = store

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def generate(self, prompt, sampling_params, request_id, *args, **kwargs):
        from vllm.sampling_params import SamplingParams

        exchange = CURRENT.get()
        if exchange is None or not isinstance(sampling_params, SamplingParams):
            return self._inner.generate(prompt, sampling_params, request_id, *args, **kwargs)
        # Decided at call time, in prompt order: the async body below may start later.
        prompt_idx = exchange.next_prompt()
        tag = f"{exchange.key}-{prompt_idx}" if exchange.spec.readout else None
        extra = {k: v for k, v in (sampling_params.extra_args or {}).items() if k not in FIELDS}
        extra[WIRE_KEY] = exchange.spec.wire(tag)
        sampling_params.extra_args = extra
        if tag is None:
            return self._inner.generate(prompt, sampling_params, request_id, *args, **kwargs)
        return self._generate(exchange, prompt_idx, tag, prompt, sampling_params, request_id, *args, **kwargs)

    async def _generate(self, exchange: Exchange, prompt_idx: int, tag: str, prompt, sampling_params, request_id, *args, **kwargs):
        from vllm.sampling_params import RequestOutputKind

        delta = sampling_params.output_kind == RequestOutputKind.DELTA
        n = sampling_params.n
        seen: dict[int, int] = defaultdict(int)
        self._store.open(tag)  # before the request reaches the engine, so no row is missed
        outputs = self._inner.generate(prompt, sampling_params, request_id, *args, **kwargs)
        try:
            async for out in outputs:
                if exchange.spec.prompt and prompt_idx not in exchange.prompt_rows:
                    await self._take_prompt(exchange, prompt_idx, tag, list(out.prompt_token_ids or []))
                for o in out.outputs:
                    total = seen[o.index] + len(o.token_ids) if delta else len(o.token_ids)
                    if total > seen[o.index]:
                        rows = await self._store.take(tag, o.index, n, seen[o.index], total)
                        exchange.pending[(prompt_idx, o.index)].extend(rows)
                        seen[o.index] = total
                yield out
        finally:
            self._store.close(tag)
            await outputs.aclose()  # abandoned by the client: vLLM aborts the request now

    async def _take_prompt(self, exchange: Exchange, prompt_idx: int, tag: str, ids: list[int]) -> None:
        """Wait for the prompt's rows (sent during its prefill) and decode its tokens, before
        the first output passes on: the response's first chunk carries them."""
        import inspect

        rows = await self._store.take_prompt(tag, len(ids)) if ids else []
        tokenizer = self._inner.get_tokenizer()
        if inspect.isawaitable(tokenizer):
            tokenizer = await tokenizer
        exchange.prompt_rows[prompt_idx] = [None, *rows] if ids else []
        exchange.prompt_tokens[prompt_idx] = [tokenizer.decode([i]) for i in ids]
