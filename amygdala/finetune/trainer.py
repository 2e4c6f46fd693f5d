"""The online trainer: jobs of in-place updates, optimizer state that persists, checkpoint sync.

What the training worker (the process beside vLLM) holds is one :class:`Trainer`: a model whose
parameters are the served weights (:func:`amygdala.finetune.shared_weights.view_model`), its optimizer,
and the model folder. It is synchronous and single-threaded on purpose: the worker runs one
job at a time and never syncs while a job runs, which is what makes the sync's snapshot of
the served tensors consistent. Serving (reads) may go on during both.

Failure semantics: every step is checked before it is applied (a finite loss, then a finite
gradient norm: a finite loss can still overflow in the backward, and one non-finite gradient
would write NaN into the weights everyone is served); a job that fails at step k has applied
steps 1..k-1 in place and raises :class:`TrainJobError` saying so. A job asked to stop
(``stop()`` true, checked between steps) ends after the step in flight.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from amygdala import AmygdalaError
from amygdala import checkpoint
from amygdala.finetune.apollo import OptimizerSettings, build_optimizer, state_nbytes
from amygdala.finetune.budget import Dims
from amygdala.finetune.inputs import JobConfig, Limits, Sample, parse_request
from amygdala.finetune.objectives import reference_logprobs, sample_losses
from amygdala.finetune.trainable import Trainable
from amygdala.finetune.state import STATE_FILE, encode_state, load_state


class TrainJobError(AmygdalaError):
    """A job that stopped part-way; the message says which steps were applied."""

    def __init__(self, message: str, steps_applied: int):
        super().__init__(message)
        self.steps_applied = steps_applied


@dataclass
class JobResult:
    steps: int
    losses: list[float]
    seconds: float


def run_job(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    samples: Sequence[Sample],
    config: JobConfig,
    on_step: Callable[[int, float], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> JobResult:
    """``config.steps`` updates of ``model`` in place, each on all ``samples``; per-step losses.

    The loss of a step is the mean over samples of the objective's per-sample loss, before
    the update. Gradients are freed at the end so nothing but optimizer state outlives a job.
    """
    t0 = time.perf_counter()
    for group in optimizer.param_groups:
        group["lr"] = config.learning_rate
    mb = config.micro_batch
    chunks = [list(samples[b : b + mb]) for b in range(0, len(samples), mb)]
    references = None
    if config.objective == "dpo":
        ref_c, ref_r = reference_logprobs(model, samples, mb)
        references = [(ref_c[b : b + mb], ref_r[b : b + mb]) for b in range(0, len(samples), mb)]
    losses: list[float] = []
    try:
        for step in range(1, config.steps + 1):
            if stop is not None and stop():
                break
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for i, chunk in enumerate(chunks):
                loss = sample_losses(model, chunk, config, references[i] if references else None).sum() / len(samples)
                if not torch.isfinite(loss):
                    raise TrainJobError(
                        f"step {step}: the loss is {loss.item()}; steps 1..{step - 1} were applied, this one was not "
                        "(lower config.learning_rate)", step - 1)
                loss.backward()
                total += loss.item()
            _check_gradients(optimizer, step)
            optimizer.step()
            losses.append(total)
            if on_step is not None:
                on_step(step, total)
    finally:
        optimizer.zero_grad(set_to_none=True)
    return JobResult(len(losses), losses, time.perf_counter() - t0)


def _check_gradients(optimizer: torch.optim.Optimizer, step: int) -> None:
    """Refuse the step when the gradients' norm is not finite (one pass over the gradients)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(0.0)
    if not torch.isfinite(norm):
        raise TrainJobError(
            f"step {step}: the gradient norm is {norm.item()}; steps 1..{step - 1} were applied, this one was not "
            "(lower config.learning_rate, or config.beta / config.orpo_lambda)", step - 1)


@dataclass
class SyncInfo:
    at: float
    report: checkpoint.SyncReport


@dataclass
class Trainer:
    """A model on the served weights, its optimizer (restored from the folder) and the folder.

    ``served``: the tensors a sync writes back (vLLM's names or the checkpoint's); by default
    the model's own parameters. ``train_embeddings``: embeddings and lm_head are frozen by
    default (the paper fine-tunes the attention and MLP projections; a plain-AdamW state for
    a 50k x d embedding would outweigh the rest of APOLLO-Mini's state many times).
    ``trainable``: the layers and modules that train (:mod:`amygdala.finetune.trainable`; all by
    default); in bf16 the sync writes about what this set holds, every job.
    """

    model: nn.Module
    model_dir: Path
    settings: OptimizerSettings = field(default_factory=OptimizerSettings)
    served: Mapping[str, torch.Tensor] | None = None
    train_embeddings: bool = False
    trainable: Trainable = field(default_factory=Trainable)
    limits: Limits = field(init=False)
    dims: Dims = field(init=False)  # for the memory estimate of a job (amygdala.finetune.budget)
    optimizer: torch.optim.Optimizer = field(init=False)
    names: list[str] = field(init=False)  # trainable parameters, in optimizer order
    counters: dict[str, int] = field(init=False)  # "steps", "jobs": continue across restarts
    recent_losses: list[float] = field(init=False, default_factory=list)
    last_sync: SyncInfo | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.model_dir = Path(self.model_dir)
        checkpoint.recover(self.model_dir)  # a state file half-synced must not be restored
        if not self.train_embeddings:
            for module in (self.model.get_input_embeddings(), self.model.get_output_embeddings()):
                if module is not None:
                    module.weight.requires_grad_(False)
        self.trainable.apply(self.model)
        if self.served is None:
            self.served = {n: p.detach() for n, p in self.model.named_parameters()}
        self.limits = Limits.from_config(self.model.config)
        self.dims = Dims.of(self.model)
        self.optimizer, self.names = build_optimizer(self.model, self.settings)
        self.counters = load_state(self.model_dir, self.optimizer, self.names, self.settings) or {"steps": 0, "jobs": 0}

    def parse(self, request: object) -> tuple[list[Sample], JobConfig]:
        """Check a ``/train`` request body against this model (raises FieldError)."""
        return parse_request(request, self.limits)

    def run(self, samples: Sequence[Sample], config: JobConfig, on_step: Callable[[int, float], None] | None = None,
            stop: Callable[[], bool] | None = None) -> JobResult:
        def count(step: int, loss: float) -> None:
            self.counters["steps"] += 1
            self.recent_losses = (self.recent_losses + [loss])[-50:]
            if on_step is not None:
                on_step(step, loss)

        try:
            return run_job(self.model, self.optimizer, samples, config, count, stop)
        finally:
            self.counters["jobs"] += 1

    def sync(self) -> checkpoint.SyncReport:
        """Write changed blocks and the optimizer state into the folder, in one transaction."""
        state = encode_state(self.optimizer, self.names, self.settings, self.counters)
        report = checkpoint.sync(self.model_dir, self.served, sidecars={STATE_FILE: state})
        self.last_sync = SyncInfo(time.time(), report)
        return report

    def status(self) -> dict:
        """Plain JSON for ``GET /train/status``."""
        last = None
        if self.last_sync is not None:
            r = self.last_sync.report
            last = {"at": self.last_sync.at, "tensors_changed": len(r.tensors_changed), "bytes_written": r.bytes_written,
                    "seconds": round(r.seconds, 3)}
        return {
            "steps": self.counters["steps"],
            "jobs": self.counters["jobs"],
            "recent_losses": list(self.recent_losses),
            "optimizer": {
                "kind": self.settings.kind,
                **(self.settings.group_options() if self.settings.kind != "adamw" else {}),
                "state_bytes": state_nbytes(self.optimizer),
                "trainable_tensors": len(self.names),
            },
            "trainable": self.trainable.describe(),
            "last_sync": last,
            "model_dir": os.fspath(self.model_dir),
        }
