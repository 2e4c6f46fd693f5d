"""Online fine-tuning on vLLM's server, engine side: :func:`register`, called from the
``vllm.general_plugins`` entry point (:mod:`amygdala.serve.plugin`) in every vLLM process.

On only when ``AMYGDALA_API_KEY`` is set (the routes change the weights everyone is served) and
``VLLM_PLUGINS`` names ``amygdala`` (vLLM loads the routes only then: a worker nobody can reach
would hold the folder and cost the packed kernels for nothing). It patches three vLLM points:

- ``EngineArgs.create_engine_config``: before vLLM builds the engine, check that fine-tuning can
  work (eager mode, one worker, the trainable set's layers, a local writable model folder
  with safetensors that no other training worker holds) and replay an interrupted checkpoint sync
  (:func:`amygdala.checkpoint.recover`) *before* vLLM reads the folder;
- ``UnquantizedLinearMethod.process_weights_after_loading``: keep the linear layers' plain weights
  (below);
- ``Worker.load_model``: once the weights are in, start the training worker
  (:mod:`amygdala.finetune.worker`) on views of vLLM's parameters under the folder's names
  (:func:`checkpoint_named`: split by the model class's ``packed_modules_mapping``).

Plain weights, and their cost: vLLM's CPU build packs every linear layer's weight into a
oneDNN (or sgl) handle when loading and *removes* ``layer.weight``
(``UnquantizedLinearMethod.process_weights_after_loading``), so an in-place update of the
weight would never reach inference. With fine-tuning on, every linear layer is marked
``_cpu_skip_gemm_dispatch`` (vLLM's own opt-out) and runs ``torch.nn.functional.linear`` on
its plain weight instead of the packed kernel; ``bench/train.py`` measures what that costs.
The embedding and lm_head keep their packed copies: the trainer freezes them.

The API side (the routes) is :mod:`amygdala.serve.finetune_routes`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from amygdala import AmygdalaError
from amygdala.serve.config import (
    API_KEY_ENV, DEFAULT_SYNC_DELAY, OPTIMIZER_ENV, PLUGIN_NAME, SYNC_DELAY_ENV, THREADS_ENV, TRAIN_LAYERS_ENV,
    TRAIN_MODULES_ENV, TRAINING_NEEDS_ONE_WORKER, api_key, finetune_addresses,
)
from amygdala.serve.patching import FINETUNE_TAG, after_engine_config, after_load_model, not_eager, plugin_allowed, wrap_method

log = logging.getLogger("vllm.amygdala")  # under vLLM's logger: its format and level


class TrainingSetupError(AmygdalaError):
    """Fine-tuning is switched on but cannot work with this server's settings or model folder."""


def settings() -> tuple[str, float, int]:
    """(optimizer, sync delay s, threads) from the environment, each checked; raises naming the variable."""
    from amygdala.finetune.apollo import KINDS

    optimizer = os.environ.get(OPTIMIZER_ENV) or "apollo-mini"
    if optimizer not in KINDS:
        raise TrainingSetupError(f"{OPTIMIZER_ENV}={optimizer!r}: use one of {', '.join(KINDS)}")
    raw = os.environ.get(SYNC_DELAY_ENV)
    try:
        delay = DEFAULT_SYNC_DELAY if not raw else float(raw)
        if not delay >= 0 or delay == float("inf"):
            raise ValueError
    except ValueError:
        raise TrainingSetupError(f"{SYNC_DELAY_ENV}={raw!r}: give the seconds between the last job and the checkpoint sync, e.g. 600") from None
    raw = os.environ.get(THREADS_ENV)
    if raw and not (raw.isdigit() and int(raw) >= 1):
        raise TrainingSetupError(f"{THREADS_ENV}={raw!r}: give a number of threads >= 1, or unset it")
    return optimizer, delay, int(raw) if raw else 0


def trainable():
    """The trainable set from AMYGDALA_TRAIN_LAYERS / AMYGDALA_TRAIN_MODULES (docs/finetuning.md)."""
    from amygdala.finetune.trainable import Trainable

    return Trainable(os.environ.get(TRAIN_LAYERS_ENV, "").strip(), os.environ.get(TRAIN_MODULES_ENV, "").strip())


def register() -> None:
    """Install the engine side when ``AMYGDALA_API_KEY`` is set (called in every vLLM process)."""
    if api_key() is None:
        return
    settings()
    if not plugin_allowed():
        log.warning("amygdala: %s is set but VLLM_PLUGINS does not name %r, so vLLM would not load the training "
                    "routes: training is off; start with VLLM_PLUGINS=%s (or use `amygdala serve`)",
                    API_KEY_ENV, PLUGIN_NAME, PLUGIN_NAME)
        return
    finetune_addresses()
    _keep_plain_weights()
    after_engine_config(check_engine_config, FINETUNE_TAG)
    after_load_model(start_worker, FINETUNE_TAG)


def check_engine_config(vllm_config) -> None:
    """Raise (one line) when fine-tuning cannot work with this engine; then replay a cut sync."""
    from amygdala import checkpoint

    if not_eager(vllm_config):
        raise TrainingSetupError(
            "training updates the served weights in place, which a compiled graph may have frozen or packed: "
            "start vLLM with --enforce-eager (amygdala serve does)")
    pc = vllm_config.parallel_config
    if pc.tensor_parallel_size * pc.pipeline_parallel_size * pc.data_parallel_size > 1:
        raise TrainingSetupError(f"{TRAINING_NEEDS_ONE_WORKER} (docs/scale.md)")
    try:  # the layer indices against the model's depth, before any weight loads
        trainable().layer_indices(vllm_config.model_config.hf_text_config.num_hidden_layers)
    except AmygdalaError as e:
        raise TrainingSetupError(str(e)) from None
    folder = Path(str(vllm_config.model_config.model))
    if not folder.is_dir() or not any(folder.glob("*.safetensors")):
        raise TrainingSetupError(
            f"{folder}: training needs a local model folder with .safetensors files (it is the checkpoint); "
            "serve a folder, e.g. one written by save_pretrained")
    if not os.access(folder, os.W_OK):
        raise TrainingSetupError(f"{folder}: not writable; training syncs its changes into the model folder")
    # under the folder's writer lock: a worker or a CLI sync still writing it is waited for (or named)
    replayed = checkpoint.recover(folder)
    if replayed is not None:
        log.warning("amygdala: %s: replayed an interrupted checkpoint sync (%d blocks)", folder, replayed)


def _keep_plain_weights() -> None:
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    def make(original):
        def process_weights_after_loading(self, layer):
            layer._cpu_skip_gemm_dispatch = True  # vLLM CPU: keep layer.weight, use F.linear on it
            return original(self, layer)

        return process_weights_after_loading

    wrap_method(UnquantizedLinearMethod, "process_weights_after_loading", make, FINETUNE_TAG)


def checkpoint_named(model_cls: type, served: dict, folder: Path, tied: bool) -> dict:
    """``served`` (the parameters of vLLM's ``model_cls``) as views under the model folder's tensor names.

    Merged projections are split by the served class's own ``packed_modules_mapping``, not by
    a table of ours, so a family vLLM merges differently (Qwen3.5's ``in_proj_qkvz``) needs no
    change here. A family whose tensors still do not map fails now, naming them all, before
    the training worker starts. The worker, trainer and checkpoint sync then see the folder's
    names only.
    """
    from amygdala import checkpoint
    from amygdala.checkpoint import layout

    try:
        merged = layout.merged_from_packed(getattr(model_cls, "packed_modules_mapping", None) or {})
        shapes = {name: e.shape for name, e in checkpoint.read_entries(folder).items()}
        missing, extra = layout.unmapped(served, shapes, tied=tied, merged=merged)
        wrong = ([f"no served tensor holds {_few(missing)}"] if missing else []) + (
            [f"served {_few(extra)} match no checkpoint tensor"] if extra else [])
        if wrong:
            raise layout.LayoutError(
                f"cannot map vLLM's {model_cls.__name__} onto the checkpoint: {'; '.join(wrong)} "
                f"(merged modules from its packed_modules_mapping: {', '.join(merged) or 'none'})")
        return layout.to_checkpoint(served, shapes, tied=tied, merged=merged)
    except (layout.LayoutError, checkpoint.CheckpointError) as e:
        raise TrainingSetupError(f"{folder}: {e}; training cannot run on this model family") from None


def _few(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def start_worker(worker) -> None:
    """Start the training worker on views of ``worker``'s freshly loaded parameters."""
    from amygdala.finetune.worker import WorkerSpec, spawn

    model = worker.model_runner.get_model()
    served = {name: p.data for name, p in model.named_parameters()}
    packed = [name for name, t in served.items() if t.numel() == 0]
    if packed:
        raise TrainingSetupError(
            f"{packed[0]}: vLLM replaced this weight by a packed kernel ({len(packed)} in all), so training could "
            "not reach inference; this vLLM build packs weights amygdala does not know how to keep")
    served = checkpoint_named(type(model), served, Path(str(worker.model_config.model)),
                              bool(getattr(worker.model_config.hf_text_config, "tie_word_embeddings", False)))
    optimizer, delay, threads = settings()
    control, events = finetune_addresses()
    chosen = trainable()
    spec = WorkerSpec(str(worker.model_config.model), control, events, optimizer, delay, threads,
                      train_layers=chosen.layers, train_modules=chosen.modules)
    worker._amygdala_training = spawn(served, spec)  # keep the Popen: the worker lives as long as this process
    log.info("amygdala: training worker started on %d served tensors (pid %d)", len(served), worker._amygdala_training.pid)
