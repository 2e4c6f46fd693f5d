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


def decode(frames: list[bytes]) -> tuple[list[str], list[str], list[int], np.ndarray, list[int]]:
    header = json.loads(frames[0])
    rows = np.frombuffer(frames[1], dtype=np.float32).reshape(header["shape"])
    if len(header["l"]) != rows.shape[1]:
        raise ValueError(f"scores message covers layers {header['l']} but has {rows.shape[1]} per row")
    return header["t"], header["r"], header["k"], rows, header["l"]


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

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="amygdala-scores")

    async def _run(self) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            try:
                tags, req_ids, ks, rows, layers = decode(frames)
            except (ValueError, KeyError, json.JSONDecodeError):
                log.exception("amygdala: bad scores message")
                continue
            for i, (tag, rid, k) in enumerate(zip(tags, req_ids, ks)):
                self._deliver(tag, rid, k, rows[i], layers)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._sock.close(0)
        if self.address.startswith("ipc://"):
            with contextlib.suppress(OSError):
                os.unlink(self.address[len("ipc://"):])
