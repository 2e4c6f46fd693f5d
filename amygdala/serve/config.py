"""The environment variables every vLLM process of a served model reads, in one place.

vLLM starts the API server, the engine core and the workers as separate processes that inherit
the environment of the first, so configuration travels as environment variables: the readout
file, the fine-tuning settings, and the addresses of the local sockets between the processes.
Every socket lives in one private folder (mode 0700, made by the first process), so no other
user of the machine can push fake scores or reach a training worker that needs no key.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from pathlib import Path

from amygdala.readout import Readout

#: The readout file (folder or either of its files). ``VLLM_READOUT_VECTORS`` is the original
#: system's name for it and is read when ``AMYGDALA_READOUT`` is unset.
READOUT_ENV = "AMYGDALA_READOUT"
LEGACY_READOUT_ENV = "VLLM_READOUT_VECTORS"
#: ``ipc://`` address of the API server's socket; chosen by the first process that loads the plugin.
CHANNEL_ENV = "AMYGDALA_SERVE_CHANNEL"
#: The private folder of this server's sockets; made by the first process.
RUNTIME_ENV = "AMYGDALA_RUNTIME_DIR"

#: The key every training route requires; unset (or empty): the routes are off.
API_KEY_ENV = "AMYGDALA_API_KEY"
#: Seconds after the last job until the automatic checkpoint sync (a new job restarts it).
SYNC_DELAY_ENV = "AMYGDALA_SYNC_DELAY"
DEFAULT_SYNC_DELAY = 600.0
#: apollo-mini (default) | apollo | adamw: fixed for a folder (its saved state depends on it).
OPTIMIZER_ENV = "AMYGDALA_TRAIN_OPTIMIZER"
#: Which decoder layers / block modules train (amygdala.finetune.trainable; unset: all).
TRAIN_LAYERS_ENV = "AMYGDALA_TRAIN_LAYERS"
TRAIN_MODULES_ENV = "AMYGDALA_TRAIN_MODULES"
#: torch threads of the training worker (default: torch's choice).
THREADS_ENV = "AMYGDALA_TRAIN_THREADS"
#: ipc:// addresses of the training worker's socket and of the API server's reset socket.
CONTROL_ENV = "AMYGDALA_TRAIN_CONTROL"
EVENTS_ENV = "AMYGDALA_TRAIN_EVENTS"
#: ``0`` leaves out the page (``GET /amygdala/``) the endpoint plugin serves by default.
PAGE_ENV = "AMYGDALA_PAGE"
#: Why training refuses tensor/pipeline/data parallelism (docs/scale.md); said by the engine and by `amygdala serve`.
TRAINING_NEEDS_ONE_WORKER = ("training runs on one worker holding the whole model: drop tensor/pipeline/data parallelism, "
                             f"or unset {API_KEY_ENV} to serve on several devices without training")
#: Name of both entry points; what ``VLLM_PLUGINS`` must list.
PLUGIN_NAME = "amygdala"
#: Key in ``SamplingParams.extra_args`` under which the API server hands a request's spec to workers.
WIRE_KEY = "amygdala"


def readout_path() -> Path | None:
    value = os.environ.get(READOUT_ENV) or os.environ.get(LEGACY_READOUT_ENV)
    return Path(value) if value else None


@functools.lru_cache(maxsize=1)
def _load(path: str) -> Readout:
    return Readout.load(path)


def load_readout() -> Readout | None:
    """The configured readout, loaded once per process; ``None`` when none is configured."""
    path = readout_path()
    return None if path is None else _load(str(path))


def runtime_dir() -> Path:
    """The private socket folder, created (and exported to child processes) on first use."""
    value = os.environ.get(RUNTIME_ENV)
    if value and Path(value).is_dir():
        return Path(value)
    folder = Path(tempfile.mkdtemp(prefix="amygdala-"))  # mkdtemp: mode 0700
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # the first process outlives its children
    os.environ[RUNTIME_ENV] = str(folder)
    return folder


def channel_address() -> str:
    """The scores socket's address, created (and exported to child processes) on first use."""
    address = os.environ.get(CHANNEL_ENV)
    if not address:
        address = f"ipc://{runtime_dir() / 'scores.sock'}"
        os.environ[CHANNEL_ENV] = address
    return address


def finetune_addresses() -> tuple[str, str]:
    """(training worker control, API server events), created and exported on first use."""
    if not (os.environ.get(CONTROL_ENV) and os.environ.get(EVENTS_ENV)):
        folder = runtime_dir()
        os.environ[CONTROL_ENV] = f"ipc://{folder / 'finetune-worker.sock'}"
        os.environ[EVENTS_ENV] = f"ipc://{folder / 'finetune-events.sock'}"
    return os.environ[CONTROL_ENV], os.environ[EVENTS_ENV]


def api_key() -> str | None:
    return os.environ.get(API_KEY_ENV) or None
