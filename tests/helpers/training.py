"""Training helpers shared by the finetune and serve tests: a trainer on a tiny model, a poll."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from amygdala.checkpoint import layout
from amygdala.finetune import shared_weights
from amygdala.finetune.inputs import Limits
from amygdala.finetune.trainer import Trainer

from . import tiny

HUGE = 10**400
KEY = "hardening-key"
LIMITS = Limits(vocab_size=1000, max_length=1024)
#: A context and the continuation the SFT jobs of the worker and serve tests teach.
CONTEXT, CONTINUATION = [2, 10, 11, 12, 13], [40, 41, 42, 43, 44, 45]
SAMPLE = {"context_ids": [2, 10, 11], "continuation_ids": [40, 41, 42], "rejected_ids": [50, 51, 52]}


def request(steps: int = 15, lr: float = 1e-2, context=CONTEXT, continuation=CONTINUATION) -> dict:
    """A /train body: one SFT sample teaching ``continuation`` after ``context``."""
    return {"samples": [{"context_ids": list(context), "continuation_ids": list(continuation)}],
            "config": {"objective": "sft", "learning_rate": lr, "steps": steps}}


def tiny_trainer(folder: Path) -> tuple[Trainer, dict[str, torch.Tensor]]:
    from transformers import AutoConfig

    tiny.make_model("llama", folder)
    served = layout.to_served({k: v.clone() for k, v in load_file(folder / "model.safetensors").items()})
    model = shared_weights.view_model(AutoConfig.from_pretrained(folder), served)
    return Trainer(model, folder, served=served), served


def wait_until(condition, timeout: float, what: str, poll: float = 0.02):
    """``condition()``'s first truthy value, polled every ``poll`` s; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
