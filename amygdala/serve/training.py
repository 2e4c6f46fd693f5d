"""Online training on vLLM's server: ``POST /train``, ``GET /train/status``, ``POST /checkpoint``.

On only when ``AMYGDALA_API_KEY`` is set (these routes change the weights everyone is served;
every call needs ``Authorization: Bearer <key>``) and ``VLLM_PLUGINS`` names ``amygdala`` (vLLM
loads the routes only then); otherwise nothing here runs and the routes do not exist (404).
Two halves, like the rest of the plugin:

- engine side (:func:`register`, from the ``vllm.general_plugins`` entry point, every process):
  before vLLM builds the engine, check that training can work (eager mode, one worker, a local
  model folder with safetensors that no other training worker holds) and replay an interrupted
  checkpoint sync (:func:`amygdala.train.checkpoint.recover`) *before* vLLM reads the folder;
  keep the linear layers' plain weights (below); once the worker has loaded the model, start
  the training worker (:mod:`amygdala.train.worker`) on views of vLLM's parameters.
- API side (:class:`TrainingRoutes`, from the endpoint plugin): the routes. A request is
  checked here (401, then 400 naming the field, before anything reaches the worker) and
  forwarded over ZeroMQ; the API server's event loop only awaits sockets, never training. It
  also answers the worker's "reset the prefix cache" after each job
  (``engine_client.reset_prefix_cache``).

Plain weights, and their cost: vLLM's CPU build packs every linear layer's weight into a
oneDNN (or sgl) handle when loading and *removes* ``layer.weight``
(``UnquantizedLinearMethod.process_weights_after_loading``), so an in-place update of the
weight would never reach inference. With training on, every linear layer is marked
``_cpu_skip_gemm_dispatch`` (vLLM's own opt-out) and runs ``torch.nn.functional.linear`` on
its plain weight instead of the packed kernel; ``bench/train.py`` measures what that costs.
The embedding and lm_head keep their packed copies: the trainer freezes them.

Sockets: two ``ipc://`` sockets in a fresh 0700 directory (so only this user can reach a
worker that needs no key), chosen by the first process and inherited by vLLM's children:
the worker's control socket and the API server's prefix-cache socket.
"""

from __future__ import annotations

import asyncio
import atexit
import hmac
import json
import logging
import os
import shutil
import tempfile
from http import HTTPStatus
from pathlib import Path

from fastapi import Request

from amygdala import AmygdalaError
from amygdala.serve.worker import is_ours, mark

log = logging.getLogger("vllm.amygdala")  # under vLLM's logger: its format and level

#: The key every training route requires; unset (or empty): the routes are off.
API_KEY_ENV = "AMYGDALA_API_KEY"
#: Seconds after the last job until the automatic checkpoint sync (a new job restarts it).
SYNC_DELAY_ENV = "AMYGDALA_SYNC_DELAY"
DEFAULT_SYNC_DELAY = 600.0
#: apollo-mini (default) | apollo | adamw: fixed for a folder (its saved state depends on it).
OPTIMIZER_ENV = "AMYGDALA_TRAIN_OPTIMIZER"
#: torch threads of the training worker (default: torch's choice).
THREADS_ENV = "AMYGDALA_TRAIN_THREADS"
#: ipc:// addresses chosen by the first process: the worker's, and the API server's.
CONTROL_ENV = "AMYGDALA_TRAIN_CONTROL"
EVENTS_ENV = "AMYGDALA_TRAIN_EVENTS"

TRAIN, STATUS, CHECKPOINT = "/train", "/train/status", "/checkpoint"
#: Seconds the API server waits for the worker: to queue a job / report status, and to sync.
ANSWER_TIMEOUT_S = 30.0
SYNC_TIMEOUT_S = 600.0


class TrainingSetupError(AmygdalaError):
    """Training is switched on but cannot work with this server's settings or model folder."""


def api_key() -> str | None:
    return os.environ.get(API_KEY_ENV) or None


def settings() -> tuple[str, float, int]:
    """(optimizer, sync delay s, threads) from the environment, each checked; raises naming the variable."""
    from amygdala.train.apollo import KINDS

    optimizer = os.environ.get(OPTIMIZER_ENV) or "apollo-mini"
    if optimizer not in KINDS:
        raise TrainingSetupError(f"{OPTIMIZER_ENV}={optimizer!r}: use one of {', '.join(KINDS)}")
    raw = os.environ.get(SYNC_DELAY_ENV)
    try:
        delay = DEFAULT_SYNC_DELAY if not raw else float(raw)
        if not delay >= 0 or delay == float("inf"):
            raise ValueError
    except ValueError:
        raise TrainingSetupError(f"{SYNC_DELAY_ENV}={raw!r}: give the seconds between the last job and the checkpoint sync, e.g. 600") from None
    raw = os.environ.get(THREADS_ENV)
    if raw and not (raw.isdigit() and int(raw) >= 1):
        raise TrainingSetupError(f"{THREADS_ENV}={raw!r}: give a number of threads >= 1, or unset it")
    return optimizer, delay, int(raw) if raw else 0


def addresses() -> tuple[str, str]:
    """(worker control, API server events), created and exported on first use."""
    if not (os.environ.get(CONTROL_ENV) and os.environ.get(EVENTS_ENV)):
        folder = Path(tempfile.mkdtemp(prefix="amygdala-train-"))  # 0700: other users cannot connect
        atexit.register(shutil.rmtree, folder, ignore_errors=True)  # this process outlives its children
        os.environ[CONTROL_ENV] = f"ipc://{folder / 'worker.sock'}"
        os.environ[EVENTS_ENV] = f"ipc://{folder / 'server.sock'}"
    return os.environ[CONTROL_ENV], os.environ[EVENTS_ENV]


# --------------------------------------------------------------------------- engine side
def register() -> None:
    """Install the engine side when ``AMYGDALA_API_KEY`` is set (called in every vLLM process).

    Only when ``VLLM_PLUGINS`` names the plugin too: vLLM loads the routes only then, and a
    worker nobody can reach would hold the folder and cost the packed kernels for nothing.
    """
    if api_key() is None:
        return
    from amygdala.serve.config import PLUGIN_NAME

    settings()
    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is None or PLUGIN_NAME not in [p.strip() for p in allowed.split(",")]:
        log.warning("amygdala: %s is set but VLLM_PLUGINS does not name %r, so vLLM would not load the training "
                    "routes: training is off; start with VLLM_PLUGINS=%s (or use `amygdala serve`)",
                    API_KEY_ENV, PLUGIN_NAME, PLUGIN_NAME)
        return
    addresses()
    _keep_plain_weights()
    _wrap_engine_config()
    _wrap_load_model()


def check_engine_config(vllm_config) -> None:
    """Raise (one line) when training cannot work with this engine; then replay a cut sync."""
    from vllm.config import CompilationMode

    from amygdala.train import checkpoint
    from amygdala.train.worker import folder_lock

    cc = vllm_config.compilation_config
    if cc.mode != CompilationMode.NONE:
        raise TrainingSetupError(
            "training updates the served weights in place, which a compiled graph may have frozen or packed: "
            "start vLLM with --enforce-eager (amygdala serve does)")
    pc = vllm_config.parallel_config
    if pc.tensor_parallel_size * pc.pipeline_parallel_size * pc.data_parallel_size > 1:
        raise TrainingSetupError("training runs on one worker holding the whole model: drop tensor/pipeline/data parallelism")
    folder = Path(str(vllm_config.model_config.model))
    if not folder.is_dir() or not any(folder.glob("*.safetensors")):
        raise TrainingSetupError(
            f"{folder}: training needs a local model folder with .safetensors files (it is the checkpoint); "
            "serve a folder, e.g. one written by save_pretrained")
    if not os.access(folder, os.W_OK):
        raise TrainingSetupError(f"{folder}: not writable; training syncs its changes into the model folder")
    with folder_lock(folder):  # no other worker is writing it, so a leftover journal is ours to replay
        replayed = checkpoint.recover(folder)
    if replayed is not None:
        log.warning("amygdala: %s: replayed an interrupted checkpoint sync (%d blocks)", folder, replayed)


TRAINING_MARK = "_amygdala_training"


def _marked(fn) -> bool:
    return is_ours(fn, TRAINING_MARK)


def _mark(wrapper, original):
    return mark(wrapper, original, TRAINING_MARK)


def _keep_plain_weights() -> None:
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    original = UnquantizedLinearMethod.process_weights_after_loading
    if _marked(original):
        return

    def process_weights_after_loading(self, layer):
        layer._cpu_skip_gemm_dispatch = True  # vLLM CPU: keep layer.weight, use F.linear on it
        return original(self, layer)

    UnquantizedLinearMethod.process_weights_after_loading = _mark(process_weights_after_loading, original)


def _wrap_engine_config() -> None:
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if _marked(original):
        return

    def create_engine_config(self, *args, **kwargs):
        config = original(self, *args, **kwargs)
        check_engine_config(config)
        return config

    EngineArgs.create_engine_config = _mark(create_engine_config, original)


def _wrap_load_model() -> None:
    from vllm.v1.worker import gpu_worker

    cls = gpu_worker.Worker
    original = cls.load_model
    if _marked(original):
        return

    def load_model(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        start_worker(self)
        return result

    cls.load_model = _mark(load_model, original)


def start_worker(worker) -> None:
    """Start the training worker on views of ``worker``'s freshly loaded parameters."""
    from amygdala.train.worker import WorkerSpec, spawn

    model = worker.model_runner.get_model()
    served = {name: p.data for name, p in model.named_parameters()}
    packed = [name for name, t in served.items() if t.numel() == 0]
    if packed:
        raise TrainingSetupError(
            f"{packed[0]}: vLLM replaced this weight by a packed kernel ({len(packed)} in all), so training could "
            "not reach inference; this vLLM build packs weights amygdala does not know how to keep")
    optimizer, delay, threads = settings()
    control, events = addresses()
    spec = WorkerSpec(str(worker.model_config.model), control, events, optimizer, delay, threads)
    worker._amygdala_training = spawn(served, spec)  # keep the Popen: the worker lives as long as this process
    log.info("amygdala: training worker started on %d served tensors (pid %d)", len(served), worker._amygdala_training.pid)


# --------------------------------------------------------------------------- API side
def _error(status: HTTPStatus, message: str, param: str | None = None):
    """An error in vLLM's (and OpenAI's) shape, so clients handle it like any other."""
    from fastapi.responses import JSONResponse

    kinds = {400: "BadRequestError", 401: "AuthenticationError", 503: "ServiceUnavailableError", 504: "TimeoutError"}
    body = {"error": {"message": message, "type": kinds.get(int(status), "InternalServerError"), "param": param,
                      "code": int(status)}}
    headers = {"WWW-Authenticate": "Bearer"} if status == HTTPStatus.UNAUTHORIZED else None
    return JSONResponse(body, status_code=int(status), headers=headers)


class WorkerUnavailable(Exception):
    """The training worker did not answer in time."""


async def ask(address: str, message: dict, timeout: float) -> dict:
    """One request to the worker on a fresh REQ socket (a timeout never leaves a socket mid-exchange)."""
    import zmq
    import zmq.asyncio

    sock = zmq.asyncio.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)

    async def exchange() -> dict:
        await sock.send(json.dumps(message).encode())
        return json.loads(await sock.recv())

    try:
        return await asyncio.wait_for(exchange(), timeout)
    except asyncio.TimeoutError:
        raise WorkerUnavailable from None
    finally:
        sock.close(0)


class TrainingRoutes:
    """The routes, attached to vLLM's app by the endpoint plugin when ``AMYGDALA_API_KEY`` is set."""

    def __init__(self) -> None:
        self.key = api_key()
        self.limits = None  # amygdala.train.inputs.Limits of the served model, from init_state
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
        app.include_router(router)

    async def init_state(self, engine_client) -> None:
        if self.key is None or engine_client is None:
            return
        import zmq
        import zmq.asyncio

        from amygdala.train.inputs import Limits

        self.engine_client = engine_client
        self.limits = Limits.from_config(engine_client.model_config.hf_config)
        sock = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(addresses()[1])
        self._events_task = asyncio.get_running_loop().create_task(self._answer_resets(sock), name="amygdala-train-events")
        log.info("amygdala: training routes on (%s, %s, %s)", TRAIN, STATUS, CHECKPOINT)

    async def _answer_resets(self, sock) -> None:
        """The worker asks after each job; preempted running requests are recomputed with the new weights."""
        while True:
            ident, _, _body = await sock.recv_multipart()
            try:
                ok = await self.engine_client.reset_prefix_cache(reset_running_requests=True)
                reply = {"ok": bool(ok), "error": None if ok else "vLLM refused the reset"}
            except Exception as e:  # noqa: BLE001 - the worker logs it; serving goes on
                reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            await sock.send_multipart([ident, b"", json.dumps(reply).encode()])

    # ------------------------------------------------------------------ routes
    def _denied(self, request: Request):
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.key.encode()):
            return _error(HTTPStatus.UNAUTHORIZED, f"training routes need the header 'Authorization: Bearer <key>' with the "
                                                   f"server's {API_KEY_ENV}")
        return None

    async def _ask(self, message: dict, timeout: float = ANSWER_TIMEOUT_S):
        try:
            return await ask(addresses()[0], message, timeout), None
        except WorkerUnavailable:
            if message["op"] == "checkpoint":
                return None, _error(HTTPStatus.GATEWAY_TIMEOUT, f"the sync did not finish within {timeout:.0f} s (it waits for "
                                                                "the running job); it still runs: see GET /train/status's last_sync")
            return None, _error(HTTPStatus.SERVICE_UNAVAILABLE, f"the training worker did not answer within {timeout:.0f} s; "
                                                                "see the server log")

    async def train(self, request: Request):
        from fastapi.responses import JSONResponse

        from amygdala.train.inputs import TrainInputError, parse_request

        if (denied := self._denied(request)) is not None:
            return denied
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return _error(HTTPStatus.BAD_REQUEST, f"body: not JSON ({e}); send {{\"samples\": [...], \"config\": {{...}}}}", "body")
        if self.limits is not None:
            try:
                parse_request(body, self.limits)
            except TrainInputError as e:
                return _error(HTTPStatus.BAD_REQUEST, str(e), e.field)
        reply, failed = await self._ask({"op": "submit", "request": body})
        if failed is not None:
            return failed
        if not reply["ok"]:
            return _error(HTTPStatus.BAD_REQUEST, reply["error"]["message"], reply["error"].get("field"))
        return JSONResponse(reply["job"])

    async def status(self, request: Request):
        from fastapi.responses import JSONResponse

        if (denied := self._denied(request)) is not None:
            return denied
        reply, failed = await self._ask({"op": "status"})
        return failed if failed is not None else JSONResponse(reply["status"])

    async def checkpoint(self, request: Request):
        from fastapi.responses import JSONResponse

        if (denied := self._denied(request)) is not None:
            return denied
        reply, failed = await self._ask({"op": "checkpoint"}, SYNC_TIMEOUT_S)
        if failed is not None:
            return failed
        if not reply["ok"]:
            return _error(HTTPStatus.INTERNAL_SERVER_ERROR, reply["error"]["message"])
        return JSONResponse(reply["sync"])
