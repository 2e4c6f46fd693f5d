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

Early stop (``holdout`` > 0): the last share of the samples is held out (never trained on), and
the objective's loss on them is evaluated before the first step and after every step. The job
stops once that loss has risen ``patience`` evaluations in a row, and, stopped or not, it ends
with the weights of its best evaluation put back in place (a copy of the trainable weights,
taken at each new best: memory as large as the gradients, budgeted). Why restore rather than
stop at the rise: the steps past the best are the memorising ones the held-out loss saw; the
optimizer's moments keep those steps (they are statistics, not the weights).
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
from amygdala.finetune.inputs import JobConfig, Limits, Sample, parse_request, split_holdout
from amygdala.finetune.objectives import (kl_to_reference, neutral_split, reference_distributions, reference_logprobs,
                                          sample_losses)
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
    heldout_losses: list[float] = field(default_factory=list)  # [0]: before the first step; then after each
    best_step: int | None = None  # the step whose weights the job ended with (holdout on)
    stopped_early: bool = False


def _chunks(items: Sequence, size: int) -> list[list]:
    return [list(items[b : b + size]) for b in range(0, len(items), size)]


class _Anchor:
    """The anchor's fixed references (objectives.py), and its loss terms, one micro-batch at a time."""

    def __init__(self, model: nn.Module, chunks: list[list[Sample]], config: JobConfig):
        self.weight = config.anchor
        self.own = [([s.context_ids for s in c], [s.continuation_ids for s in c]) for c in chunks]
        self.neutral = [tuple(zip(*map(neutral_split, c))) for c in _chunks(config.neutral, config.micro_batch)]
        self.own_n, self.neutral_n = sum(len(c) for c in chunks), len(config.neutral)
        self.refs = [reference_distributions(model, *pair) for pair in self.own + self.neutral]

    def terms(self, model: nn.Module):
        """Each micro-batch's share of ``weight`` x (mean KL on the job's samples + mean KL on the neutral set)."""
        for i, (contexts, continuations) in enumerate(self.own + self.neutral):
            n = self.own_n if i < len(self.own) else self.neutral_n
            yield self.weight * kl_to_reference(model, contexts, continuations, self.refs[i]).sum() / n


def _finite(loss: torch.Tensor, step: int) -> torch.Tensor:
    if not torch.isfinite(loss):
        raise TrainJobError(
            f"step {step}: the loss is {loss.item()}; steps 1..{step - 1} were applied, this one was not "
            "(lower config.learning_rate)", step - 1)
    return loss


def run_job(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    samples: Sequence[Sample],
    config: JobConfig,
    on_step: Callable[[int, float], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> JobResult:
    """Up to ``config.steps`` updates of ``model`` in place, each on all training samples; per-step losses.

    The loss of a step is the mean over training samples of the objective's per-sample loss
    (plus the anchor's terms), before the update. Each micro-batch's terms are backpropagated
    on their own, so only one graph is alive at a time. Gradients are freed at the end so
    nothing but optimizer state outlives a job.
    """
    t0 = time.perf_counter()
    for group in optimizer.param_groups:
        group["lr"] = config.learning_rate
    train, held = split_holdout(list(samples), config.holdout)
    chunks, held_chunks = _chunks(train, config.micro_batch), _chunks(held, config.micro_batch)
    references: list | None = None
    held_refs: list | None = None
    if config.objective in ("dpo", "dpop"):
        references = [reference_logprobs(model, c, len(c)) for c in chunks]
        held_refs = [reference_logprobs(model, c, len(c)) for c in held_chunks]
    anchor = _Anchor(model, chunks, config) if config.anchor > 0 else None
    early = _EarlyStop(model, held_chunks, held_refs, config) if held else None
    losses: list[float] = []
    try:
        for step in range(1, config.steps + 1):
            if stop is not None and stop():
                break
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for i, chunk in enumerate(chunks):
                loss = _finite(sample_losses(model, chunk, config, references[i] if references else None).sum() / len(train), step)
                loss.backward()
                total += loss.item()
            for term in anchor.terms(model) if anchor is not None else ():
                _finite(term, step).backward()
                total += term.item()
            _check_gradients(optimizer, step)
            optimizer.step()
            losses.append(total)
            if on_step is not None:
                on_step(step, total)
            if early is not None and early.evaluate(step):
                break
    finally:
        optimizer.zero_grad(set_to_none=True)
    if early is None:
        return JobResult(len(losses), losses, time.perf_counter() - t0)
    early.restore()
    return JobResult(len(losses), losses, time.perf_counter() - t0, early.losses, early.best_step, early.stopped)


class _EarlyStop:
    """The held-out loss before the first step and after each, and the best evaluation's weights."""

    def __init__(self, model: nn.Module, chunks: list[list[Sample]], references: list | None, config: JobConfig):
        self.model, self.chunks, self.references, self.config = model, chunks, references, config
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.best = [p.detach().clone() for p in self.params]
        self.losses = [self._loss()]
        self.best_step, self.rises, self.stopped = 0, 0, False

    @torch.no_grad()
    def _loss(self) -> float:
        n = sum(len(c) for c in self.chunks)
        return sum(sample_losses(self.model, c, self.config, self.references[i] if self.references else None).sum().item()
                   for i, c in enumerate(self.chunks)) / n

    def evaluate(self, step: int) -> bool:
        """Record the held-out loss after ``step``; true when the job should stop."""
        loss = self._loss()
        self.rises = self.rises + 1 if loss > self.losses[-1] else 0
        if loss < min(self.losses):
            self.best_step = step
            with torch.no_grad():
                for saved, p in zip(self.best, self.params):
                    saved.copy_(p)
        self.losses.append(loss)
        self.stopped = self.rises >= self.config.patience
        return self.stopped

    def restore(self) -> None:
        with torch.no_grad():
            for saved, p in zip(self.best, self.params):
                p.copy_(saved)


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
