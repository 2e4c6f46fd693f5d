"""Per-token scores from the worker to the API server: one ZMQ PUSH -> PULL socket pair.

vLLM's own output path (worker -> engine core -> API server) has no slot for per-token extras
(``ModelRunnerOutput`` and the msgspec ``EngineCoreOutput`` are fixed structs), so the worker
pushes scores on a side channel. It sends them right after the forward pass, before sampling
returns the tokens, so the rows are normally waiting when the API server sees the token; the
API side still waits for them (:class:`amygdala.serve.proxy.RowStore`).

One message per forward step and sender: a JSON header (tags, request ids, token indices, and
the readout layers the rows cover, as positions in the manifest's layer list) and the float32
rows ``[m, n_covered, n_concepts]`` as raw bytes. One sender per pipeline stage (its tensor
rank 0): each covers the readout layers its stage owns, and the API side merges them
(:class:`amygdala.serve.proxy.RowStore`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable

import numpy as np
import zmq
import zmq.asyncio

log = logging.getLogger("vllm.amygdala")  # under vLLM's logger: its format and level

#: Messages a worker may queue while the API server is slow to read, before it drops scores.
HIGH_WATER_MARK = 100_000


def encode(tags: list[str], req_ids: list[str], ks: list[int], rows: np.ndarray, layers: list[int]) -> list[bytes]:
    """``layers``: the positions (in the manifest's layer order) of ``rows``' second axis."""
    header = {"t": tags, "r": req_ids, "k": ks, "l": list(layers), "shape": list(rows.shape)}
    return [json.dumps(header).encode(), np.ascontiguousarray(rows, dtype=np.float32).tobytes()]


class BadMessage(ValueError):
    """A scores message of the wrong shape (a bug, or a stray sender): skipped, logged and counted."""


def decode(frames: list[bytes]) -> tuple[list[str], list[str], list[int], np.ndarray, list[int]]:
    """The message's rows; raises BadMessage for any message not shaped like :func:`encode`'s."""
    try:
        if len(frames) != 2:
            raise BadMessage(f"{len(frames)} frames, expected 2")
        header = json.loads(frames[0])
        tags, req_ids, ks, layers = header["t"], header["r"], header["k"], header["l"]
        rows = np.frombuffer(frames[1], dtype=np.float32).reshape(header["shape"])
    except BadMessage:
        raise
    except Exception as e:  # noqa: BLE001 - any shape of garbage is the same kind of bad message
        raise BadMessage(f"{type(e).__name__}: {e}") from None
    if not (isinstance(tags, list) and isinstance(req_ids, list) and isinstance(ks, list)
            and rows.ndim >= 1 and len(tags) == len(req_ids) == len(ks) == rows.shape[0]):
        raise BadMessage("tags, request ids, token indices and rows do not match")
    if not all(isinstance(t, str) or t is None for t in tags) or not all(isinstance(r, str) for r in req_ids) \
            or not all(isinstance(k, int) for k in ks):
        raise BadMessage("a tag, request id or token index of the wrong type")
    if not (isinstance(layers, list) and all(isinstance(l, int) for l in layers) and rows.ndim == 3
            and len(layers) == rows.shape[1]):
        raise BadMessage(f"scores message covers layers {layers!r} but its rows have shape {list(rows.shape)}")
    return tags, req_ids, ks, rows, layers


class Sender:
    """The worker's end. Never blocks the forward pass: a full queue drops scores, with a warning."""

    def __init__(self, address: str):
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(address)
        self._warned = False

    def send(self, tags: list[str], req_ids: list[str], ks: list[int], rows: np.ndarray, layers: list[int]) -> None:
        try:
            self._sock.send_multipart(encode(tags, req_ids, ks, rows, layers), flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            if not self._warned:
                log.warning("amygdala: the API server is not reading scores; dropping them")
                self._warned = True


class Receiver:
    """The API server's end: binds the socket and hands every row to ``deliver``."""

    def __init__(self, address: str, deliver: Callable[[str, str, int, np.ndarray, list[int]], None]):
        self.address = address
        self._deliver = deliver
        self._ctx = zmq.asyncio.Context.instance()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(address)
        self._task: asyncio.Task | None = None
        self.bad_messages = 0  # skipped messages, for the log and for tests

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="amygdala-scores")

    async def _run(self) -> None:
        """Deliver rows until closed. One bad message must not end the loop: every later readout
        would then wait for rows that never come."""
        while True:
            frames = await self._sock.recv_multipart()
            try:
                tags, req_ids, ks, rows, layers = decode(frames)
                for i, (tag, rid, k) in enumerate(zip(tags, req_ids, ks)):
                    self._deliver(tag, rid, k, rows[i], layers)
            except Exception as e:  # noqa: BLE001 - a bad message, or a delivery bug: skip it, keep serving
                self.bad_messages += 1
                if self.bad_messages <= 10 or self.bad_messages % 1000 == 0:  # bounded: a flood must not flood the log
                    log.warning("amygdala: skipped a bad scores message (%d so far): %s", self.bad_messages, e)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._sock.close(0)
        if self.address.startswith("ipc://"):
            with contextlib.suppress(OSError):
                os.unlink(self.address[len("ipc://"):])
