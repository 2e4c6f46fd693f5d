"""The messages between the API server and the training worker, and the client both ends use.

Two ``ipc://`` sockets, JSON bodies, one request and one reply each:

- API server -> worker (the worker's ROUTER): ``submit`` (a ``/train`` body), ``status``,
  ``checkpoint`` (answered after the sync, which waits for the running job), ``cancel`` (a job id),
  ``snapshot`` and ``rollback`` (``{"snapshot": id}``; both answered after the running job, before
  queued ones).
- worker -> API server (the server's ROUTER): ``reset_prefix_cache`` after a job changed weights.

Every reply is ``{"ok": true, <payload key>: ...}`` or ``{"ok": false, "error": {"message", "field", "status"}}``
(``status``: the HTTP status the route should answer; 400 when absent).
Keeping ops, shapes and the client here is what lets each end change without guessing the other.
"""

from __future__ import annotations

import json

SUBMIT, STATUS, CHECKPOINT, CANCEL, RESET_PREFIX_CACHE = "submit", "status", "checkpoint", "cancel", "reset_prefix_cache"
SNAPSHOT, ROLLBACK = "snapshot", "rollback"
#: The payload key of each op's successful reply.
PAYLOAD = {SUBMIT: "job", STATUS: "status", CHECKPOINT: "sync", CANCEL: "job", RESET_PREFIX_CACHE: None,
           SNAPSHOT: "snapshot", ROLLBACK: "rollback"}


class Unanswered(Exception):
    """The other end did not answer in time."""


def request(op: str, **fields) -> dict:
    return {"op": op, **fields}


def ok(op: str, payload=None) -> dict:
    key = PAYLOAD[op]
    return {"ok": True} if key is None else {"ok": True, key: payload}


def failed(message: str, field: str | None = None, status: int | None = None) -> dict:
    error = {"message": message, "field": field}
    if status is not None:
        error["status"] = status
    return {"ok": False, "error": error}


def encode(message: dict) -> bytes:
    return json.dumps(message).encode()


def decode(body: bytes) -> dict | None:
    """The message, or None when it is not a JSON object (answered as an unknown op)."""
    try:
        message = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None
    return message if isinstance(message, dict) else None


def error_message(reply: dict) -> str:
    error = reply.get("error")
    return error.get("message", "") if isinstance(error, dict) else str(error)


async def ask(address: str, message: dict | bytes, timeout: float) -> dict:
    """One exchange on a fresh REQ socket from an event loop (a timeout never leaves a socket
    mid-exchange); raises :class:`Unanswered`. ``message`` may come encoded already (a large
    one is encoded off the event loop)."""
    import asyncio

    import zmq
    import zmq.asyncio

    sock = zmq.asyncio.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)

    async def exchange() -> dict:
        await sock.send(message if isinstance(message, bytes) else encode(message))
        return decode(await sock.recv()) or failed("the reply was not a JSON object")

    try:
        return await asyncio.wait_for(exchange(), timeout)
    except asyncio.TimeoutError:
        raise Unanswered(f"no answer within {timeout:.0f} s") from None
    finally:
        sock.close(0)


def ask_blocking(address: str, message: dict, timeout: float) -> dict:
    """The same exchange from a plain thread; raises :class:`Unanswered`."""
    import zmq

    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(address)
        sock.send(encode(message))
        if not sock.poll(int(timeout * 1000)):
            raise Unanswered(f"no answer within {timeout:.0f} s")
        return decode(sock.recv()) or failed("the reply was not a JSON object")
    finally:
        sock.close(0)
