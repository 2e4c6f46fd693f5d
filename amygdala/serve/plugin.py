"""``vllm.general_plugins`` entry point: vLLM calls :func:`register` in every process it starts.

When a readout file is configured, ``register`` checks that the file loads (so a broken file
stops the server at start), picks the address of the scores socket in the first process (the
API server; its children inherit it), and patches three vLLM points (:mod:`amygdala.serve.patching`):

- ``EngineArgs.create_engine_config``: once vLLM knows the model's shape, and before it loads
  any weights, check that the readout fits it and that eager mode is on;
- ``Worker.load_model``: hook the decoder layers once the weights are in
  (:mod:`amygdala.serve.hooks`; checked again there, against the real modules);
- ``GPUModelRunner._model_forward``: give each forward pass its per-request plan.

The CPU worker and model runner inherit the last two. Without a readout file nothing happens.
With ``AMYGDALA_API_KEY`` set, :func:`amygdala.serve.finetune_engine.register` adds the training
worker (readout or not).
"""

from __future__ import annotations

import logging
import os

from amygdala.serve import finetune_engine
from amygdala.serve.config import CHANNEL_ENV, PLUGIN_NAME, READOUT_ENV, channel_address, load_readout
from amygdala.serve.patching import READOUT_TAG, after_engine_config, after_load_model, plugin_allowed, wrap_method

log = logging.getLogger("vllm.amygdala")  # under vLLM's logger: its format and level


def register() -> None:
    readout = load_readout()
    if readout is None:
        finetune_engine.register()  # on with AMYGDALA_API_KEY, with or without a readout
        return
    first_process = CHANNEL_ENV not in os.environ  # children inherit the address
    channel_address()
    if first_process and not plugin_allowed():
        log.warning(
            "amygdala: %s is set but VLLM_PLUGINS does not name %r, so vLLM will not load the "
            "readout routes; start with VLLM_PLUGINS=%s (or use `amygdala serve`)",
            READOUT_ENV, PLUGIN_NAME, PLUGIN_NAME,
        )
    from vllm.v1.worker import gpu_model_runner

    from amygdala.serve.hooks import install, model_forward_wrapper

    after_engine_config(check_config, READOUT_TAG)
    after_load_model(install, READOUT_TAG)
    wrap_method(gpu_model_runner.GPUModelRunner, "_model_forward", model_forward_wrapper, READOUT_TAG)
    finetune_engine.register()  # after the readout's wrappers: it wraps them


def check_config(vllm_config) -> None:
    """Raise (a one-line ReadoutError) when the readout or the engine settings cannot work."""
    from amygdala.serve.hooks import check_supported

    readout = load_readout()
    model_config = vllm_config.model_config
    text = model_config.hf_text_config
    readout.check_model(text.num_hidden_layers, model_config.get_hidden_size(), str(model_config.model))
    check_supported(vllm_config)
