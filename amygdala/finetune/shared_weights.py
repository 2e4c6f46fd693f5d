"""A transformers model whose parameters are views of tensors someone else holds (the served weights).

Why: the trainer must update the very memory the server reads (HOGWILD: the next request sees
the new weights, and no second copy of the model exists). So it builds the transformers
module tree with no parameter memory at all, then sets every parameter to a view of a served
tensor: merged projections (``qkv_proj``, ``gate_up_proj``) are split by row ranges
(:mod:`amygdala.checkpoint.layout`), so ``q_proj.weight`` is ``qkv_proj.weight[0:q]``, not a copy.
An optimizer's in-place ``p.add_(...)`` then writes into the holder's storage.

How the vLLM side plugs in (what :func:`view_model` needs): a dict ``served`` of vLLM's
parameter names to tensors, in the trainer's process. Getting them there:

- same process: ``dict(vllm_model.named_parameters())`` (detached ``.data``);
- another process, CPU: the holder calls :func:`export_handles` on its tensors after moving
  them to shared memory (``t.share_memory_()`` moves in place; vLLM must do it before it
  serves, or its own tensors would be copies), sends the bytes (e.g. over ZeroMQ), and the
  trainer calls :func:`import_handles`;
- another process, CUDA: the same two calls; torch turns CUDA tensors into CUDA IPC handles.
  The holder must keep its tensors alive while the trainer uses them.

Non-persistent buffers (rotary ``inv_freq``) are computed by transformers as usual and moved
to the served tensors' device. Names that the model has and ``served`` lacks, or shapes that
do not fit, raise :class:`amygdala.checkpoint.layout.LayoutError` naming the tensor.
"""

from __future__ import annotations

import contextlib
import io
import pickle
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from amygdala.checkpoint.layout import LayoutError, to_checkpoint


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside goes to the meta device (no memory, no init cost);
    buffers are created normally, so computed ones such as rotary frequencies are right."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _set(model: nn.Module, name: str, tensor: torch.Tensor, requires_grad: bool) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    # nn.Parameter(t) aliases t's storage (no copy); in-place updates reach the holder.
    module._parameters[attr] = nn.Parameter(tensor, requires_grad=requires_grad)


def view_model(config, served: Mapping[str, torch.Tensor], *, trainable: bool = True) -> nn.Module:
    """A causal LM built from ``config`` (a transformers config) on views of ``served``.

    ``served`` may use vLLM's merged names or the checkpoint's own names. Its dtype and device
    become the model's. ``trainable`` sets requires_grad on every parameter; freeze some
    afterwards (e.g. the embeddings) with ``p.requires_grad_(False)``.
    """
    from transformers import AutoModelForCausalLM

    if not served:
        raise LayoutError("served: no tensors given")
    first = next(iter(served.values()))
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=first.dtype)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, view in to_checkpoint(served, shapes, tied=tied).items():
        _set(model, name, view, trainable)
    if tied:
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        if out is not None and inp is not None:
            out.weight = inp.weight
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.device != first.device:
                module._buffers[name] = buf.to(first.device)
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise LayoutError(f"{left[0]}: no served tensor backs this parameter ({len(left)} in all)")
    return model.train()


def export_handles(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Picklable handles to ``tensors`` for another process (:func:`import_handles`).

    CPU tensors must be in shared memory (``share_memory_()``); they travel as file names in
    /dev/shm (torch's ``file_system`` strategy, set here for this process), so any process can
    open them, not just a child. CUDA tensors travel as CUDA IPC handles.
    """
    import torch.multiprocessing as tmp
    from multiprocessing.reduction import ForkingPickler

    for name, t in tensors.items():
        if t.device.type == "cpu" and not t.is_shared():
            raise LayoutError(f"{name}: a CPU tensor must be in shared memory to be viewed from another process; call share_memory_() first")
    tmp.set_sharing_strategy("file_system")
    buf = io.BytesIO()
    ForkingPickler(buf, pickle.HIGHEST_PROTOCOL).dump(dict(tensors))
    return buf.getvalue()


def import_handles(blob: bytes) -> dict[str, torch.Tensor]:
    """The tensors behind :func:`export_handles`' bytes: views of the holder's memory."""
    import torch.multiprocessing  # noqa: F401  (registers torch's reductions for unpickling)

    return pickle.loads(blob)
