"""Undo for training runs: a copy of every weight a job may change, restored in place.

Why: a teach, dream or distill run changes the weights everyone is served, and the only other
way back is an older copy of the model folder (after a restart). A snapshot holds, in the
training worker's memory, a clone of each *trainable* parameter (the tensors the optimizer
updates; frozen embeddings and lm_head are not copied: no job can change them) and a deep copy
of the optimizer state, so a restore puts back the weights bit for bit and the moments that
belong to them. Restoring writes into the served storage (the parameters are views of it), so
the next request reads the restored weights at once.

One snapshot at a time: the clone costs as much memory as the trainable weights (about 400 MiB
for SmolLM2-135M in float32), and a new snapshot replaces the old one. It lives in the worker:
it is gone when the server stops. Step and job counters keep counting after a restore (they
count work done, not the state of the weights).
"""

from __future__ import annotations

import copy
import time
import uuid
from dataclasses import dataclass

import torch

from amygdala.finetune.trainer import Trainer


@dataclass
class Snapshot:
    id: str
    taken_at: float
    steps: int  # the trainer's step counter when it was taken
    tensors: dict[str, torch.Tensor]  # trainable parameter name -> clone
    optimizer_state: dict

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def describe(self) -> dict:
        return {"snapshot": self.id, "taken_at": self.taken_at, "steps": self.steps, "tensors": len(self.tensors),
                "bytes": self.nbytes}


def take(trainer: Trainer) -> Snapshot:
    """Clone the trainable weights and the optimizer state (call between jobs: on the job thread)."""
    params = dict(trainer.model.named_parameters())
    tensors = {name: params[name].detach().clone() for name in trainer.names}
    return Snapshot(f"snap-{uuid.uuid4().hex[:12]}", time.time(), trainer.counters["steps"], tensors,
                    copy.deepcopy(trainer.optimizer.state_dict()))


def restore(trainer: Trainer, snapshot: Snapshot) -> int:
    """Copy the snapshot back into the served weights in place; the number of tensors that differed."""
    params = dict(trainer.model.named_parameters())
    changed = 0
    with torch.no_grad():
        for name, saved in snapshot.tensors.items():
            live = params[name]
            if not torch.equal(live, saved):
                live.copy_(saved)
                changed += 1
    trainer.optimizer.load_state_dict(copy.deepcopy(snapshot.optimizer_state))
    return changed
