"""Online fine-tuning on vLLM's server, API side: ``POST /train``, ``GET /train/status``,
``POST /checkpoint``, ``POST /train/snapshot`` and ``POST /train/rollback`` (undo), attached by the endpoint plugin (:mod:`amygdala.serve.routes`).

The routes exist only when ``AMYGDALA_API_KEY`` is set, and every call needs
``Authorization: Bearer <key>``: they change the weights everyone is served. A request is
checked here (401, then 400 naming the field, before anything reaches the worker) and
forwarded to the training worker (:mod:`amygdala.finetune.protocol`); the API server's event
loop only awaits sockets, never training. It also answers the worker's "reset the prefix cache"
after each job (``engine_client.reset_prefix_cache``): KV computed with the old weights must not
serve new requests.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from http import HTTPStatus

from fastapi import Request

from amygdala.finetune import protocol
from amygdala.serve.config import API_KEY_ENV, api_key, finetune_addresses
from amygdala.serve.errors import error_response

log = logging.getLogger("vllm.amygdala")  # under vLLM's logger: its format and level

TRAIN, STATUS, CHECKPOINT = "/train", "/train/status", "/checkpoint"
SNAPSHOT, ROLLBACK = "/train/snapshot", "/train/rollback"
#: Seconds the API server waits for the worker: to queue a job / report status, and to sync.
ANSWER_TIMEOUT_S = 30.0
SYNC_TIMEOUT_S = 600.0


class TrainingRoutes:
    """The routes, attached to vLLM's app by the endpoint plugin when ``AMYGDALA_API_KEY`` is set."""

    def __init__(self) -> None:
        self.key = api_key()
        self.limits = None  # amygdala.finetune.inputs.Limits of the served model, from init_state
        self.engine_client = None
        self._events_task: asyncio.Task | None = None

    def attach(self, app) -> None:
        if self.key is None:
            return
        from fastapi import APIRouter

        router = APIRouter()
        router.add_api_route(TRAIN, self.train, methods=["POST"])
        router.add_api_route(STATUS, self.status, methods=["GET"])
        router.add_api_route(CHECKPOINT, self.checkpoint, methods=["POST"])
        router.add_api_route(SNAPSHOT, self.snapshot, methods=["POST"])
        router.add_api_route(ROLLBACK, self.rollback, methods=["POST"])
        app.include_router(router)

    async def init_state(self, engine_client) -> None:
        if self.key is None or engine_client is None:
            return
        import zmq
        import zmq.asyncio

        from amygdala.finetune.inputs import Limits

        self.engine_client = engine_client
        self.limits = Limits.from_config(engine_client.model_config.hf_config)
        sock = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(finetune_addresses()[1])
        self._events_task = asyncio.get_running_loop().create_task(self._answer_resets(sock), name="amygdala-train-events")
        log.info("amygdala: training routes on (%s, %s, %s, %s, %s)", TRAIN, STATUS, CHECKPOINT, SNAPSHOT, ROLLBACK)

    async def _answer_resets(self, sock) -> None:
        """The worker asks after each job; preempted running requests are recomputed with the new weights."""
        while True:
            ident, _, body = await sock.recv_multipart()
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

    async def _ask(self, message: dict, timeout: float = ANSWER_TIMEOUT_S):
        try:
            return await protocol.ask(finetune_addresses()[0], message, timeout), None
        except protocol.Unanswered:
            if message["op"] in (protocol.SNAPSHOT, protocol.ROLLBACK):
                return None, error_response(f"the {message['op']} did not finish within {timeout:.0f} s (it waits for the "
                                            "running job); it still runs: ask again when GET /train/status is idle",
                                            status=HTTPStatus.GATEWAY_TIMEOUT)
            if message["op"] == protocol.CHECKPOINT:
                return None, error_response(f"the sync did not finish within {timeout:.0f} s (it waits for the running job); "
                                            "it still runs: see GET /train/status's last_sync", status=HTTPStatus.GATEWAY_TIMEOUT)
            return None, error_response(f"the training worker did not answer within {timeout:.0f} s; see the server log",
                                        status=HTTPStatus.SERVICE_UNAVAILABLE)

    async def train(self, request: Request):
        from fastapi.responses import JSONResponse

        from amygdala.finetune.inputs import TrainInputError, parse_request

        if (denied := self._denied(request)) is not None:
            return denied
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return error_response(f"body: not JSON ({e}); send {{\"samples\": [...], \"config\": {{...}}}}", "body")
        if self.limits is not None:
            try:
                parse_request(body, self.limits)
            except TrainInputError as e:
                return error_response(str(e), e.field)
        reply, failed = await self._ask(protocol.request(protocol.SUBMIT, request=body))
        if failed is not None:
            return failed
        if not reply["ok"]:
            return error_response(protocol.error_message(reply), reply["error"].get("field"))
        return JSONResponse(reply["job"])

    async def status(self, request: Request):
        from fastapi.responses import JSONResponse

        if (denied := self._denied(request)) is not None:
            return denied
        reply, failed = await self._ask(protocol.request(protocol.STATUS))
        return failed if failed is not None else JSONResponse(reply["status"])

    async def checkpoint(self, request: Request):
        from fastapi.responses import JSONResponse

        if (denied := self._denied(request)) is not None:
            return denied
        reply, failed = await self._ask(protocol.request(protocol.CHECKPOINT), SYNC_TIMEOUT_S)
        if failed is not None:
            return failed
        if not reply["ok"]:
            return error_response(protocol.error_message(reply), status=HTTPStatus.INTERNAL_SERVER_ERROR)
        return JSONResponse(reply["sync"])

    async def snapshot(self, request: Request):
        """Copy the weights a job may change (in the worker's memory), for a later rollback."""
        from fastapi.responses import JSONResponse

        if (denied := self._denied(request)) is not None:
            return denied
        reply, failed = await self._ask(protocol.request(protocol.SNAPSHOT), SYNC_TIMEOUT_S)
        if failed is not None:
            return failed
        if not reply["ok"]:
            return error_response(protocol.error_message(reply), status=HTTPStatus.SERVICE_UNAVAILABLE)
        return JSONResponse(reply["snapshot"])

    async def rollback(self, request: Request):
        """Restore ``{"snapshot": id}`` in place: served at once, written by the next sync."""
        from fastapi.responses import JSONResponse

        if (denied := self._denied(request)) is not None:
            return denied
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return error_response(f"body: not JSON ({e}); send {{\"snapshot\": \"snap-...\"}}", "body")
        if not isinstance(body, dict) or not isinstance(body.get("snapshot"), str):
            return error_response("snapshot: expected the id from POST /train/snapshot, e.g. {\"snapshot\": \"snap-...\"}",
                                  "snapshot")
        reply, failed = await self._ask(protocol.request(protocol.ROLLBACK, snapshot=body["snapshot"]), SYNC_TIMEOUT_S)
        if failed is not None:
            return failed
        if not reply["ok"]:
            return error_response(protocol.error_message(reply), reply["error"].get("field"), status=HTTPStatus.CONFLICT)
        return JSONResponse(reply["rollback"])
