"""Optimizer state next to the model: saved with every checkpoint sync, restored on the next job.

Why next to the model (not /tmp, as the original did): the folder is the checkpoint, and Adam's
moments belong to the weights they were accumulated on. Saving them in the same sync
transaction (a sidecar of :func:`amygdala.checkpoint.sync`) means a crash never pairs
new weights with old moments. The file holds only tensors, ints, floats and strings, so it
loads with ``torch.load(weights_only=True)``; the optimizer settings and parameter names in it
let a restore refuse a state that belongs to another optimizer or another set of weights.
"""

from __future__ import annotations

import io
import os
from dataclasses import asdict
from pathlib import Path

import torch

from amygdala import AmygdalaError
from amygdala.finetune.apollo import OptimizerSettings

#: The sidecar file in the model folder.
STATE_FILE = "amygdala-optimizer.pt"
FORMAT_VERSION = 1


class StateError(AmygdalaError):
    """A saved optimizer state that cannot be restored into this optimizer."""


def _settings_dict(settings: OptimizerSettings) -> dict:
    d = asdict(settings)
    d["betas"] = list(d["betas"])
    return d


def encode_state(optimizer: torch.optim.Optimizer, names: list[str], settings: OptimizerSettings, counters: dict[str, int]) -> bytes:
    """The state file's contents. ``counters`` (e.g. {"steps": 120, "jobs": 7}) continue across restarts."""
    payload = {
        "format_version": FORMAT_VERSION,
        "settings": _settings_dict(settings),
        "names": list(names),
        "counters": {k: int(v) for k, v in counters.items()},
        "optimizer": optimizer.state_dict(),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def load_state(model_dir: str | os.PathLike, optimizer: torch.optim.Optimizer, names: list[str],
               settings: OptimizerSettings) -> dict[str, int] | None:
    """Restore the saved state into ``optimizer``; its counters, or None when there is no file."""
    path = Path(model_dir) / STATE_FILE
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which and what to do
        raise StateError(f"{path}: not a readable optimizer state ({type(e).__name__}); delete it to start fresh") from None
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise StateError(f"{path}: format_version {payload.get('format_version') if isinstance(payload, dict) else '?'}, "
                         f"expected {FORMAT_VERSION}; delete it to start fresh")
    saved = payload["settings"]
    if saved != _settings_dict(settings):
        diff = sorted(k for k in saved if saved.get(k) != _settings_dict(settings).get(k))
        raise StateError(
            f"{path}: saved for optimizer settings {', '.join(f'{k}={saved[k]!r}' for k in diff)}; "
            "start the trainer with those settings, or delete the file to start fresh"
        )
    if payload["names"] != list(names):
        missing = sorted(set(payload["names"]) ^ set(names))[:3]
        raise StateError(
            f"{path}: saved for other trainable parameters (differs at {', '.join(missing) or 'their order'}); "
            "train the same parameters, or delete the file to start fresh"
        )
    optimizer.load_state_dict(payload["optimizer"])
    return dict(payload["counters"])
