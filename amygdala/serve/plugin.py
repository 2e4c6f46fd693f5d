"""``vllm.general_plugins`` entry point: vLLM calls :func:`register` in every process it starts.

When a readout file is configured, ``register`` checks that the file loads (so a broken file
stops the server at start), picks the address of the scores socket in the first process (the
API server; its children inherit it), and wraps three vLLM methods:

- ``EngineArgs.create_engine_config``: once vLLM knows the model's shape, and before it loads
  any weights, check that the readout fits it and that eager mode is on;
- ``Worker.load_model``: hook the decoder layers once the weights are in (checked again there,
  against the real modules);
- ``GPUModelRunner._model_forward``: give each forward pass its per-request plan.

The CPU worker and model runner inherit the last two. Without a readout file nothing happens.
With ``AMYGDALA_API_KEY`` set, :func:`amygdala.serve.training.register` adds the training
worker (readout or not).
"""

from __future__ import annotations

import logging
import os

from amygdala.serve.config import CHANNEL_ENV, PLUGIN_NAME, READOUT_ENV, channel_address, load_readout

log = logging.getLogger("vllm.amygdala")  # under vLLM's logger: its format and level


def register() -> None:
    from amygdala.serve import training  # on with AMYGDALA_API_KEY, with or without a readout

    readout = load_readout()
    if readout is None:
        training.register()
        return
    first_process = CHANNEL_ENV not in os.environ  # children inherit the address
    channel_address()
    allowed = os.environ.get("VLLM_PLUGINS")
    if first_process and (allowed is None or PLUGIN_NAME not in [p.strip() for p in allowed.split(",")]):
        log.warning(
            "amygdala: %s is set but VLLM_PLUGINS does not name %r, so vLLM will not load the "
            "readout routes; start with VLLM_PLUGINS=%s (or use `amygdala serve`)",
            READOUT_ENV, PLUGIN_NAME, PLUGIN_NAME,
        )
    _wrap_engine_args()
    _wrap_worker()
    training.register()  # after the readout's wrappers: it wraps them


def check_config(vllm_config) -> None:
    """Raise (a one-line ReadoutError) when the readout or the engine settings cannot work."""
    from amygdala.serve.worker import check_supported

    readout = load_readout()
    model_config = vllm_config.model_config
    text = model_config.hf_text_config
    readout.check_model(text.num_hidden_layers, model_config.get_hidden_size(), str(model_config.model))
    check_supported(vllm_config)


def _wrap_engine_args() -> None:
    from vllm.engine.arg_utils import EngineArgs

    from amygdala.serve.worker import is_ours, mark

    original = EngineArgs.create_engine_config
    if is_ours(original):
        return

    def create_engine_config(self, *args, **kwargs):
        config = original(self, *args, **kwargs)
        check_config(config)
        return config

    EngineArgs.create_engine_config = mark(create_engine_config, original)


def _wrap_worker() -> None:
    """Wrap once per process (plugins may load more than once), whatever other wrappers exist."""
    from vllm.v1.worker import gpu_model_runner, gpu_worker

    from amygdala.serve.worker import is_ours, load_model_wrapper, model_forward_wrapper

    worker_cls = gpu_worker.Worker
    if not is_ours(worker_cls.load_model):
        worker_cls.load_model = load_model_wrapper(worker_cls.load_model)
    runner_cls = gpu_model_runner.GPUModelRunner
    if not is_ours(runner_cls._model_forward):
        runner_cls._model_forward = model_forward_wrapper(runner_cls._model_forward)
