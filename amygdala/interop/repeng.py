"""repeng's ``ControlVector``, without repeng.

repeng's own save/load is a GGUF: ``ControlVector.export_gguf`` writes architecture
``controlvector``, ``controlvector.model_hint`` (the model's ``config.model_type``),
``controlvector.layer_count`` (uint32) and one F32 ``direction.<layer>`` per layer;
``ControlVector.import_gguf`` needs the model hint and every tensor named ``direction.<n>``.
Its layer keys are decoder-block indices: ``ControlModel`` adds ``coeff * directions[layer]``
to the output of ``model.layers[layer]``, and training reads ``hidden_states[layer + 1]``,
the same block's output. That is amygdala's numbering and site, so no offset either.

The class is a plain dataclass (``model_type``, ``directions: dict[int, np.ndarray]``), so a
vector can also be kept pickled or ``torch.save``d; those are read here too (never executed:
see :mod:`amygdala.interop.pickles`). repeng has no pickle writer of its own, so export writes
its GGUF.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from amygdala.interop import gguf, pickles
from amygdala.interop.vectors import InteropError, LayerVectors


def write(vectors: LayerVectors, path: str | Path) -> Path:
    """The GGUF ``ControlVector.import_gguf`` reads (layer 0 allowed: repeng can steer it)."""
    return gguf.write(vectors, path, layer_count_signed=False, allow_layer0=True)


def from_object(obj, where: str) -> LayerVectors | None:
    """The layer vectors of an unpickled ``ControlVector``; None for other objects."""
    if not isinstance(obj, pickles.RepengControlVector):
        return None
    directions = obj.__dict__.get("directions")
    if not isinstance(directions, dict):
        raise InteropError(f"{where}: a repeng ControlVector without a directions dict")
    out = {}
    for layer, v in directions.items():
        if not isinstance(layer, (int, np.integer)) or not isinstance(v, (np.ndarray, torch.Tensor)):
            raise InteropError(f"{where}: repeng directions must map layer numbers to arrays, got {type(layer).__name__} -> {type(v).__name__}")
        out[int(layer)] = torch.as_tensor(np.asarray(v, dtype=np.float32)) if isinstance(v, np.ndarray) else v.detach().float().cpu()
    hint = obj.__dict__.get("model_type")
    return LayerVectors(out, hint if isinstance(hint, str) else None).check(where)
