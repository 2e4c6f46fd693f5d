"""steering-vectors' ``SteeringVector`` as ``torch.save`` keeps it, without the library.

``SteeringVector(layer_activations={layer: tensor}, layer_type="decoder_block")`` adds
``multiplier * layer_activations[layer]`` to the output of decoder block ``layer`` (its
``apply``/``patch_activations`` hook the block's forward, every token by default): amygdala's
layer numbering and site exactly. The library has no save/load of its own (it was added and
reverted in 0.10.1), so its users keep vectors with ``torch.save``; that is what is written
here, and ``torch.load(path, weights_only=False)`` (or ``weights_only=True`` inside
``torch.serialization.safe_globals([SteeringVector])``) returns the library's real object.

Reading takes such a file, or ``torch.save(vector.layer_activations)`` (a plain
``{layer: tensor}`` dict); vectors of another ``layer_type`` (attention, MLP) are refused:
they act at a different site.
"""

from __future__ import annotations

from pathlib import Path

import torch

from amygdala.interop import pickles
from amygdala.interop.vectors import InteropError, LayerVectors

LAYER_TYPE = "decoder_block"


def write(vectors: LayerVectors, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"layer_activations": {l: vectors.directions[l].float().clone() for l in vectors.layers},
             "layer_type": LAYER_TYPE}
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        pickles.torch_save(pickles.SteeringVectorFile, state, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def from_object(obj, where: str) -> LayerVectors | None:
    """The layer vectors of a loaded ``SteeringVector`` or ``{layer: tensor}`` dict; None for other objects."""
    if isinstance(obj, pickles.SteeringVectorFile):
        layer_type = obj.__dict__.get("layer_type", LAYER_TYPE)
        if layer_type != LAYER_TYPE:
            raise InteropError(
                f"{where}: a SteeringVector of layer_type {layer_type!r}; amygdala steers the decoder block "
                f"output ({LAYER_TYPE!r}), a different site"
            )
        layers = obj.__dict__.get("layer_activations")
    elif isinstance(obj, dict) and obj and all(isinstance(k, int) for k in obj):
        layers = obj
    else:
        return None
    if not isinstance(layers, dict) or not all(isinstance(v, torch.Tensor) for v in layers.values()) or not all(
            type(k) is int for k in layers):  # int("a") would be a traceback; a bool is no layer number
        raise InteropError(f"{where}: layer_activations must map layer numbers (integers) to tensors")
    return LayerVectors({int(l): v.detach().float().cpu() for l, v in layers.items()}).check(where)
