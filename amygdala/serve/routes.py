"""``vllm.endpoint_plugins`` entry point: the HTTP side of the plugin, in the API server.

vLLM calls :meth:`AmygdalaEndpoints.attach_router` after its own routes exist; routes added
there replace core routes with the same path and method. We replace ``POST /v1/completions``
and ``POST /v1/chat/completions`` with wrappers that keep vLLM's own handler (cancellation,
load tracking, keep-alive and all) and only:

1. parse and check ``readout`` / ``steer`` (a 400 naming the field before anything runs);
2. set the request's ``cache_salt`` from its steering, so steered KV never serves an
   unsteered request with the same prefix (and vice versa);
3. mark the request (:data:`amygdala.serve.proxy.CURRENT`) for the engine-client proxy;
4. add ``readout`` to the response or to every streamed chunk.

``GET /v1/readout/manifest`` describes the loaded readout (404 when there is none) and the
server-wide ``default_steer``;
``GET /amygdala/`` is the live page (:mod:`amygdala.serve.page`). vLLM only
loads endpoint plugins named in ``VLLM_PLUGINS``. With ``AMYGDALA_API_KEY`` set, the training
routes (:mod:`amygdala.serve.finetune_routes`) are attached here too.
"""

import logging
import os
from argparse import Namespace
from http import HTTPStatus

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from amygdala.serve.channel import Receiver
from amygdala.serve.config import DEFAULT_STEER_ENV, PLUGIN_NAME, channel_address, load_readout, max_steer_strength
from amygdala.readout import DEFAULT_SMOOTH
from amygdala.serve.respond import Formatter, rewrite_body, rewrite_stream
from amygdala.serve.proxy import CURRENT, EngineClientProxy, Exchange, RowStore
from amygdala.serve.spec import FIELDS, ModelShape, RequestSpec, SteerItem, default_steering, parse
from amygdala.fields import FieldError
from amygdala.serve.errors import error_response
from amygdala.serve import page
from amygdala.serve.finetune_routes import TrainingRoutes

log = logging.getLogger("vllm.amygdala")  # under vLLM's logger: its format and level

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
MANIFEST = "/v1/readout/manifest"


class BodyCheckedRoute(APIRoute):
    """A wrapped route whose request-body check can only answer 4xx.

    vLLM's request models run their own validators while FastAPI reads the body, and some of
    them raise plain Python errors on malformed input (``structured_outputs: 1.5`` gives an
    AttributeError in ``CompletionRequest.check_structured_outputs_count``), which would be a
    500. An error raised before the endpoint starts is the body's fault: a 400 naming it. Once
    the endpoint has started (``STARTED`` in the request's state), errors are the server's and
    pass through unchanged.
    """

    STARTED = "amygdala_endpoint_started"

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def checked(request: Request):
            try:
                return await handler(request)
            except Exception as e:
                # FastAPI's own answers (422/400 validation errors, HTTP errors) keep their handlers
                if getattr(request.state, self.STARTED, False) or isinstance(e, (HTTPException, RequestValidationError)):
                    raise
                log.info("amygdala: %s %s: the body failed vLLM's request check: %r", request.method, request.url.path, e)
                return error_response(f"body: rejected by the request check ({type(e).__name__}: {str(e)[:200]}); "
                                      "see the API reference for the fields' types", "body")

        return checked


class AmygdalaEndpoints:
    """The endpoint plugin object vLLM instantiates (the entry point is this class)."""

    name = PLUGIN_NAME
    required_tasks = ("generate",)

    def __init__(self) -> None:
        self.readout = load_readout()
        self.formatter = Formatter(self.readout) if self.readout is not None else None
        self.store = RowStore(len(self.readout.layers) if self.readout is not None else 0)
        self.max_strength = max_steer_strength()  # a bad AMYGDALA_MAX_STEER_STRENGTH stops the server at start
        self.shape: ModelShape | None = None
        self.default_steer: tuple[SteerItem, ...] = ()  # amygdala serve --steer; checked once the shape is known
        self.receiver: Receiver | None = None
        self.training = TrainingRoutes()  # /train, /train/status, /checkpoint with AMYGDALA_API_KEY

    # ------------------------------------------------------------------ vLLM hooks
    def attach_router(self, app: FastAPI) -> None:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
        from vllm.entrypoints.serve.utils.api_utils import validate_json_request

        core = {
            route.path: route.endpoint
            for route in app.routes
            if isinstance(route, APIRoute) and "POST" in route.methods and route.path in (COMPLETIONS, CHAT)
        }
        router = APIRouter()
        router.add_api_route(MANIFEST, self.manifest, methods=["GET"])
        json_only = [Depends(validate_json_request)]
        if COMPLETIONS in core:
            original = core[COMPLETIONS]

            async def create_completion(request: CompletionRequest, raw_request: Request):
                setattr(raw_request.state, BodyCheckedRoute.STARTED, True)
                return await self.handle(request, raw_request, original, chat=False)

            router.add_api_route(COMPLETIONS, create_completion, methods=["POST"], dependencies=json_only,
                                 route_class_override=BodyCheckedRoute)
        if CHAT in core:
            original_chat = core[CHAT]

            async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request):
                setattr(raw_request.state, BodyCheckedRoute.STARTED, True)
                return await self.handle(request, raw_request, original_chat, chat=True)

            router.add_api_route(CHAT, create_chat_completion, methods=["POST"], dependencies=json_only,
                                 route_class_override=BodyCheckedRoute)
        app.include_router(router)
        page.attach(app)
        self.training.attach(app)

    async def init_state(self, engine_client, state, args: Namespace) -> None:
        await self.training.init_state(engine_client, getattr(args, "host", None))
        if engine_client is None or self.readout is None:
            return
        config = engine_client.model_config
        self.shape = ModelShape(config.hf_text_config.num_hidden_layers, config.get_hidden_size(), self.max_strength)
        self.readout.check_model(self.shape.num_layers, self.shape.hidden_size, str(config.model))
        self.default_steer = default_steering(os.environ.get(DEFAULT_STEER_ENV), self.readout, self.shape)
        self.receiver = Receiver(channel_address(), self.store.deliver)
        self.receiver.start()
        for name in ("openai_serving_completion", "openai_serving_chat"):
            serving = getattr(state, name, None)
            if serving is not None and not isinstance(serving.engine_client, EngineClientProxy):
                serving.engine_client = EngineClientProxy(serving.engine_client, self.store)
        log.info("amygdala: readout of %d concepts at layers %s", len(self.readout.concepts), self.readout.layers)

    # ------------------------------------------------------------------ routes
    async def manifest(self) -> JSONResponse:
        if self.readout is None:
            return error_response("no readout file is loaded on this server (start it with AMYGDALA_READOUT)", status=HTTPStatus.NOT_FOUND)
        # smooth: the causal moving average `amygdala read` applies by default, the page's default too.
        # default_steer: what a request without its own steer gets (amygdala serve --steer).
        return JSONResponse({**self.readout.manifest(), "smooth": DEFAULT_SMOOTH,
                             "default_steer": [s.wire() for s in self.default_steer]})

    async def handle(self, request, raw_request: Request, original, *, chat: bool):
        """Run vLLM's own handler ``original`` with the request's readout and steering applied."""
        try:
            spec = self._spec(request)
        except FieldError as e:
            return error_response(str(e), e.path)
        if not spec.active:
            return await original(request, raw_request)
        request.cache_salt = spec.cache_salt(request.cache_salt)
        forced_ids = False
        if spec.readout and request.stream and not request.return_token_ids and (chat or not request.echo):
            request.return_token_ids = forced_ids = True
        exchange = Exchange(spec, n=request.n or 1)
        token = CURRENT.set(exchange)
        try:
            response = await original(request, raw_request)
        finally:
            CURRENT.reset(token)
        if not spec.readout or response is None:
            return response
        if isinstance(response, StreamingResponse):
            response.body_iterator = rewrite_stream(response.body_iterator, exchange, self.formatter, chat, forced_ids)
            return response
        if isinstance(response, JSONResponse) and response.status_code == 200:
            response.body = rewrite_body(response.body, exchange, self.formatter, chat)
            response.headers["content-length"] = str(len(response.body))
        return response

    def _spec(self, request) -> RequestSpec:
        xargs = request.vllm_xargs
        if xargs and any(k in xargs for k in FIELDS):
            request.vllm_xargs = {k: v for k, v in xargs.items() if k not in FIELDS} or None
        extra = request.model_extra or {}
        shape = self.shape or ModelShape(0, 0, self.max_strength)
        spec = parse(extra, xargs, self.readout, shape, self.default_steer)
        if getattr(request, "use_beam_search", False) and spec.active:
            if spec.steer or any(k in extra or k in (xargs or {}) for k in FIELDS):
                raise FieldError("use_beam_search", "readout and steering do not support beam search")
            return RequestSpec()
        return spec
