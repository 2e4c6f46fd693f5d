"""Online fine-tuning on vLLM's server, API side: ``POST /train``, ``GET /train/status``,
``DELETE /train/{job_id}``, ``POST /checkpoint``, ``POST /train/snapshot`` and ``POST /train/rollback``
(undo), attached by the endpoint plugin (:mod:`amygdala.serve.routes`).

The routes exist only when ``AMYGDALA_API_KEY`` is set, and every call needs
``Authorization: Bearer <key>``: they change the weights everyone is served. A request is
checked here (401, then 400 naming the field, before anything reaches the worker) and
forwarded to the training worker (:mod:`amygdala.finetune.protocol`); the API server's event
loop only awaits sockets, never training. It also answers the worker's "reset the prefix cache"
after each job (``engine_client.reset_prefix_cache``): KV computed with the old weights must not
serve new requests.

A ``/train`` body is capped (``AMYGDALA_TRAIN_MAX_BODY``: 413 from its Content-Length, or while
it is read) and parsed, checked and re-encoded on a thread: a large body must not stall the
event loop every streaming completion runs on.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
from http import HTTPStatus

from fastapi import Request

from amygdala.finetune import protocol
from amygdala.serve.config import (
    ALLOW_REMOTE_ENV, API_KEY_ENV, MAX_BODY_ENV, api_key, finetune_addresses, is_loopback, max_body_bytes,
)
from amygdala.serve.errors import error_response

log = logging.getLogger("vllm.amygdala")  # under vLLM's logger: its format and level

TRAIN, STATUS, CHECKPOINT, JOB = "/train", "/train/status", "/checkpoint", "/train/{job_id}"
SNAPSHOT, ROLLBACK = "/train/snapshot", "/train/rollback"
#: Seconds the API server waits for the worker: to queue a job / report status, and to sync.
ANSWER_TIMEOUT_S = 30.0
SYNC_TIMEOUT_S = 600.0


_IDS = {"type": "array", "items": {"type": "integer"}}
#: The body of POST /train in the server's OpenAPI schema (the route reads the raw body itself,
#: to cap and parse it off the event loop, so FastAPI cannot derive it): clients and fuzzers see it.
TRAIN_OPENAPI = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["samples"], "properties": {
        "samples": {"type": "array", "items": {"type": "object", "required": ["context_ids", "continuation_ids"],
                                               "properties": {"context_ids": _IDS, "continuation_ids": _IDS, "rejected_ids": _IDS}}},
        "config": {"type": "object", "properties": {
            "objective": {"type": "string", "enum": ["sft", "orpo", "dpo"]}, "learning_rate": {"type": "number"},
            "steps": {"type": "integer"}, "beta": {"type": "number"}, "orpo_lambda": {"type": "number"},
            "micro_batch": {"type": "integer"}}}}}}}}}


class TrainingRoutes:
    """The routes, attached to vLLM's app by the endpoint plugin when ``AMYGDALA_API_KEY`` is set."""

    def __init__(self) -> None:
        self.key = api_key()
        self.max_body = max_body_bytes() if self.key is not None else 0  # a bad value stops the server at start
        self.limits = None  # amygdala.finetune.inputs.Limits of the served model, from init_state
        self.engine_client = None
        self._events_task: asyncio.Task | None = None

    def attach(self, app) -> None:
        if self.key is None:
            return
        from fastapi import APIRouter

        router = APIRouter()
        router.add_api_route(TRAIN, self.train, methods=["POST"], openapi_extra=TRAIN_OPENAPI)
        router.add_api_route(STATUS, self.status, methods=["GET"])
        router.add_api_route(CHECKPOINT, self.checkpoint, methods=["POST"])
        router.add_api_route(JOB, self.cancel, methods=["DELETE"])
        router.add_api_route(SNAPSHOT, self.snapshot, methods=["POST"])
        router.add_api_route(ROLLBACK, self.rollback, methods=["POST"])
        app.include_router(router)

    async def init_state(self, engine_client, host: str | None = "127.0.0.1") -> None:
        if self.key is None or engine_client is None:
            return
        warn_if_remote(host)
        import zmq
        import zmq.asyncio

        from amygdala.finetune.inputs import Limits

        self.engine_client = engine_client
        self.limits = Limits.from_config(engine_client.model_config.hf_config)
        sock = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(finetune_addresses()[1])
        self._events_task = asyncio.get_running_loop().create_task(self._answer_resets(sock), name="amygdala-train-events")
        log.info("amygdala: training routes on (%s, %s, DELETE %s, %s, %s, %s)", TRAIN, STATUS, JOB, CHECKPOINT, SNAPSHOT, ROLLBACK)

    async def _answer_resets(self, sock) -> None:
        """The worker asks after each job; preempted running requests are recomputed with the new weights."""
        while True:
            frames = await sock.recv_multipart()
            if len(frames) != 3:  # not a REQ socket's message: skip it, the loop must outlive garbage
                log.warning("amygdala: skipped a training event of %d frames", len(frames))
                continue
            ident, _, body = frames
            message = protocol.decode(body)
            if message is None or message.get("op") != protocol.RESET_PREFIX_CACHE:
                reply = protocol.failed(f"unknown op {message.get('op') if message else None!r}")
            else:
                try:
                    done = await self.engine_client.reset_prefix_cache(reset_running_requests=True)
                    reply = protocol.ok(protocol.RESET_PREFIX_CACHE) if done else protocol.failed("vLLM refused the reset")
                except Exception as e:  # noqa: BLE001 - the worker logs it; serving goes on
                    reply = protocol.failed(f"{type(e).__name__}: {e}")
            await sock.send_multipart([ident, b"", protocol.encode(reply)])

    # ------------------------------------------------------------------ routes
    def _denied(self, request: Request):
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.key.encode()):
            return error_response(f"training routes need the header 'Authorization: Bearer <key>' with the "
                                  f"server's {API_KEY_ENV}", status=HTTPStatus.UNAUTHORIZED)
        return None

    async def _ask(self, message: dict | bytes, timeout: float = ANSWER_TIMEOUT_S, op: str | None = None):
        try:
            return await protocol.ask(finetune_addresses()[0], message, timeout), None
        except protocol.Unanswered:
            which = op or message["op"]
            if which in (protocol.SNAPSHOT, protocol.ROLLBACK):
                return None, error_response(f"the {which} did not finish within {timeout:.0f} s (it waits for the "
                                            "running job); it still runs: ask again when GET /train/status is idle",
                                            status=HTTPStatus.GATEWAY_TIMEOUT)
            if which == protocol.CHECKPOINT:
                return None, error_response(f"the sync did not finish within {timeout:.0f} s (it waits for the running job); "
                                            "it still runs: see GET /train/status's last_sync", status=HTTPStatus.GATEWAY_TIMEOUT)
            return None, error_response(f"the training worker did not answer within {timeout:.0f} s; see the server log",
                                        status=HTTPStatus.SERVICE_UNAVAILABLE)

    async def train(self, request: Request):
        from amygdala.fields import FieldError

        raw = await self._authorized_body(request)
        if not isinstance(raw, bytes):
            return raw
        try:
            message = await asyncio.to_thread(_checked_submit, raw, self.limits)
        except FieldError as e:
            return error_response(str(e), e.path)
        return await self._relay(message, "job", op=protocol.SUBMIT)

    async def _authorized_body(self, request: Request):
        """The body of a request with the key, or the response refusing it (401, then 413): the
        routes that take a body check both the same way, the key first."""
        if (denied := self._denied(request)) is not None:
            return denied
        return await self._read_body(request)

    async def _read_body(self, request: Request):
        """The body, or a 413 as soon as it is known to pass the cap: declared, or counted while read."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            return self._too_large()
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                return self._too_large()
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_large(self):
        return error_response(f"body: over this server's limit of {self.max_body} bytes ({MAX_BODY_ENV}); split the job "
                              "into smaller requests", "body", status=HTTPStatus.REQUEST_ENTITY_TOO_LARGE)

    async def cancel(self, request: Request, job_id: str):
        if (denied := self._denied(request)) is not None:
            return denied
        return await self._relay(protocol.request(protocol.CANCEL, job_id=job_id), "job")

    async def status(self, request: Request):
        if (denied := self._denied(request)) is not None:
            return denied
        return await self._relay(protocol.request(protocol.STATUS), "status")

    async def checkpoint(self, request: Request):
        if (denied := self._denied(request)) is not None:
            return denied
        return await self._relay(protocol.request(protocol.CHECKPOINT), "sync", SYNC_TIMEOUT_S)

    async def snapshot(self, request: Request):
        """Copy the weights a job may change (in the worker's memory), for a later rollback."""
        if (denied := self._denied(request)) is not None:
            return denied
        return await self._relay(protocol.request(protocol.SNAPSHOT), "snapshot", SYNC_TIMEOUT_S,
                                 refused=HTTPStatus.SERVICE_UNAVAILABLE)

    async def rollback(self, request: Request):
        """Restore ``{"snapshot": id}`` in place: served at once, written by the next sync."""
        raw = await self._authorized_body(request)
        if not isinstance(raw, bytes):
            return raw
        from amygdala.fields import FieldError

        try:
            body = json_body(raw, '{"snapshot": "snap-..."}')
        except FieldError as e:
            return error_response(str(e), e.path)
        if not isinstance(body, dict) or not isinstance(body.get("snapshot"), str):
            return error_response("snapshot: expected the id from POST /train/snapshot, e.g. {\"snapshot\": \"snap-...\"}",
                                  "snapshot")
        return await self._relay(protocol.request(protocol.ROLLBACK, snapshot=body["snapshot"]), "rollback",
                                 SYNC_TIMEOUT_S, refused=HTTPStatus.CONFLICT)

    async def _relay(self, message: dict | bytes, key: str, timeout: float = ANSWER_TIMEOUT_S, *,
                     op: str | None = None, refused: HTTPStatus = HTTPStatus.BAD_REQUEST):
        """Every route's last step: ask the worker, answer its payload ``key``, or its refusal
        (with the status the worker gives, else ``refused``), or why it did not answer."""
        from fastapi.responses import JSONResponse

        reply, failed = await self._ask(message, timeout, op)
        if failed is not None:
            return failed
        if reply["ok"]:
            return JSONResponse(reply[key])
        error = reply.get("error") if isinstance(reply.get("error"), dict) else {}
        return error_response(protocol.error_message(reply), error.get("field"), status=HTTPStatus(error.get("status") or refused))


def json_body(raw: bytes, expected: str):
    """A request body's JSON, or a FieldError naming ``body`` (answered 400): not JSON, not UTF-8,
    an integer past Python's 4300 digits (ValueError), or nested ~1000 deep (RecursionError)."""
    from amygdala.fields import FieldError

    try:
        return json.loads(raw)
    except ValueError as e:
        raise FieldError("body", f"not JSON ({str(e)[:200]}); send {expected}") from None
    except RecursionError:
        raise FieldError("body", f"JSON nested too deeply; send {expected}") from None


def _checked_submit(raw: bytes, limits) -> bytes:
    """On a thread: the body parsed and checked (raises FieldError naming the field), then the
    worker's message encoded, so neither a large parse nor its encoding runs on the event loop."""
    from amygdala.finetune.inputs import parse_request

    body = json_body(raw, '{"samples": [...], "config": {...}}')
    if limits is not None:
        parse_request(body, limits)
    return protocol.encode(protocol.request(protocol.SUBMIT, request=body))


def warn_if_remote(host: str | None) -> None:
    """Say loudly that the training routes are reachable from the network (plain ``vllm serve`` binds
    every interface by default; ``amygdala serve`` refuses without ``--allow-remote-training``)."""
    if is_loopback(host):
        return
    where = host or "every interface"
    if os.environ.get(ALLOW_REMOTE_ENV) == "1":
        log.warning("amygdala: the training routes are reachable on %s (--allow-remote-training); anyone with %s can "
                    "change the served weights", where, API_KEY_ENV)
        return
    log.warning("amygdala: WARNING: the training routes (/train, /checkpoint) are reachable from the network on %s: "
                "anyone who learns %s can change the weights everyone is served, over plain HTTP. Bind --host 127.0.0.1 "
                "(and put a TLS proxy in front), or start with `amygdala serve --allow-remote-training` if you mean it",
                where, API_KEY_ENV)
