"""Readout and steering inside vLLM, as plugins of an unmodified vLLM install.

Two entry points, both named ``amygdala`` (so ``VLLM_PLUGINS=amygdala`` allows both):

- ``vllm.general_plugins`` -> :func:`amygdala.serve.plugin.register`, run in every vLLM process.
  In the worker it hooks the decoder layers (:mod:`amygdala.serve.hooks`): per-request steering
  added to the residual stream, and per-token concept scores at the sampled positions, which it
  pushes to the API server over a local ZMQ socket (:mod:`amygdala.serve.channel`).
- ``vllm.endpoint_plugins`` -> :class:`amygdala.serve.routes.AmygdalaEndpoints`, in the API server:
  ``GET /v1/readout/manifest``, and wrappers of ``/v1/completions`` and ``/v1/chat/completions``
  that parse ``readout`` / ``steer`` (:mod:`amygdala.serve.spec`), key the prefix cache by the
  steering, wait for each token's scores (:mod:`amygdala.serve.proxy`) and put them into the
  response (:mod:`amygdala.serve.respond`).

Nothing of the readout happens unless ``AMYGDALA_READOUT`` (or ``VLLM_READOUT_VECTORS``) names a
readout file. With ``AMYGDALA_API_KEY`` set, the same two entry points add online fine-tuning:
:mod:`amygdala.serve.finetune_engine` (engine side: start-up checks, the training worker) and
:mod:`amygdala.serve.finetune_routes` (API side: ``/train``, ``/train/status``, ``/checkpoint``).
Both halves patch vLLM through :mod:`amygdala.serve.patching`, answer errors through
:mod:`amygdala.serve.errors` and read their settings from :mod:`amygdala.serve.config`.
``amygdala serve`` (:mod:`amygdala.cli.serve`, over :mod:`amygdala.serve.launch`) sets all of this up.
"""
