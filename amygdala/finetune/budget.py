"""A job's memory, estimated before it is queued, against the memory the machine has.

Why: a training request sets how big one forward is (``micro_batch`` samples of up to the
model's context, orpo/dpo twice), and a forward's activations and logits grow with it; a job
too big for the machine would not fail cleanly but push the server (which shares the memory)
into swap or the OOM killer. The estimate is an upper bound of one micro-batch's peak, meant
to catch jobs many times too big, not to predict the peak closely:

- activations kept for the backward and the logits of the positions that predict continuation
  tokens: :func:`amygdala.finetune.memory.step_activations`, the one model of a step, which
  tests/test_memory.py checks against what autograd keeps;
- one gradient per trainable parameter;
- what a job keeps from start to end: with ``anchor`` on, the reference distributions of every
  anchored position (:func:`amygdala.finetune.memory.reference_bytes`: the job's continuation
  positions and the neutral set's), and with ``holdout`` on, a copy of the trainable weights
  (the best step's, as large as the gradients).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from amygdala.finetune import memory
from amygdala.finetune.inputs import JobConfig, Sample, batch_shape

#: Share of the memory available now that one job may plan to use: the server keeps serving.
SHARE = 0.5


@dataclass(frozen=True)
class Dims:
    """What the estimate needs of a model: its shapes (:class:`~amygdala.finetune.memory.Shapes`),
    the bytes of one activation value and of the trainable parameters' gradients."""

    shapes: memory.Shapes
    value_bytes: int  # bytes per activation value (the weights' dtype)
    gradient_bytes: int  # bytes of the trainable parameters' gradients
    device: str = "cpu"

    @classmethod
    def of(cls, model) -> Dims:
        params = list(model.parameters())
        return cls(
            shapes=memory.shapes_of(model),
            value_bytes=params[0].element_size(),
            gradient_bytes=sum(p.numel() * p.element_size() for p in params if p.requires_grad),
            device=params[0].device.type,
        )


def estimate_bytes(samples: Sequence[Sample], config: JobConfig, dims: Dims) -> int:
    """The largest micro-batch's estimated peak (module docstring), in bytes."""
    worst = 0
    for b in range(0, len(samples), config.micro_batch):
        chunk = list(samples[b : b + config.micro_batch])
        rows, width = batch_shape(chunk, config.objective)
        keep = 1 + max(max(len(s.continuation_ids), len(s.rejected_ids or ())) for s in chunk)
        worst = max(worst, memory.step_activations(dims.shapes, rows, width, keep, dims.value_bytes))
    kept = dims.gradient_bytes if config.holdout > 0 else 0
    if config.anchor > 0:
        for b in range(0, len(config.neutral), config.micro_batch):  # a neutral forward: every position after the first
            chunk = config.neutral[b : b + config.micro_batch]
            width = max(map(len, chunk))
            worst = max(worst, memory.step_activations(dims.shapes, len(chunk), width, width, dims.value_bytes))
        mb = config.micro_batch
        positions = sum(len(c) * max(len(s.continuation_ids) for s in c) for c in _chunks(samples, mb))
        positions += sum(len(c) * (max(map(len, c)) - 1) for c in _chunks(config.neutral, mb))
        kept += memory.reference_bytes(positions, dims.shapes.vocab)
    return worst + dims.gradient_bytes + kept


def _chunks(items: Sequence, size: int) -> list:
    return [items[b : b + size] for b in range(0, len(items), size)]


def available_bytes(device: str = "cpu") -> int:
    """``SHARE`` of the memory available now: /proc/meminfo's MemAvailable, or a GPU's free memory."""
    if device == "cuda":
        import torch

        return int(SHARE * torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(SHARE * int(line.split()[1]) * 1024)
    except OSError:
        pass
    return int(SHARE * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
