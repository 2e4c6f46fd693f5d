"""The training worker: a process beside the server that trains the served weights in place.

Why a process of its own: a job is seconds to minutes of forward and backward passes; run in
the API server it would stall every request's event loop (the original system's bug), run in
vLLM's worker it would stall the forward passes. Here it runs on its own cores while vLLM keeps
serving from the same memory: the worker's transformers model is built on *views* of the
served tensors (:func:`amygdala.finetune.shared_weights.view_model`), which the holder moved to shared
memory (CPU) or exports as CUDA IPC handles, so every optimizer step lands in the weights the
next request reads (HOGWILD: no pause, no copy).

Pieces (the process's entry point is ``python -m amygdala.finetune.worker``; the job queue it
runs is :mod:`amygdala.finetune.service`):

- :func:`spawn` (called in the holder, i.e. vLLM's worker process): moves the tensors to shared
  memory in place, starts the process, hands it the handles and waits until it is ready, so a
  worker that cannot start (a folder another worker holds, an optimizer state saved for other
  settings) stops the server at start with its one-line error.
- :class:`~amygdala.finetune.service.TrainingService` (its own module): the queue. One job at a time on one thread; a sync runs on the same
  thread, so no job ever writes while a sync snapshots the weights. ``POST /checkpoint`` syncs
  after the running job, before queued ones; otherwise a sync runs ``sync_delay`` seconds after
  the last job (a new job restarts the delay). After every job that changed weights it asks the
  API server to reset vLLM's prefix cache (KV computed with the old weights must not serve
  new requests), and only then reports the job done.
- :func:`serve`: a ZeroMQ ROUTER on a local ``ipc://`` socket answering the API server
  (``submit``, ``status``, ``checkpoint``, ``snapshot``, ``rollback``; JSON messages), on its
  own thread, so status is answered while a job trains. It exits when the holder process is gone.

The folder's writer lock (:func:`amygdala.checkpoint.writer_lock`) is held for the
worker's life: one writer per checkpoint folder; ``amygdala checkpoint sync`` waits for it.

Bounds on work (each refusal names the field or says what to do): at most ``max_queue`` jobs
waiting (:class:`QueueFull`, a 429 on the route), a memory estimate of one micro-batch checked
against the memory the machine has before a job is queued (:mod:`amygdala.finetune.budget`),
and ``cancel`` (``DELETE /train/{id}``): a queued job is dropped, a running one stops after
the step in flight.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from amygdala import AmygdalaError
from amygdala import checkpoint
from amygdala.finetune import protocol
from amygdala.fields import FieldError
from amygdala.finetune.trainer import Trainer


from amygdala.finetune.service import QueueFull, TrainingService, UnknownJob, WorkerError, RESET_TIMEOUT_S

log = logging.getLogger("amygdala.finetune.worker")


def handle(service: TrainingService, message: dict | None, defer: Callable[[dict], None]) -> dict | None:
    """One request from the API server -> its reply (None: ``defer`` will be called with it)."""
    op = message.get("op") if message is not None else None
    if op == protocol.STATUS:
        return protocol.ok(op, service.status())
    if op == protocol.SUBMIT:
        try:
            return protocol.ok(op, service.submit(message.get("request")))
        except FieldError as e:
            return protocol.failed(str(e), e.path)
        except QueueFull as e:
            return protocol.failed(str(e), status=429)
    if op == protocol.CANCEL:
        try:
            return protocol.ok(op, service.cancel(message.get("job_id")))
        except UnknownJob as e:
            return protocol.failed(str(e), "job_id", status=409 if e.finished else 404)
    if op == protocol.CHECKPOINT:
        service.checkpoint(defer)
        return None
    if op in (protocol.SNAPSHOT, protocol.ROLLBACK):
        if op == protocol.ROLLBACK and not isinstance(message.get("snapshot"), str):
            return protocol.failed("expected the id of a snapshot (a string, from POST /train/snapshot)", "snapshot")
        service.control(message, defer)
        return None
    return protocol.failed(f"unknown op {op!r}")


def serve(service: TrainingService, address: str, *, parent_pid: int | None = None, stop: threading.Event | None = None) -> None:
    """Answer requests on ``address`` (a ROUTER: one REQ socket per API request) until the holder
    process ``parent_pid`` is gone (then exit the process at once: a sync cut here is replayed
    by the next start) or ``stop`` is set."""
    import zmq

    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(address)
    deferred: queue.SimpleQueue[tuple[bytes, dict]] = queue.SimpleQueue()
    try:
        while stop is None or not stop.is_set():
            if parent_pid is not None and os.getppid() != parent_pid:
                log.info("the server process is gone; the training worker exits")
                os._exit(0)
            if sock.poll(50):
                ident, _, body = sock.recv_multipart()
                try:
                    reply = handle(service, protocol.decode(body), lambda r, ident=ident: deferred.put((ident, r)))
                except Exception as e:  # a bug: answer it rather than leave the API server waiting
                    log.exception("training request failed")
                    reply = protocol.failed(f"{type(e).__name__}: {e}")
                if reply is not None:
                    sock.send_multipart([ident, b"", protocol.encode(reply)])
            while not deferred.empty():
                ident, reply = deferred.get()
                sock.send_multipart([ident, b"", protocol.encode(reply)])
    finally:
        sock.close(0)


class CacheResetter:
    """Asks the API server (a ROUTER at ``address``) to reset vLLM's prefix cache; waits for the answer."""

    def __init__(self, address: str, timeout: float = RESET_TIMEOUT_S):
        self.address, self.timeout = address, timeout

    def __call__(self) -> tuple[bool, str | None]:
        try:
            reply = protocol.ask_blocking(self.address, protocol.request(protocol.RESET_PREFIX_CACHE), self.timeout)
        except protocol.Unanswered as e:
            return False, f"the API server gave {e}"
        return bool(reply.get("ok")), None if reply.get("ok") else protocol.error_message(reply)


# --------------------------------------------------------------------------- the process
@dataclass(frozen=True)
class WorkerSpec:
    """What the worker process needs besides the tensors."""

    model_dir: str
    control: str  # ipc:// address it binds for the API server
    events: str | None = None  # ipc:// address of the API server's prefix-cache resets
    optimizer: str = "apollo-mini"
    sync_delay: float = 600.0
    threads: int = 0  # torch threads; 0: torch's default
    train_layers: str = ""  # AMYGDALA_TRAIN_LAYERS (amygdala.finetune.trainable); "": all
    train_modules: str = ""  # AMYGDALA_TRAIN_MODULES; "": all


def spawn(served: Mapping[str, torch.Tensor], spec: WorkerSpec, *, timeout: float = 300.0) -> subprocess.Popen:
    """Start a training worker on views of ``served`` (the holder's tensors, e.g. vLLM's parameters).

    CPU tensors are moved to shared memory *in place* first (``share_memory_()`` swaps each
    storage's memory; every tensor on that storage, vLLM's included, follows), with torch's
    ``file_system`` strategy so the worker opens them by name. CUDA tensors go as IPC handles;
    the holder must keep them alive. Returns once the worker is ready; raises WorkerError with
    the worker's own message when it cannot start.
    """
    import torch.multiprocessing as tmp

    from amygdala.finetune.shared_weights import export_handles

    need = sum(t.numel() * t.element_size() for t in served.values() if t.device.type == "cpu" and not t.is_shared())
    if need and os.path.isdir("/dev/shm"):  # a full tmpfs would not fail here but SIGBUS later, mid-serving
        fs = os.statvfs("/dev/shm")
        if fs.f_bavail * fs.f_frsize < need:
            raise WorkerError(f"/dev/shm: {fs.f_bavail * fs.f_frsize / 2**20:.0f} MiB free, but the served weights need "
                              f"{need / 2**20:.0f} MiB of shared memory; give it more (e.g. docker run --shm-size)")
    tmp.set_sharing_strategy("file_system")
    for t in served.values():
        if t.device.type == "cpu" and not t.is_shared():
            t.share_memory_()
    payload = pickle.dumps({"spec": asdict(spec), "handles": export_handles(served), "parent_pid": os.getpid()})
    ready_r, ready_w = os.pipe()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "amygdala.finetune.worker", str(ready_w)],
                                stdin=subprocess.PIPE, pass_fds=(ready_w,))
    finally:
        os.close(ready_w)
    with os.fdopen(ready_r, "rb") as ready:
        try:
            proc.stdin.write(payload)
            proc.stdin.close()
        except BrokenPipeError:
            pass  # it died before reading: its exit code says so below
        answer, deadline = b"", time.monotonic() + timeout
        while time.monotonic() < deadline:
            if select.select([ready], [], [], 0.5)[0]:
                chunk = os.read(ready.fileno(), 65536)
                if not chunk:
                    break
                answer += chunk
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
            raise WorkerError(f"the training worker was not ready after {timeout:.0f} s")
    try:
        message = json.loads(answer) if answer else {"ok": False, "error": f"exited with code {proc.wait()}"}
    except json.JSONDecodeError:
        message = {"ok": False, "error": answer.decode(errors="replace")}
    if not message.get("ok"):
        proc.wait()
        raise WorkerError(f"the training worker did not start: {message.get('error')}")
    return proc


def _start(payload: dict, stack: contextlib.ExitStack) -> tuple[TrainingService, WorkerSpec]:
    from transformers import AutoConfig

    from amygdala.finetune.apollo import OptimizerSettings
    from amygdala.finetune.trainable import Trainable
    from amygdala.finetune.shared_weights import import_handles, view_model

    spec = WorkerSpec(**payload["spec"])
    if spec.threads:
        torch.set_num_threads(spec.threads)
    stack.enter_context(checkpoint.writer_lock(spec.model_dir, holder="training worker"))
    served = import_handles(payload["handles"])
    model = view_model(AutoConfig.from_pretrained(spec.model_dir), served)
    trainer = Trainer(model, Path(spec.model_dir), settings=OptimizerSettings(spec.optimizer), served=served,
                      trainable=Trainable(spec.train_layers, spec.train_modules))
    reset = CacheResetter(spec.events) if spec.events else None
    return TrainingService(trainer, sync_delay=spec.sync_delay, reset_cache=reset), spec


def main(argv: list[str]) -> int:
    """The process: read the payload from stdin, build the trainer, answer on the control socket."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s [amygdala finetune] %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the server; this process follows it
    ready = os.fdopen(int(argv[0]), "w")
    payload = pickle.loads(sys.stdin.buffer.read())
    with contextlib.ExitStack() as stack:
        try:
            service, spec = _start(payload, stack)
        except Exception as e:  # reported to the holder, which stops the server with it
            ready.write(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}" if not isinstance(e, AmygdalaError) else str(e)}))
            ready.close()
            return 1
        status = service.status()
        ready.write(json.dumps({"ok": True, "steps": status["steps"]}))
        ready.close()
        log.info("training worker ready: %d trainable tensors, %s, step %d, sync %.0f s after the last job",
                 status["optimizer"]["trainable_tensors"], spec.optimizer, status["steps"], spec.sync_delay)
        stop = threading.Event()
        threading.Thread(target=service.run, args=(stop,), name="amygdala-train-jobs", daemon=True).start()
        serve(service, spec.control, parent_pid=payload["parent_pid"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
