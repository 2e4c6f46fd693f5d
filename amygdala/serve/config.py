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
import stat
import tempfile
from pathlib import Path

from amygdala import AmygdalaError
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
#: Largest ``POST /train`` body in bytes (413 past it): 4096 samples of 1024 tokens fit in 32 MiB.
MAX_BODY_ENV = "AMYGDALA_TRAIN_MAX_BODY"
DEFAULT_MAX_BODY = 32 << 20
#: Largest ``|strength|`` of a steering term (400 past it). Residual-stream norms of the models
#: amygdala serves are in the tens to hundreds and useful strengths are below them; 1000 is
#: past any of them yet keeps a float16 residual stream (max 65504) from overflowing.
MAX_STRENGTH_ENV = "AMYGDALA_MAX_STEER_STRENGTH"
DEFAULT_MAX_STRENGTH = 1000.0
#: The server-wide steering (``amygdala serve --steer``): a JSON list of ``steer`` items (the
#: request field's format) applied to every request that has no ``steer`` of its own.
DEFAULT_STEER_ENV = "AMYGDALA_DEFAULT_STEER"
#: Set by ``amygdala serve --allow-remote-training``: the training routes on a non-loopback host were meant.
ALLOW_REMOTE_ENV = "AMYGDALA_ALLOW_REMOTE_TRAINING"
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


class ConfigError(AmygdalaError):
    """A bad environment variable; the message names it."""


def runtime_dir() -> Path:
    """The private socket folder, created (and exported to child processes) on first use.

    An inherited one must be a folder of this user with no access for others: its sockets
    need no key, so a shared folder would let anyone push fake scores or start training.
    """
    value = os.environ.get(RUNTIME_ENV)
    if value:
        folder = Path(value)
        try:
            info = folder.stat()
        except OSError:
            info = None
        if info is None or not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise ConfigError(f"{RUNTIME_ENV}={value}: must be an existing folder of yours with mode 0700 (it holds the "
                              "server's sockets, which need no key); unset it to get a fresh private one")
        return folder
    folder = Path(tempfile.mkdtemp(prefix="amygdala-"))  # mkdtemp: mode 0700
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # the first process outlives its children
    os.environ[RUNTIME_ENV] = str(folder)
    return folder


def _socket(env: str, name: str) -> str:
    """The address in ``env`` (inherited from the first process), or a new one in the private folder."""
    folder = runtime_dir()
    address = os.environ.get(env)
    if not address:
        address = f"ipc://{folder / name}"
        os.environ[env] = address
    elif not (address.startswith("ipc://") and Path(address[len("ipc://"):]).parent == folder):
        raise ConfigError(f"{env}={address}: every socket of the server lives in {RUNTIME_ENV} ({folder}); unset {env}")
    return address


def channel_address() -> str:
    """The scores socket's address, created (and exported to child processes) on first use."""
    return _socket(CHANNEL_ENV, "scores.sock")


def finetune_addresses() -> tuple[str, str]:
    """(training worker control, API server events), created and exported on first use."""
    return _socket(CONTROL_ENV, "finetune-worker.sock"), _socket(EVENTS_ENV, "finetune-events.sock")


def api_key() -> str | None:
    return os.environ.get(API_KEY_ENV) or None


def _positive(env: str, default: float, what: str) -> float:
    raw = os.environ.get(env)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (0 < value < float("inf")):
        raise ConfigError(f"{env}={raw!r}: give {what} (a positive number), or unset it for {default:g}")
    return value


def max_body_bytes() -> int:
    return int(_positive(MAX_BODY_ENV, DEFAULT_MAX_BODY, "the largest /train body in bytes"))


def max_steer_strength() -> float:
    return _positive(MAX_STRENGTH_ENV, DEFAULT_MAX_STRENGTH, "the largest steering |strength|")


def is_loopback(host: str | None) -> bool:
    """Whether a bind address reaches this machine only (None and "" bind every interface)."""
    import ipaddress

    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface
