"""The environment variables every vLLM process of a served model reads, in one place.

vLLM starts the API server, the engine core and the workers as separate processes that inherit
the environment of the first, so configuration travels as environment variables: the readout
file, and the address of the socket on which workers push scores to the API server.
"""

from __future__ import annotations

import functools
import os
import tempfile
import uuid
from pathlib import Path

from amygdala.readout import Readout

#: The readout file (folder or either of its files). ``VLLM_READOUT_VECTORS`` is the original
#: system's name for it and is read when ``AMYGDALA_READOUT`` is unset.
READOUT_ENV = "AMYGDALA_READOUT"
LEGACY_READOUT_ENV = "VLLM_READOUT_VECTORS"
#: ``ipc://`` address of the API server's socket; chosen by the first process that loads the plugin.
CHANNEL_ENV = "AMYGDALA_SERVE_CHANNEL"
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


def channel_address() -> str:
    """The scores socket's address, created (and exported to child processes) on first use."""
    address = os.environ.get(CHANNEL_ENV)
    if not address:
        name = f"amygdala-{os.getpid()}-{uuid.uuid4().hex[:8]}.sock"
        address = f"ipc://{Path(tempfile.gettempdir()) / name}"
        os.environ[CHANNEL_ENV] = address
    return address
