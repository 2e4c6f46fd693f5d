"""How the plugin changes vLLM: tagged wrappers of vLLM methods, and the start-up checks both
halves (readout and fine-tuning) share.

Wrappers are tagged rather than compared by identity because plugins can load more than once
per process and the readout and fine-tuning wrappers stack in either order: each kind must wrap a
method exactly once, whatever else is already in the chain.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from amygdala.serve.config import PLUGIN_NAME

#: Tags of the two kinds of wrapper.
READOUT_TAG = "_amygdala_readout"
FINETUNE_TAG = "_amygdala_finetune"


def mark(wrapper, original, tag: str):
    """Record ``original`` under ``wrapper`` and tag it, so :func:`is_ours` finds it later."""
    wrapper.__wrapped__ = original
    setattr(wrapper, tag, True)
    return wrapper


def is_ours(fn, tag: str) -> bool:
    """Whether a wrapper tagged ``tag`` is anywhere in ``fn``'s chain of wrappers."""
    while fn is not None:
        if getattr(fn, tag, False):
            return True
        fn = getattr(fn, "__wrapped__", None)
    return False


def wrap_method(cls, name: str, make: Callable, tag: str) -> None:
    """Replace ``cls.name`` by ``make(original)`` unless a wrapper tagged ``tag`` is already there."""
    original = getattr(cls, name)
    if not is_ours(original, tag):
        setattr(cls, name, mark(make(original), original, tag))


def after_engine_config(check: Callable, tag: str) -> None:
    """Run ``check(vllm_config)`` once vLLM knows the model's shape, before it loads any weights."""
    from vllm.engine.arg_utils import EngineArgs

    def make(original):
        def create_engine_config(self, *args, **kwargs):
            config = original(self, *args, **kwargs)
            check(config)
            return config

        return create_engine_config

    wrap_method(EngineArgs, "create_engine_config", make, tag)


def after_load_model(install: Callable, tag: str) -> None:
    """Run ``install(worker)`` in each worker once its weights are loaded (the CPU worker inherits it)."""
    from vllm.v1.worker import gpu_worker

    def make(original):
        def load_model(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            install(self)
            return result

        return load_model

    wrap_method(gpu_worker.Worker, "load_model", make, tag)


def plugin_allowed() -> bool:
    """Whether vLLM will load our endpoint plugin: it loads only those ``VLLM_PLUGINS`` names."""
    allowed = os.environ.get("VLLM_PLUGINS")
    return allowed is not None and PLUGIN_NAME in [p.strip() for p in allowed.split(",")]


def not_eager(vllm_config) -> bool:
    """Whether the engine compiles or captures graphs: forward hooks and in-place weight updates
    both need every forward to run the Python modules with the current tensors."""
    from vllm.config import CompilationMode

    cc = vllm_config.compilation_config
    graphs = getattr(cc, "cudagraph_mode", None)
    return cc.mode != CompilationMode.NONE or (graphs is not None and graphs.name != "NONE")
