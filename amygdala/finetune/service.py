"""The training job service: the queue the worker process runs (:class:`TrainingService`).

Why apart from the process (:mod:`amygdala.finetune.worker`): the queue, its bounds and its
sync timing are plain Python that a test drives in-process; the process adds only the socket,
the shared tensors and the entry point, which imports this module.

One job at a time on one thread; a sync runs on the same thread, so no job ever writes while a
sync snapshots the weights. ``POST /checkpoint`` syncs after the running job, before queued
ones; otherwise a sync runs ``sync_delay`` seconds after the last job (a new job restarts the
delay). After every job that changed weights it asks the API server to reset vLLM's prefix
cache (KV computed with the old weights must not serve new requests), and only then reports
the job done. Bounds on work: at most ``max_queue`` jobs waiting (:class:`QueueFull`, a 429 on
the route), a memory estimate of one micro-batch checked before a job is queued
(:mod:`amygdala.finetune.budget`), and ``cancel``: a queued job is dropped, a running one stops
after the step in flight.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


from amygdala import AmygdalaError
from amygdala import checkpoint
from amygdala.crash import crash_point
from amygdala.finetune import budget, protocol
from amygdala.fields import FieldError
from amygdala.finetune.inputs import JobConfig, Sample
from amygdala.finetune.trainer import Trainer, TrainJobError


log = logging.getLogger("amygdala.finetune.service")

#: Finished jobs kept for ``GET /train/status``.
KEEP_FINISHED = 20
#: Jobs that may wait behind the running one; more is a 429 (the client retries later).
MAX_QUEUE = 16
#: Seconds the worker waits for the API server to confirm a prefix-cache reset.
RESET_TIMEOUT_S = 60.0


class WorkerError(AmygdalaError):
    """The training worker could not start, or its folder is held by another one."""


class QueueFull(AmygdalaError):
    """``max_queue`` jobs are already waiting: try again after one finishes."""


class UnknownJob(AmygdalaError):
    """A cancel for a job id that is not queued or running (``finished``: it already ended)."""

    def __init__(self, message: str, finished: bool):
        super().__init__(message)
        self.finished = finished


# --------------------------------------------------------------------------- the queue
@dataclass
class Job:
    id: str
    samples: list[Sample]
    config: JobConfig
    submitted_at: float
    state: str = "queued"  # queued | running | done | failed | cancelled
    started_at: float | None = None
    finished_at: float | None = None
    step: int = 0
    losses: list[float] = field(default_factory=list)
    error: str | None = None
    prefix_cache_reset: bool | None = None
    cancel: bool = False  # asked to stop: the job thread ends it after the step in flight
    estimate_bytes: int = 0
    heldout_losses: list[float] = field(default_factory=list)  # with config.holdout: the early stop's evaluations
    best_step: int | None = None
    stopped_early: bool = False

    def describe(self) -> dict:
        out = {
            "id": self.id, "state": self.state, "objective": self.config.objective, "samples": len(self.samples),
            "steps": self.config.steps, "learning_rate": self.config.learning_rate, "submitted_at": self.submitted_at,
            "estimate_bytes": self.estimate_bytes,
        }
        if self.state != "queued":
            out.update(step=self.step, losses=list(self.losses), started_at=self.started_at)
        if self.finished_at is not None:
            out.update(finished_at=self.finished_at, seconds=round(self.finished_at - (self.started_at or self.finished_at), 3),
                       prefix_cache_reset=self.prefix_cache_reset)
        if self.config.holdout and self.finished_at is not None:
            out.update(heldout_losses=list(self.heldout_losses), best_step=self.best_step, stopped_early=self.stopped_early)
        if self.error is not None:
            out["error"] = self.error
        return out


#: ``reset_cache()`` -> (done, why not). Resets the server's prefix cache after a job.
CacheReset = Callable[[], "tuple[bool, str | None]"]


class TrainingService:
    """Jobs one at a time, syncs between them, and a status any thread may read.

    :meth:`submit`, :meth:`checkpoint` and :meth:`status` are called from the request thread;
    :meth:`run` is the one thread that touches the weights and the optimizer. The request
    thread never reads the optimizer: the job thread refreshes a status snapshot after every
    step, job and sync.
    """

    def __init__(self, trainer: Trainer, *, sync_delay: float = 600.0, reset_cache: CacheReset | None = None,
                 max_queue: int = MAX_QUEUE, memory_limit: Callable[[], int] | None = None):
        self.trainer = trainer
        self.sync_delay = float(sync_delay)
        self.reset_cache = reset_cache
        self.max_queue = max_queue
        # bytes a job may use, asked at each submit (the machine's memory changes while serving)
        self.memory_limit = memory_limit or (lambda: budget.available_bytes(trainer.dims.device))
        self._sync_error: str | None = None  # the last sync's failure, until a sync succeeds
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._current: Job | None = None
        self._finished: deque[Job] = deque(maxlen=KEEP_FINISHED)
        self._waiters: list[Callable[[dict], None]] = []  # POST /checkpoint callers awaiting a sync
        self._controls: deque[tuple[dict, Callable[[dict], None]]] = deque()  # snapshot / rollback requests
        self._snapshot_kept = None  # amygdala.finetune.snapshot.Snapshot: one at a time (its memory)
        self._syncing = False
        self._dirty = False  # weights changed since the last sync
        self._sync_due: float | None = None  # time.monotonic() of the automatic sync
        self._snapshot = trainer.status()

    # ------------------------------------------------------------------ request thread
    def submit(self, request: object) -> dict:
        """Queue a ``/train`` request; raises FieldError (the field), or QueueFull, before queueing anything."""
        samples, config = self.trainer.parse(request)
        need = budget.estimate_bytes(samples, config, self.trainer.dims)
        limit = self.memory_limit()
        if need > limit:
            raise FieldError("config.micro_batch", f"one micro-batch of this job needs about {need / 2**20:.0f} MiB "
                                  f"(estimate), over the {limit / 2**20:.0f} MiB the training worker may use now; lower "
                                  "config.micro_batch or shorten the samples")
        job = Job(f"job-{uuid.uuid4().hex[:12]}", samples, config, time.time(), estimate_bytes=need)
        with self._cond:
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} jobs are queued (the limit); retry after one finishes "
                                "(GET /train/status), or cancel one (DELETE /train/<id>)")
            ahead = len(self._queue) + (self._current is not None)
            self._queue.append(job)
            self._cond.notify_all()
        return {"job_id": job.id, "state": "queued", "ahead": ahead}

    def cancel(self, job_id: object) -> dict:
        """Drop a queued job, or ask the running one to stop after its step in flight; raises UnknownJob."""
        with self._cond:
            for job in self._queue:
                if job.id == job_id:
                    self._queue.remove(job)
                    job.state, job.finished_at, job.error = "cancelled", time.time(), "cancelled while queued; nothing was applied"
                    self._finished.append(job)
                    return job.describe()
            if self._current is not None and self._current.id == job_id:
                self._current.cancel = True
                return self._current.describe()
            ended = any(j.id == job_id for j in self._finished)
        raise UnknownJob(f"job {str(job_id)[:40]!r} " + ("has already ended; see GET /train/status" if ended else
                         "is not queued or running; see GET /train/status for the ids"), ended)

    def checkpoint(self, done: Callable[[dict], None]) -> None:
        """Sync after the running job (before queued ones); ``done(result)`` is called on the job thread."""
        with self._cond:
            self._waiters.append(done)
            self._cond.notify_all()

    def control(self, message: dict, done: Callable[[dict], None]) -> None:
        """Snapshot or rollback after the running job (before queued ones): they must never see a
        job half-applied; ``done(reply)`` is called on the job thread."""
        with self._cond:
            self._controls.append((message, done))
            self._cond.notify_all()

    def status(self) -> dict:
        with self._cond:
            state = "syncing" if self._syncing else "training" if self._current is not None else "idle"
            due = None if self._sync_due is None else max(0.0, self._sync_due - time.monotonic())
            return {
                **self._snapshot,
                "state": state,
                "current": self._current.describe() if self._current is not None else None,
                "queue": [j.describe() for j in self._queue],
                "finished": [j.describe() for j in reversed(self._finished)],
                "sync": {"delay_s": self.sync_delay, "unsynced_changes": self._dirty,
                         "due_in_s": None if due is None else round(due, 1), "requested": len(self._waiters),
                         "error": self._sync_error},
            }

    # ------------------------------------------------------------------ the job thread
    def run(self, stop: threading.Event) -> None:
        """Take work until ``stop`` is set: checkpoint requests, then snapshot/rollback requests,
        then jobs, then a due sync."""
        while not stop.is_set():
            with self._cond:
                control = self._controls.popleft() if self._controls and not self._waiters else None
                waiters, job, auto = self._next() if control is None else ([], None, False)
                if control is None and not waiters and job is None and not auto:
                    timeout = 0.5 if self._sync_due is None else min(0.5, max(0.0, self._sync_due - time.monotonic()))
                    self._cond.wait(timeout)
                    continue
            if control is not None:
                try:
                    reply = self._control(control[0])
                except Exception as e:  # e.g. no memory for the copy: answer, keep serving and training
                    log.exception("%s failed", control[0].get("op"))
                    reply = protocol.failed(f"{control[0].get('op')} failed: {type(e).__name__}: {e}")
                control[1](reply)
            elif job is not None:
                self._run_job(job)
            else:
                self._sync(waiters)

    def _next(self) -> tuple[list, Job | None, bool]:
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            self._syncing = True
            return waiters, None, False
        if self._queue:
            job = self._queue.popleft()
            job.state, job.started_at = "running", time.time()
            self._current = job
            return [], job, False
        if self._dirty and self._sync_due is not None and time.monotonic() >= self._sync_due:
            self._syncing = True
            return [], None, True
        return [], None, False

    def _run_job(self, job: Job) -> None:
        def on_step(step: int, loss: float) -> None:
            snapshot = self.trainer.status()
            with self._cond:
                job.step, self._snapshot = step, snapshot
                job.losses.append(loss)
            crash_point("train.step")  # a kill -9 test's mid-job window (amygdala.crash)

        try:
            result = self.trainer.run(job.samples, job.config, on_step=on_step, stop=lambda: job.cancel)
            job.heldout_losses, job.best_step, job.stopped_early = result.heldout_losses, result.best_step, result.stopped_early
            state, error = "done", None
            if job.step < job.config.steps and not result.stopped_early:
                state, error = "cancelled", f"cancelled: steps 1..{job.step} of {job.config.steps} were applied"
        except TrainJobError as e:
            state, error = "failed", str(e)
        except Exception as e:  # a bug or an exhausted machine: report it, keep serving
            log.exception("training job %s failed", job.id)
            state, error = "failed", (f"{type(e).__name__}: {e}; steps 1..{job.step} were applied, "
                                      f"step {job.step + 1} may be partly applied")
        if job.step > 0 and self.reset_cache is not None:
            job.prefix_cache_reset, why = self.reset_cache()
            if not job.prefix_cache_reset:
                log.warning("job %s: the prefix cache was not reset (%s); cached KV from the old weights "
                            "may serve requests until it is evicted", job.id, why)
        snapshot = self.trainer.status()
        with self._cond:
            job.state, job.error, job.finished_at = state, error, time.time()
            self._snapshot = snapshot
            if job.step > 0:
                self._dirty = True
                self._sync_due = time.monotonic() + self.sync_delay
            self._current = None
            self._finished.append(job)
        losses = f", loss {job.losses[0]:.4g} -> {job.losses[-1]:.4g}" if job.losses else ""
        log.info("job %s %s: %d of %d steps in %.2f s%s", job.id, state, job.step, job.config.steps,
                 job.finished_at - job.started_at, losses)

    def _control(self, message: dict) -> dict:
        """Take the snapshot, or restore it in place, reset the prefix cache and mark the restored
        weights for the next sync."""
        from amygdala.finetune import snapshot

        op = message.get("op")
        if op == protocol.SNAPSHOT:
            self._snapshot_kept = None  # free the old copy before making the new one
            self._snapshot_kept = snapshot.take(self.trainer)
            log.info("snapshot %s: %d tensors, %.1f MiB", self._snapshot_kept.id, len(self._snapshot_kept.tensors),
                     self._snapshot_kept.nbytes / 2**20)
            return protocol.ok(op, self._snapshot_kept.describe())
        wanted, kept = message.get("snapshot"), self._snapshot_kept
        if kept is None or wanted != kept.id:
            have = f"the worker holds {kept.id}" if kept is not None else "the worker holds none (a restart drops it)"
            return protocol.failed(f"no snapshot {wanted!r}: {have}; a snapshot is replaced by the next one", "snapshot")
        changed = snapshot.restore(self.trainer, kept)
        reset, why = (True, None) if changed == 0 or self.reset_cache is None else self.reset_cache()
        if not reset:
            log.warning("rollback: the prefix cache was not reset (%s)", why)
        snap = self.trainer.status()
        with self._cond:
            self._snapshot = snap
            if changed:
                self._dirty = True
                self._sync_due = time.monotonic() + self.sync_delay
        log.info("rollback to %s: %d tensors restored", kept.id, changed)
        return protocol.ok(protocol.ROLLBACK, {**kept.describe(), "tensors_restored": changed, "prefix_cache_reset": reset})

    def _sync(self, waiters: list[Callable[[dict], None]]) -> None:
        try:
            report = self.trainer.sync()
            result = protocol.ok(protocol.CHECKPOINT, {
                "tensors_changed": len(report.tensors_changed), "blocks": report.blocks,
                "bytes_written": report.bytes_written, "journal_bytes": report.journal_bytes,
                "sidecars": report.sidecars, "seconds": round(report.seconds, 3),
                "steps": self.trainer.counters["steps"]})
            log.info("checkpoint sync: %s", report.summary())
        except Exception as e:  # the folder is unchanged or recoverable (crash-safe); say why, retry later
            if isinstance(e, AmygdalaError):
                log.error("checkpoint sync refused: %s", e)
            else:
                log.exception("checkpoint sync failed")
            message = str(e) if isinstance(e, AmygdalaError) else f"{type(e).__name__}: {e}"
            # a refusal (non-finite weights, a busy folder) is a conflict the caller can act on; anything else is ours
            report, result = None, protocol.failed(f"checkpoint sync failed: {message}",
                                                   status=409 if isinstance(e, checkpoint.CheckpointError) else 500)
        snapshot = self.trainer.status()
        with self._cond:
            self._syncing, self._snapshot = False, snapshot
            self._sync_error = None if report is not None else protocol.error_message(result)
            if report is not None:
                self._dirty, self._sync_due = False, None
            elif self._dirty:
                self._sync_due = time.monotonic() + self.sync_delay
        for done in waiters:
            done(result)


# --------------------------------------------------------------------------- ZeroMQ
